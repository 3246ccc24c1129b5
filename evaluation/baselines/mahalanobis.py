"""The Mahalanobis baseline: per-layer Mahalanobis confidence scores of pooled features, with
input pre-processing, combined by logistic regression.

Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018 (arXiv 1807.03888; reference code:
github.com/pokaxpoka/deep_Mahalanobis_detector).

Per layer l, class-conditional Gaussians with one shared (tied) covariance are fitted to the
spatially averaged features f_l(x) of clean training images: class means mu_{l,c} and

    Sigma_l = (1/N) sum_i (f_l(x_i) - mu_{l,y_i})(f_l(x_i) - mu_{l,y_i})^T

(the reference code's ``sklearn.covariance.EmpiricalCovariance`` of the class-centred features;
its precision is the pseudo-inverse, so directions without variance are ignored). The layer's
confidence score is

    M_l(x) = max_c -(f_l(x) - mu_{l,c})^T Sigma_l^{-1} (f_l(x) - mu_{l,c})  (<= 0; higher: typical)

computed on the pre-processed input x' = x + eps * sign(grad_x M_l(x)): one signed step that
brings x closer to its closest class (the reference code steps against the gradient of that
class's distance; the same thing), each layer with its own step, eps in pixel units of [0, 1]
images (the reference code divides the sign by the normalisation's std in normalised units,
which is this step in pixels), not clipped (as there). eps is chosen among :data:`LEE_EPSILONS`
on validation data; logistic regression on (M_1, ..., M_L) separates adversarial from clean (and
noisy) inputs.

Features are read where the reference code reads a ResNet: after the stem and after each stage,
post-activation (:func:`evaluation.baselines.activations.select_inputs`: what the gated convs
read, plus the pooled penultimate features).

What differs from the paper's adversarial setting, and why:

- the logistic regression is fitted on every fitting attack together (the run's fitting side,
  like every method of the comparison) and evaluated on attacks it may not have seen; the paper
  fits one per attack on adversarial samples of that attack (10 % of them) and also reports
  transfer from FGSM to the others;
- the pre-processing step is chosen by grouped cross-validated AUROC on the fitting side (the
  paper: on the same attack's validation samples);
- noisy negatives (:data:`LEE_NOISE_STD`): Gaussian noise of a fixed pixel std, the size the
  reference code adds for FGSM and DeepFool on its CIFAR-10 ResNet (0.25 / 4 in normalised
  units, times the std 0.2), a quarter of its FGSM perturbation's L2 norm. Noise of the
  adversarial example's own L2 norm (``noise="same-l2"``, Ma et al.'s LID protocol, used here
  before) is as far from the class means in the early layers as the attack, so the regression
  learns to ignore the early layers, where single-step attacks show most.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from detector.estimator import make_inner
from evaluation.baselines.activations import PENULTIMATE, collect, encoder
from evaluation.baselines.fit_side import FitSide, fit_logistic, fit_side
from evaluation.detector_run import DetectorRun
from evaluation.protocol import evaluate_scorer

log = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]
LEE_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)
"""Pre-processing magnitudes searched by the reference code (pixel units of [0, 1] images)."""
LEE_NOISE_STD = 0.0125
"""Pixel std of the reference code's noisy negatives for FGSM and DeepFool (ResNet, CIFAR-10)."""
NOISES = ("lee", "same-l2", "none")
"""Noisy negatives: Gaussian of :data:`LEE_NOISE_STD`; of each adversarial example's L2 norm
(Ma et al.); none."""


@dataclass(frozen=True)
class ClassGaussians:
    """Class-conditional Gaussians with a tied covariance on one layer's features.

    means: (K, D) class means; precision: (D, D) pseudo-inverse of the tied covariance; float64.
    """

    means: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, y: torch.Tensor) -> ClassGaussians:
        """features: (N, D) of clean training images; y: (N,) their classes, every one of
        0..K-1 present (ValueError otherwise)."""
        f = features.detach().double()
        y = torch.as_tensor(y).long()
        k = int(y.max()) + 1 if len(y) else 0
        counts = torch.bincount(y, minlength=k)
        if k == 0 or (counts == 0).any():
            raise ValueError(f"every class 0..{k - 1} needs a training sample, counts "
                             f"{counts.tolist()}")
        means = torch.zeros(k, f.shape[1], dtype=torch.float64).index_add_(0, y, f)
        means /= counts[:, None]
        centred = f - means[y]
        covariance = centred.T @ centred / len(f)  # (D, D)
        return cls(means, torch.linalg.pinv(covariance, hermitian=True))

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K) squared Mahalanobis distances of (B, D) features to every class mean, float64;
        differentiable with respect to ``features``."""
        centred = features.double()[:, None, :] - self.means[None]  # (B, K, D)
        return torch.einsum("bkd,de,bke->bk", centred, self.precision, centred)

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """(B,) Lee et al.'s score max_c -distance_c, <= 0 (higher = closer to a class)."""
        return -self.distances(features).min(dim=1).values


