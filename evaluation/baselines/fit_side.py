"""The fitting samples of the score-based baselines (Mahalanobis, LID), and their logistic
regression thresholded like every detector of the project.

As in both papers, the fitting side holds the clean fitting images, optionally noisy versions
of each fitting adversarial example's source image, labelled clean, then every fitting attack;
samples are grouped by source image. The noise: Gaussian of each adversarial example's L2
distortion (:func:`evaluation.shifts.noisy_like`, Ma et al.'s protocol), or of a fixed pixel std
(Lee et al.'s reference code).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from detector.estimator import make_inner
from detector.threshold import FPRThresholdClassifier
from evaluation.detector_run import DetectorRun
from evaluation.shifts import gaussian_noise, noisy_like


@dataclass
class FitSide:
    """The fitting samples of the score-based baselines.

    x: (N, C, H, W) clean, noisy and adversarial images in [0, 1]; y: (N,) 1 = adversarial;
    groups: (N,) source image ids; noisy: (N,) True for noisy negatives.
    """

    x: torch.Tensor
    y: np.ndarray
    groups: np.ndarray
    noisy: np.ndarray


def fit_side(run: DetectorRun, with_noisy: bool, noise_std: float | None = None) -> FitSide:
    """Clean fitting images, (optionally) noisy versions of the adversarial examples' source
    images, then every fitting attack. ``noise_std``: None for noise of each adversarial
    example's L2 distortion, else the pixel std of the noise (> 0); noisy images are clipped
    to [0, 1] and seeded by the run's seed."""
    fit = run.fit
    n = len(fit.y_clean)
    advs = [s for s in fit.adversarial.values() if len(s.y)]
    x_adv = torch.cat([s.x for s in advs])
    src = np.concatenate([s.image for s in advs])
    xs, ys, gs, ns = [fit.x_clean], [np.zeros(n)], [np.arange(n)], [np.zeros(n, bool)]
    if with_noisy:
        if noise_std is None:
            xs.append(noisy_like(fit.x_clean[src], x_adv, run.seed))
        elif noise_std > 0:
            g = torch.Generator().manual_seed(run.seed)
            xs.append(gaussian_noise(fit.x_clean[src], noise_std, g))
        else:
            raise ValueError(f"noise_std must be > 0 (or None), got {noise_std}")
        ys.append(np.zeros(len(src)))
        gs.append(src)
        ns.append(np.ones(len(src), bool))
    xs.append(x_adv)
    ys.append(np.ones(len(src)))
    gs.append(src)
    ns.append(np.zeros(len(src), bool))
    return FitSide(torch.cat(xs), np.concatenate(ys), np.concatenate(gs), np.concatenate(ns))


def fit_logistic(X: np.ndarray, side: FitSide, seed: int, *, target_fpr: float,
                 fpr_confidence: float | None = None) -> FPRThresholdClassifier:
    """Scaler + logistic regression on features X: (N, F) of ``side``, thresholded at
    ``target_fpr`` (with ``fpr_confidence``, see :func:`detector.threshold.threshold_at_fpr`)
    on clean images held out from fitting (grouped by image, as
    :class:`~detector.estimator.PathDetector` does: a held-out image's noisy and adversarial
    versions are not fitted either; noisy negatives never set the threshold).

    The result's ``positive_score`` maps (M, F) features to (M,) adversarial probabilities in
    [0, 1]; ``threshold_`` and ``clean_fpr_`` are the threshold and the FPR realised there.
    """
    clf = FPRThresholdClassifier(make_inner("logistic", seed), target_fpr=target_fpr,
                                 fpr_confidence=fpr_confidence, random_state=seed)
    return clf.fit(X, side.y, groups=side.groups, threshold_mask=~side.noisy)
