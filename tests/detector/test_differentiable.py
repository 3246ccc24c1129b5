"""The detector exported to torch (detector.differentiable) gives scikit-learn's scores, and
gradients, for logistic and MLP inner models; trees and isotonic calibration have no export."""

import numpy as np
import pytest
import torch

from detector.differentiable import TorchDetector, torch_detector
from detector.estimator import PathDetector


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 12)) * rng.uniform(0.1, 5, 12) + rng.normal(size=12)
    X[:, 5] = 3.0  # a constant column: StandardScaler's scale 0 is treated as 1
    y = (X[:, 0] / 5 + 0.5 * X[:, 3] ** 2 + rng.normal(0, 0.5, 600) > 1).astype(int)
    return X.astype(np.float32), y


@pytest.mark.parametrize("model", ["logistic", "mlp"])
def test_export_equals_predict_proba(data, model):
    X, y = data
    detector = PathDetector(model=model, random_state=0).fit(X, y)
    exported = torch_detector(detector)
    assert isinstance(exported, TorchDetector)
    ours = exported(torch.from_numpy(X))
    assert ours.dtype == torch.float64 and ours.shape == (len(X),)
    # scikit-learn computes in float32 on float32 features, the export in float64
    reference = detector.predict_proba(X)[:, 1]
    np.testing.assert_allclose(ours.numpy(), reference, rtol=0, atol=1e-6)
    clear = np.abs(reference - detector.threshold_) > 1e-6  # not on the threshold itself
    assert clear.mean() > 0.9
    np.testing.assert_array_equal((ours > detector.threshold_).numpy()[clear],
                                  detector.predict(X)[clear] == 1)


@pytest.mark.parametrize("model", ["logistic", "mlp"])
def test_export_is_differentiable(data, model):
    X, y = data
    exported = torch_detector(PathDetector(model=model, random_state=0).fit(X, y))
    features = torch.from_numpy(X[:20]).requires_grad_()
    exported(features).sum().backward()
    assert features.grad is not None and features.grad[:, 0].abs().sum() > 0
    assert torch.isfinite(features.grad).all()


@pytest.mark.parametrize("kwargs", [{"model": "random_forest"}, {"model": "hist_gb"},
                                    {"model": "logistic", "calibration": "isotonic"}])
def test_no_export_where_none_is_exact(data, kwargs):
    X, y = data
    assert torch_detector(PathDetector(random_state=0, **kwargs).fit(X, y)) is None