class LayerMahalanobis:
    """Mahalanobis confidence scores M_l(x) of several layers (see the module docstring).

    Parameters
    ----------
    encode : x (B, C, H, W) in [0, 1] -> layer -> (B, D_l) pooled features; must be
        differentiable with respect to x when ``eps > 0``.
    layers : the layers of ``encode`` to score, in output order.
    eps : input pre-processing step (pixel units), >= 0; 0 for none.
    batch_size : images per forward pass in :meth:`score`.
    """

    def __init__(self, encode: EncodeFn, layers: Sequence[str], eps: float = 0.0,
                 batch_size: int = 256) -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.encode = encode
        self.layers = list(layers)
        self.eps = eps
        self.batch_size = batch_size

    def fit(self, features: Mapping[str, torch.Tensor], y: torch.Tensor) -> LayerMahalanobis:
        """features: layer -> (N, D_l) pooled features of clean training images; y: (N,) their
        classes, all of 0..K-1 present."""
        self.gaussians_ = {name: ClassGaussians.fit(features[name], y) for name in self.layers}
        return self

    def score_features(self, features: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(N, L) scores M_l without input pre-processing, from layer -> (N, D_l) features."""
        with torch.no_grad():
            return torch.stack([self.gaussians_[name].confidence(features[name])
                                for name in self.layers], dim=1).numpy()

    def preprocess(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        """x + eps * sign(grad_x M_layer(x)) for images x: (B, C, H, W) in [0, 1]: one step
        towards the closest class of ``layer`` (the step's result may leave [0, 1] by eps)."""
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            confidence = self.gaussians_[layer].confidence(self.encode(x)[layer])
            (grad,) = torch.autograd.grad(confidence.sum(), x)
        return (x + self.eps * grad.sign()).detach()

    def score(self, x: torch.Tensor) -> np.ndarray:
        """(N, L) scores M_l of images x: (N, C, H, W) in [0, 1], each layer's on the input
        pre-processed for that layer if eps > 0."""
        parts = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i:i + self.batch_size]
            if self.eps == 0:
                with torch.no_grad():
                    parts.append(self.score_features(self.encode(xb)))
                continue
            cols = []
            for name in self.layers:
                moved = self.preprocess(xb, name)
                with torch.no_grad():
                    cols.append(self.gaussians_[name].confidence(self.encode(moved)[name]))
            parts.append(torch.stack(cols, dim=1).numpy())
        return np.concatenate(parts)


def grouped_cv_auroc(X: np.ndarray, side: FitSide, folds: int = 3) -> float:
    """Mean AUROC of scaler + logistic regression over grouped folds of the fitting side."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    aucs = []
    for train, test in GroupKFold(n_splits=folds).split(X, side.y, side.groups):
        model = make_inner("logistic", 0).fit(X[train], side.y[train].astype(int))
        aucs.append(roc_auc_score(side.y[test], model.predict_proba(X[test])[:, 1]))
    return float(np.mean(aucs))


def fit_and_evaluate(run: DetectorRun, x_prof: torch.Tensor, y_prof: torch.Tensor,
                     layers: list[str], epsilons: Sequence[float], force_open: bool,
                     max_select: int, noise: str = "lee") -> dict[str, Any]:
    """Lee et al. on the run's sets: Gaussians from clean training images x_prof (N, C, H, W)
    in [0, 1] with classes y_prof (N,) on ``layers`` (e.g.
    :func:`~evaluation.baselines.activations.select_inputs`) and the penultimate features; the
    pre-processing step chosen by grouped 3-fold cross-validated AUROC on the fitting samples of
    at most ``max_select`` source images; logistic regression on the scores (fitted on the whole
    fitting side, noisy negatives as ``noise``, one of :data:`NOISES`), evaluated with
    :func:`evaluation.protocol.evaluate_scorer`."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    names = [*layers, PENULTIMATE]
    encode = encoder(run.model, names, pooled=True, force_open=force_open)
    run.model.eval()
    train_features = collect(encode, x_prof)
    side = fit_side(run, with_noisy=noise != "none",
                    noise_std=LEE_NOISE_STD if noise == "lee" else None)
    detectors = {eps: LayerMahalanobis(encode, names, eps=eps).fit(train_features, y_prof)
                 for eps in epsilons}
    # Choose the step on a grouped subsample: every pre-processed score costs one forward and
    # one backward pass per layer.
    groups = np.unique(side.groups)
    chosen = np.random.default_rng(run.seed).permutation(groups)[:max_select]
    sub = np.isin(side.groups, chosen)
    sub_side = FitSide(side.x[torch.from_numpy(sub)], side.y[sub], side.groups[sub],
                       side.noisy[sub])
    cv: dict[float, float] = {}
    sub_scores: dict[float, np.ndarray] = {}
    if len(epsilons) > 1:
        for eps, maha in detectors.items():
            sub_scores[eps] = maha.score(sub_side.x)
            cv[eps] = grouped_cv_auroc(sub_scores[eps], sub_side)
            log.info("mahalanobis eps=%g: CV AUROC %.4f on %d fitting samples", eps, cv[eps],
                     len(sub_side.y))
    eps = max(cv, key=lambda e: cv[e]) if cv else epsilons[0]  # first of equals: smallest
    maha = detectors[eps]
    X = sub_scores[eps] if sub.all() and eps in sub_scores else maha.score(side.x)
    clf = fit_logistic(X, side, run.seed, **run.threshold_rule)
    out = evaluate_scorer(lambda x: clf.positive_score(maha.score(x)), clf.threshold_,
                          run.evaluation, run.fitted, run.seed)
    out["details"] = {"layers": names, "eps": eps, "cv_auroc": {str(k): v for k, v in cv.items()},
                      "cv_samples": len(sub_side.y), "gaussian_images": len(y_prof),
                      "noise": noise, "noisy_negatives": int(side.noisy.sum())}
    return out
