"""evaluation.baselines.deep_knn: neighbours, nonconformity and calibrated credibility on hand-made
cases (Papernot and McDaniel 2018, Algorithm 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.baselines.deep_knn import DeepKNN


def two_layers() -> DeepKNN:
    """Six training points, classes 0, 0, 1, 1, 2, 2, on a line in each of two layers; the
    second layer orders them differently."""
    train = {"a": torch.tensor([[0.0], [1.0], [10.0], [11.0], [20.0], [21.0]]),
             "b": torch.tensor([[20.0], [21.0], [0.0], [1.0], [10.0], [11.0]])}
    return DeepKNN(k=2).fit(train, torch.tensor([0, 0, 1, 1, 2, 2]), num_classes=3)


def test_nonconformity_counts_neighbours_of_other_classes_over_layers() -> None:
    dknn = two_layers()
    # query 0: layer a near 0.4 -> points 0, 1 (class 0, 0); layer b near 0.6 -> 2, 3 (1, 1)
    # query 1: layer a at 10.4 -> class 1, 1; layer b at 10.2 -> class 2, 2
    # query 2: layer a at 5.4 -> points 1 (class 0, distance 4.4), 2 (class 1, 4.6);
    #          layer b at 0.4 -> class 1, 1
    query = {"a": torch.tensor([[0.4], [10.4], [5.4]]), "b": torch.tensor([[0.6], [10.2], [0.4]])}
    labels = dknn.neighbour_labels(query)
    assert labels.shape == (3, 2, 2)
    assert sorted(labels[2, 0].tolist()) == [0, 1] and labels[2, 1].tolist() == [1, 1]
    # alpha(x, j) = 4 neighbours - those of class j
    np.testing.assert_array_equal(dknn.nonconformity(query).numpy(),
                                  [[2, 2, 4], [4, 2, 2], [3, 1, 4]])


def test_credibility_is_the_calibrated_p_value_of_the_best_class() -> None:
    dknn = two_layers()
    # calibration: true classes 0 and 1 whose layers agree (alpha 0) and one that half agrees
    calibration = {"a": torch.tensor([[0.5], [10.5], [0.5]]),
                   "b": torch.tensor([[20.5], [0.5], [0.5]])}
    dknn.calibrate(calibration, torch.tensor([0, 1, 0]))
    np.testing.assert_array_equal(dknn.calibration_, [0, 0, 2])
    query = {"a": torch.tensor([[0.4], [10.4], [5.4], [20.5]]),
             "b": torch.tensor([[20.6], [10.2], [0.4], [10.5]])}
    # alphas: [[0, 4, 4], [4, 2, 2], [3, 1, 4], [4, 4, 0]]; p_j = share of {0, 0, 2} >= alpha
    p = dknn.p_values(query)
    np.testing.assert_allclose(p, [[1, 0, 0], [0, 1 / 3, 1 / 3], [0, 1 / 3, 0], [0, 0, 1]])
    predicted, credibility = dknn.credibility(query)
    np.testing.assert_array_equal(predicted[[0, 2, 3]], [0, 1, 2])
    np.testing.assert_allclose(credibility, [1, 1 / 3, 1 / 3, 1])
    np.testing.assert_allclose(dknn.score(query), [0, 2 / 3, 2 / 3, 0])


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="k must be"):
        DeepKNN(k=0)
    with pytest.raises(ValueError, match="at least k"):
        DeepKNN(k=7).fit({"a": torch.zeros(6, 1)}, torch.zeros(6), num_classes=2)
    with pytest.raises(ValueError, match="labels"):
        DeepKNN(k=1).fit({"a": torch.zeros(2, 1)}, torch.tensor([0, 3]), num_classes=2)
    with pytest.raises(ValueError, match="no calibration"):
        two_layers().calibrate({"a": torch.zeros(0, 1), "b": torch.zeros(0, 1)},
                               torch.zeros(0))
