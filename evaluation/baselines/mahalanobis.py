"""The Mahalanobis baseline: per-layer Mahalanobis scores of pooled activations (through
pytorch-ood), logistic regression on them.

Lee, Lee, Lee, Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018 (arXiv 1807.03888; reference code:
github.com/pokaxpoka/deep_Mahalanobis_detector).

Per layer l, class-conditional Gaussians with one shared covariance are fitted to the globally
average-pooled activations f_l(x) of clean training images: class means mu_{l,c} and
Sigma_l = (1/N) sum_i (f_l(x_i) - mu_{l,y_i})(f_l(x_i) - mu_{l,y_i})^T. The layer's score is

    M_l(x) = min_c (f_l(x) - mu_{l,c})^T Sigma_l^{-1} (f_l(x) - mu_{l,c})   (>= 0, higher = odd)

(the paper's confidence score with the sign flipped), optionally computed on the pre-processed
input x' = x - eps * sign(grad_x M_l(x)) (step towards the closest class; the paper's "input
pre-processing", pixel units of [0, 1] images). Logistic regression on (M_1, ..., M_L) then
separates adversarial from clean (and noisy) inputs.

pytorch-ood's :class:`~pytorch_ood.detector.Mahalanobis` (eps = 0) and
:class:`~pytorch_ood.detector.MahalanobisODIN` (eps > 0) compute one layer each. Their score is
0.5 * the squared distance under the *unnormalised* scatter matrix (plus a 1e-6 ridge), i.e.
M_l / (2 N); :class:`LayerMahalanobis` multiplies by 2 N to report M_l itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
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
# Noise magnitudes searched by the reference code (pixel units of [0, 1] images).
LEE_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


class LayerMahalanobis:
    """Mahalanobis scores M_l(x) for several layers (see module doc).

    Parameters
    ----------
    encode : x (B, C, H, W) in [0, 1] -> layer -> (B, D_l) pooled features; must be
        differentiable with respect to x when ``eps > 0``.
    layers : the layers of ``encode`` to score, in output order.
    eps : input pre-processing step (pixel units), 0 for none.
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
        from pytorch_ood.detector import Mahalanobis, MahalanobisODIN

        self.n_ = len(y)
        self.detectors_ = {}
        for name in self.layers:
            def layer_encoder(x: torch.Tensor, name: str = name) -> torch.Tensor:
                return self.encode(x)[name]
            det = (MahalanobisODIN(layer_encoder, eps=self.eps) if self.eps > 0
                   else Mahalanobis(layer_encoder))
            det.fit_features(features[name].detach().float(), y)
            self.detectors_[name] = det
        return self

    def score_features(self, features: Mapping[str, torch.Tensor]) -> np.ndarray:
        """(N, L) scores M_l without input pre-processing, from layer -> (N, D_l) features."""
        cols = []
        for name in self.layers:
            det = self.detectors_[name]
            base = det._base if hasattr(det, "_base") else det  # MahalanobisODIN wraps one
            cols.append(base.predict_features(features[name].float()).numpy())
        return np.stack(cols, axis=1).astype(np.float64) * (2 * self.n_)

    def score(self, x: torch.Tensor) -> np.ndarray:
        """(N, L) scores M_l of images x: (N, C, H, W) in [0, 1] (pre-processed if eps > 0)."""
        parts = []
        for i in range(0, len(x), self.batch_size):
            xb = x[i:i + self.batch_size]
            if self.eps == 0:
                with torch.no_grad():
                    parts.append(self.score_features(self.encode(xb)))
                continue
            cols = [self.detectors_[name].predict(xb).numpy() for name in self.layers]
            parts.append(np.stack(cols, axis=1).astype(np.float64) * (2 * self.n_))
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
                     max_select: int) -> dict[str, Any]:
    """Lee et al. on the run's sets: Gaussians from clean training images x_prof (N, C, H, W)
    in [0, 1] with classes y_prof (N,); the pre-processing step chosen by grouped 3-fold
    cross-validated AUROC on the fitting samples of at most ``max_select`` source images;
    logistic regression on the scores (fitted on the whole fitting side), evaluated with
    :func:`evaluation.protocol.evaluate_scorer`."""
    names = [*layers, PENULTIMATE]
    encode = encoder(run.model, names, pooled=True, force_open=force_open)
    run.model.eval()
    train_features = collect(encode, x_prof)
    side = fit_side(run, with_noisy=True)
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
    clf = fit_logistic(X, side, run.target_fpr, run.seed)
    out = evaluate_scorer(lambda x: clf.positive_score(maha.score(x)), clf.threshold_,
                          run.evaluation, run.fitted, run.seed)
    out["details"] = {"layers": names, "eps": eps, "cv_auroc": {str(k): v for k, v in cv.items()},
                      "cv_samples": len(sub_side.y), "gaussian_images": len(y_prof),
                      "noisy_negatives": int(side.noisy.sum())}
    return out
