"""The detector exported to torch (detector.differentiable) gives scikit-learn's scores, and
gradients, for logistic and MLP inner models; the tree ensembles' export gives their scores
(no gradient); gradient boosting and isotonic calibration have no export."""

import numpy as np
import pytest
import torch

from detector.differentiable import _TABLE_ELEMENTS, TorchDetector, TorchForest, torch_detector
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


@pytest.mark.parametrize("model", ["random_forest", "extra_trees"])
def test_forest_export_equals_predict_proba_one_by_one_and_in_batches(data, model):
    X, y = data
    detector = PathDetector(model=model, random_state=0).fit(X, y)
    exported = torch_detector(detector)
    assert isinstance(exported, TorchForest) and not exported.differentiable
    rng = np.random.default_rng(1)
    unseen = (rng.normal(size=(300, X.shape[1])) * X.std(0) + X.mean(0)).astype(np.float32)
    for features in (X, unseen):
        reference = detector.predict_proba(features)[:, 1]
        batched = exported(torch.from_numpy(features))  # walks the trees level by level
        single = torch.cat([exported(torch.from_numpy(features[i:i + 1]))  # a split table
                            for i in range(50)])
        few = torch.cat([exported(torch.from_numpy(features[i:i + 3]))  # one table for 3
                         for i in range(0, 51, 3)])
        assert batched.dtype == torch.float64 and batched.shape == (len(features),)
        np.testing.assert_allclose(batched.numpy(), reference, rtol=0, atol=1e-12)
        np.testing.assert_allclose(single.numpy(), reference[:50], rtol=0, atol=1e-12)
        np.testing.assert_allclose(few.numpy(), reference[:51], rtol=0, atol=1e-12)
    assert 3 * exported.splits <= _TABLE_ELEMENTS < len(X) * exported.splits  # both walks ran
    assert len(np.unique(reference)) > 20  # many leaves reached, not one constant
    features = torch.from_numpy(X[:5]).requires_grad_()
    assert not exported(features).requires_grad  # piecewise constant: no gradient to follow


def test_forest_export_scales_in_float32_as_scikit_learn_does():
    """Dense values a few float32 steps apart put split thresholds between neighbours, so a
    scaled value one rounding step off goes the other way (scikit-learn scales with float32
    copies of the mean and scale)."""
    rng = np.random.default_rng(2)
    steps = rng.integers(0, 400, size=(4000, 3))
    X = (np.float32(1000.3) + steps * np.spacing(np.float32(1000.3))).astype(np.float32)
    y = (steps[:, 0] + rng.integers(0, 150, 4000) > 260).astype(int)
    detector = PathDetector(model="random_forest", random_state=0).fit(X, y)
    exported = torch_detector(detector)
    np.testing.assert_allclose(exported(torch.from_numpy(X)).numpy(),
                               detector.predict_proba(X)[:, 1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [{"model": "hist_gb"},
                                    {"model": "logistic", "calibration": "isotonic"}])
def test_no_export_where_none_is_exact(data, kwargs):
    X, y = data
    assert torch_detector(PathDetector(random_state=0, **kwargs).fit(X, y)) is None
