"""Pure pieces of the baselines (evaluation.baselines): LID estimator, Mahalanobis scores, the
fitting side and its thresholded logistic regression; noisy negatives; source images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.threshold import threshold_at_fpr
from evaluation.baselines.fit_side import FitSide, fit_logistic
from evaluation.baselines.lid import LIDFeatures, lid_mle
from evaluation.detector_run import DetectorRun
from evaluation.sets import source_images
from evaluation.shifts import noisy_like


def test_lid_mle_hand_made() -> None:
    # k = 2, distances (1, e): mean of log(r_i / r_k) = (-1 + 0) / 2, LID = 2.
    # Unsorted rows and excluded (inf) references give the same answer.
    dist = np.array([[1.0, math.e, 7.0], [math.inf, math.e, 1.0]])
    np.testing.assert_allclose(lid_mle(dist, k=2), [2.0, 2.0])
    # r_i = i, k = 3: -1 / mean(log(1/3), log(2/3), 0)
    expected = -1.0 / np.mean(np.log([1 / 3, 2 / 3, 1.0]))
    np.testing.assert_allclose(lid_mle(np.array([[3.0, 1.0, 2.0, 9.0]]), k=3), [expected])
    # Equal distances: huge but finite; zero distances: clipped, not NaN.
    assert np.isfinite(lid_mle(np.ones((1, 4)), k=3)).all()
    assert np.isfinite(lid_mle(np.zeros((1, 4)), k=3)).all()
    with pytest.raises(ValueError):
        lid_mle(np.array([[1.0, math.inf]]), k=2)


def test_lid_features_track_intrinsic_dimension() -> None:
    g = torch.Generator().manual_seed(0)

    def cloud(dim: int, n: int) -> torch.Tensor:  # uniform in a dim-cube inside 12-d space
        x = torch.zeros(n, 12)
        x[:, :dim] = torch.rand(n, dim, generator=g)
        return x

    ref = {"low": cloud(2, 400), "high": cloud(8, 400)}
    lid = LIDFeatures(k=20, batch_size=200, seed=0).fit(ref, np.arange(400))
    est = lid.transform({"low": cloud(2, 200), "high": cloud(8, 200)}).mean(0)
    assert 1.5 < est[0] < 3.0
    assert est[1] > 2 * est[0]


def test_lid_features_exclude_same_group() -> None:
    ref = {"a": torch.randn(30, 5)}
    lid = LIDFeatures(k=5, batch_size=30, seed=0).fit(ref, np.arange(30))
    query = {"a": ref["a"][:3]}  # exact copies of references 0..2
    own = lid.transform(query, groups=np.arange(3))  # the copies are excluded
    blind = lid.transform(query)  # zero distance to themselves: tiny estimates
    assert (own > 0.5).all()
    assert (blind < 0.5).all()
    with pytest.raises(ValueError):
        LIDFeatures(k=20, batch_size=20)


def test_noisy_like_matches_l2_distortion() -> None:
    x = torch.full((4, 1, 6, 6), 0.5)
    adv = x.clone()
    adv[:, :, 0, 0] += torch.tensor([0.05, 0.1, 0.2, 0.0]).view(4, 1)
    noisy = noisy_like(x, adv, seed=0)
    np.testing.assert_allclose((noisy - x).flatten(1).norm(dim=1).numpy(),
                               [0.05, 0.1, 0.2, 0.0], atol=1e-6)


def _manual_distances(train: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(N, K) (z - mu_c)^T Sigma^-1 (z - mu_c), Sigma the shared within-class covariance."""
    mu = np.stack([train[y == c].mean(0) for c in np.unique(y)])
    centred = train - mu[y]
    precision = np.linalg.inv(centred.T @ centred / len(train))
    return np.stack([np.einsum("nd,de,ne->n", z - m, precision, z - m) for m in mu], axis=1)


def _three_classes() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    return torch.randn(60, 4, generator=g, dtype=torch.float64) + 2.0 * y[:, None], y


def test_tied_covariance_is_sklearns_empirical_covariance_of_centred_features() -> None:
    from sklearn.covariance import EmpiricalCovariance

    from evaluation.baselines.mahalanobis import ClassGaussians

    train, y = _three_classes()
    gaussians = ClassGaussians.fit(train.float(), y)
    means = np.stack([train[y == c].mean(0).numpy() for c in range(3)])
    np.testing.assert_allclose(gaussians.means.numpy(), means, rtol=1e-6)
    # the reference code: EmpiricalCovariance of the class-centred features, its precision_
    reference = EmpiricalCovariance(assume_centered=False).fit(train.numpy() - means[y.numpy()])
    np.testing.assert_allclose(gaussians.precision.numpy(), reference.precision_, rtol=1e-5)
    # a direction without variance (a dead feature) is ignored, not blown up
    dead = torch.cat([train, torch.zeros(60, 1, dtype=torch.float64)], dim=1)
    distances = ClassGaussians.fit(dead, y).distances(dead[:5] + torch.tensor([0, 0, 0, 0, 5.0]))
    np.testing.assert_allclose(distances.numpy(), gaussians.distances(train[:5]).numpy(),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="every class"):
        ClassGaussians.fit(train, torch.where(y == 1, 2, y))  # class 1 missing


