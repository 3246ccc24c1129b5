"""The Deep k-NN baseline: class consistency of the nearest training points, layer by layer,
with a conformal calibration.

Papernot, McDaniel, "Deep k-Nearest Neighbors: Towards Confident, Interpretable and Robust Deep
Learning", arXiv 1803.04765 (2018), Algorithm 1.

For every layer l, the k training points whose (pooled) representation is nearest to the
input's are found (Euclidean; the paper uses locality-sensitive hashing to approximate the
cosine neighbours, a speed-up, not part of the method). The nonconformity of the input with a
candidate class j is the number of those neighbours, over all layers, whose label differs from
j:

    alpha(x, j) = sum_l |{ i in Omega_l(x) : y_i != j }|   in 0..L*k.

Calibration: on held-out clean images with their true labels, A = { alpha(x, y) }. An input's
empirical p-value for class j is the share of A at least as nonconforming,
p_j(x) = |{ a in A : a >= alpha(x, j) }| / |A|; the Deep k-NN prediction is the class with the
largest p-value and its credibility is that p-value. An input whose layers disagree with each
other and with every class (adversarial examples, the paper argues) has low credibility; the
detector score is 1 - credibility, in [0, 1].

Here: the training points are a bounded set of clean training images (the run's profile
images, correctly classified), the layers are those of the Mahalanobis baseline plus the logits,
the calibration set is the clean fitting images not held out for the threshold (the same
held-out images as the other baselines), and nothing is fitted on adversarial examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from detector.threshold import FPRThresholdClassifier, held_out
from evaluation.baselines.activations import LOGITS, PENULTIMATE, collect, encoder
from evaluation.detector_run import DetectorRun
from evaluation.protocol import evaluate_scorer

THRESHOLD_FRACTION = 0.25
"""Share of the clean fitting images held out for the threshold (as
:class:`~detector.threshold.FPRThresholdClassifier`'s default); the rest calibrates."""


class DeepKNN:
    """k nearest training representations per layer, nonconformity and calibrated credibility.

    Parameters
    ----------
    k : neighbours per layer (paper: 75), at most the number of training points.
    batch_size : queries per distance computation.
    """

    def __init__(self, k: int = 75, batch_size: int = 512) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.batch_size = batch_size

    def fit(self, features: Mapping[str, torch.Tensor], y: torch.Tensor,
            num_classes: int) -> DeepKNN:
        """features: layer -> (N, D_l) representations of training images; y: (N,) their
        classes in 0..num_classes-1; N >= k."""
        y = torch.as_tensor(y).long()
        if len(y) < self.k:
            raise ValueError(f"need at least k = {self.k} training points, got {len(y)}")
        if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
            raise ValueError(f"labels must be in 0..{num_classes - 1}")
        self.layers_ = list(features)
        self.train_ = {name: f.detach().float() for name, f in features.items()}
        self.labels_ = y
        self.num_classes_ = num_classes
        return self

    def neighbour_labels(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, L, k) labels of the k nearest training points of each layer, for layer -> (B,
        D_l) representations."""
        out = []
        for name in self.layers_:
            q = features[name].detach().float()
            parts = []
            for i in range(0, len(q), self.batch_size):
                dist = torch.cdist(q[i:i + self.batch_size], self.train_[name])  # (b, N)
                parts.append(dist.topk(self.k, dim=1, largest=False).indices)
            out.append(self.labels_[torch.cat(parts)])
        return torch.stack(out, dim=1)

    def nonconformity(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, K) alpha(x, j): neighbours over all layers whose label is not j, in 0..L*k."""
        labels = self.neighbour_labels(features).flatten(1)  # (B, L*k)
        counts = torch.zeros(len(labels), self.num_classes_, dtype=torch.long)
        counts.scatter_add_(1, labels, torch.ones_like(labels))
        return labels.shape[1] - counts

    def calibrate(self, features: Mapping[str, torch.Tensor], y: torch.Tensor) -> DeepKNN:
        """Calibration nonconformities alpha(x, y) of held-out clean images: layer -> (M, D_l)
        representations, y: (M,) true classes, M >= 1."""
        y = torch.as_tensor(y).long()
        if len(y) == 0:
            raise ValueError("no calibration images")
        alpha = self.nonconformity(features).gather(1, y[:, None])[:, 0]
        self.calibration_ = torch.sort(alpha).values.numpy()
        return self

    def p_values(self, features: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(B, K) empirical p-values p_j(x) in [0, 1]: share of the calibration
        nonconformities >= alpha(x, j)."""
        alpha = self.nonconformity(features).numpy()
        below = np.searchsorted(self.calibration_, alpha, side="left")  # calibration < alpha
        return 1.0 - below / len(self.calibration_)

    def credibility(self, features: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(B,) Deep k-NN predictions (largest p-value) and their credibility (that p-value)."""
        p = self.p_values(features)
        return p.argmax(axis=1), p.max(axis=1)

    def score(self, features: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(B,) adversarial score 1 - credibility, in [0, 1]."""
        return 1.0 - self.credibility(features)[1]


def fit_and_evaluate(run: DetectorRun, x_train: torch.Tensor, y_train: torch.Tensor,
                     layers: list[str], k: int, force_open: bool) -> dict[str, Any]:
    """Papernot and McDaniel on the run's sets: neighbours among clean training images x_train
    (N, C, H, W) in [0, 1] with classes y_train (N,) on ``layers`` plus the penultimate features
    and the logits (pooled), calibrated on the clean fitting images that set no threshold; the
    threshold at the run's target FPR on the held-out ones, evaluated with
    :func:`evaluation.protocol.evaluate_scorer`."""
    names = [*layers, PENULTIMATE, LOGITS]
    encode = encoder(run.model, names, pooled=True, force_open=force_open)
    run.model.eval()
    dknn = DeepKNN(k=k).fit(collect(encode, x_train), y_train, run.spec.num_classes)
    fit = run.fit
    n = len(fit.y_clean)
    # The held-out clean images of every other baseline: FPRThresholdClassifier's rule on the
    # clean fitting images (one group each) with the same fraction and seed.
    images = np.arange(n)
    held = held_out(images, images, THRESHOLD_FRACTION, run.seed)
    calibration = np.setdiff1d(images, held)
    dknn.calibrate(collect(encode, fit.x_clean[calibration]), fit.y_clean[calibration])

    def score_images(x: torch.Tensor) -> np.ndarray:
        return dknn.score(collect(encode, x))

    # A callable scorer is only thresholded: on the clean images given, not the adversarial.
    x_adv = torch.cat([s.x for s in fit.adversarial.values()])
    threshold = FPRThresholdClassifier(score_images, **run.threshold_rule).fit(
        torch.cat([fit.x_clean[held], x_adv]),
        np.r_[np.zeros(len(held)), np.ones(len(x_adv))])
    out = evaluate_scorer(score_images, threshold.threshold_, run.evaluation, run.fitted,
                          run.seed)
    out["details"] = {"layers": names, "k": k, "train_images": len(y_train),
                      "calibration_images": len(calibration)}
    return out
