"""evaluation.cost: the detector's path -> score step timed next to the network's forward pass
in one run, and its size, on a tiny decoupled digits network."""

import numpy as np
import pytest
import torch

from detector.checkpoint import load_checkpoint
from detector.estimator import PathDetector
from detector.features import PathProfile
from evaluation.cost import detector_costs, detector_size
from evaluation.sets import extract_paths
from training.data import load_dataset, to_float


@pytest.fixture(scope="module")
def fitted(tiny_decoupled_checkpoint):
    model, spec = load_checkpoint(tiny_decoupled_checkpoint)
    data = load_dataset("digits")
    x = to_float(data.x_train[:200])
    profile = PathProfile.fit(extract_paths(model, x), data.y_train[:200].numpy(),
                              spec.num_classes).with_stability(("shift",))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    X = torch.cat([profile.transform(extract_paths(model, v, stability=("shift",)))
                   for v in (x, noisy)]).numpy()
    y = np.r_[np.zeros(len(x)), np.ones(len(x))]
    detectors = {m: (profile, PathDetector(model=m, random_state=0).fit(X, y))
                 for m in ("logistic", "random_forest", "hist_gb")}
    return model, x[:4], detectors


def test_costs_are_measured_side_by_side(fitted):
    model, images, detectors = fitted
    threads = torch.get_num_threads()
    costs = detector_costs(model, images, detectors, repeats=5)
    assert torch.get_num_threads() == threads  # restored
    assert set(costs) == {"logistic", "random_forest", "hist_gb"}
    assert costs["logistic"].exported and costs["random_forest"].exported
    assert not costs["hist_gb"].exported
    for cost in costs.values():
        assert cost.score_us > 0 and cost.network_us > 0 and cost.stability_us > 0
        assert cost.score_ratio == pytest.approx(cost.score_us / cost.network_us)
    assert costs["logistic"].network_us == costs["random_forest"].network_us  # one measurement


def test_size_is_the_compressed_detector(fitted):
    _, _, detectors = fitted
    small, large = (detector_size(detectors[m][1]) for m in ("logistic", "random_forest"))
    assert 0 < small < large