def test_mahalanobis_score_is_the_largest_negative_distance() -> None:
    from evaluation.baselines.mahalanobis import LayerMahalanobis

    train, y = _three_classes()
    x = torch.rand(7, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 4

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:  # features: the 4 pixels
        return {"f": images.flatten(1) * 1.0}

    plain = LayerMahalanobis(encode, ["f"]).fit({"f": train.float()}, y)
    expected = -_manual_distances(train.numpy(), y.numpy(), x.flatten(1).double().numpy())
    np.testing.assert_allclose(plain.score(x)[:, 0], expected.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(plain.score_features({"f": x.flatten(1)})[:, 0],
                               expected.max(axis=1), rtol=1e-5)


def test_preprocessing_steps_towards_the_closest_class_and_raises_the_score() -> None:
    from evaluation.baselines.mahalanobis import LayerMahalanobis

    train, y = _three_classes()
    x = torch.rand(7, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 4

    def encode(images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"f": images.flatten(1) * 1.0}

    eps = 0.01
    pre = LayerMahalanobis(encode, ["f"], eps=eps).fit({"f": train.float()}, y)
    z = x.flatten(1).double().numpy()
    tr, yy = train.numpy(), y.numpy()
    mu = np.stack([tr[yy == c].mean(0) for c in range(3)])
    precision = np.linalg.inv((tr - mu[yy]).T @ (tr - mu[yy]) / 60)
    closest = _manual_distances(tr, yy, z).argmin(axis=1)
    grad = -2 * (z - mu[closest]) @ precision  # gradient of the score -distance to that class
    moved = z + eps * np.sign(grad)
    np.testing.assert_allclose(pre.preprocess(x, "f").flatten(1).numpy(), moved, rtol=1e-6)
    np.testing.assert_allclose(pre.score(x)[:, 0],
                               -_manual_distances(tr, yy, moved).min(axis=1), rtol=1e-5)
    plain = LayerMahalanobis(encode, ["f"]).fit({"f": train.float()}, y)
    assert (pre.score(x)[:, 0] > plain.score(x)[:, 0]).all()  # closer to a class after it
    with pytest.raises(ValueError, match="eps"):
        LayerMahalanobis(encode, ["f"], eps=-0.1)


def test_mahalanobis_reads_what_the_gated_convs_read() -> None:
    """On a ResNet: the stem's output, each stage's output (residual sum and ReLU included),
    and, in the last stage, the last block's inner activation; no shortcut conv twice."""
    from detector.checkpoint import ModelSpec
    from evaluation.baselines.activations import encoder, select_inputs

    model = ModelSpec("resnet20", (3, 32, 32), tuple("0123456789"),
                      decoupled=True).build().eval()
    assert select_inputs(model, (3, 32, 32)) == [
        "layer1.0.conv1:input", "layer2.0.conv1:input", "layer3.0.conv1:input",
        "layer3.2.conv2:input"]
    every = select_inputs(model, (3, 32, 32), max_layers=100)
    assert len(every) == 18 and not any("downsample" in n for n in every)
    stage = {}
    model.layer1.register_forward_hook(lambda module, inputs, out: stage.setdefault("out", out))
    with torch.no_grad():
        read = encoder(model, ["layer2.0.conv1:input"], pooled=True)(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(read["layer2.0.conv1:input"], stage["out"].mean(dim=(2, 3)))


def test_fit_logistic_thresholds_on_held_out_clean_images_only() -> None:
    # 40 clean images (groups 0..39), noisy and adversarial versions of the first 20.
    rng = np.random.default_rng(0)
    n, m = 40, 20
    y = np.r_[np.zeros(n + m), np.ones(m)]
    groups = np.r_[np.arange(n), np.arange(m), np.arange(m)]
    noisy = np.r_[np.zeros(n, bool), np.ones(m, bool), np.zeros(m, bool)]
    X = rng.normal(size=(len(y), 3)) + 2.0 * y[:, None]
    side = FitSide(torch.zeros(len(y), 1, 2, 2), y, groups, noisy)
    clf = fit_logistic(X, side, 0, target_fpr=0.1)
    fit_idx, hold = clf._split(y == 1, groups, ~noisy)
    assert len(hold) == 10 and not noisy[hold].any() and (y[hold] == 0).all()
    assert not np.isin(groups[fit_idx], groups[hold]).any()  # held-out images: no version fits
    held_scores = clf.positive_score(X[hold])
    assert (clf.threshold_, clf.clean_fpr_) == pytest.approx(threshold_at_fpr(held_scores, 0.1))


def test_source_images_are_the_nearest_clean_image_of_the_same_class() -> None:
    clean = torch.rand(6, 1, 3, 3)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    adv = (clean[[4, 0, 3]] + 0.05 * torch.randn(3, 1, 3, 3)).clamp(0, 1)
    np.testing.assert_array_equal(source_images(adv, labels[[4, 0, 3]], clean, labels),
                                  [4, 0, 3])
    assert source_images(clean[:0], labels[:0], clean, labels).shape == (0,)


@pytest.mark.parametrize(("config", "further", "expected"), [
    ({"target_fpr": 0.05}, 0, None),  # runs before the option
    ({"target_fpr": 0.05, "fpr_confidence": 0.9}, 0, 0.9),  # same held-out images: same rule
    ({"target_fpr": 0.05, "fpr_confidence": 0.9}, 2400, None),  # images the baselines lack
])
def test_baselines_take_the_runs_confidence_bound_only_on_the_same_images(config, further,
                                                                          expected):
    run = DetectorRun(directory=Path("."), config=config,
                      metrics={"config": config, "n_threshold_images": further}, model=None,
                      spec=None, fit=None, evaluation=None, fitted=set())
    assert run.threshold_rule == {"target_fpr": 0.05, "fpr_confidence": expected}
