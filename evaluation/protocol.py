"""The evaluation protocol: split the test images by image, fit a detector on the fitting side
(threshold on held-out clean images), and measure it per attack on the evaluation side.

- :func:`split_by_image`: fitting and evaluation halves of a test split, no image on both;
- :func:`profile_ids`: the clean training images the class path profile is fitted on;
- :func:`evaluate_variant`: fit one :class:`~detector.estimator.PathDetector` variant on path
  features of the fitting sets and measure it on the evaluation sets and benign shifts;
- :func:`evaluate_scorer`: measure any scorer of images with its threshold on the evaluation
  sets (the baselines of :mod:`evaluation.baselines`).

Only successful attacks on correctly classified images count (:mod:`evaluation.crafting`);
thresholds come from :mod:`detector.threshold`, never tuned per attack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.checkpoint import load_class_heads
from detector.estimator import PathDetector
from detector.features import PathBatch, PathProfile, fit_class_heads
from evaluation.metrics import (
    attack_metrics,
    benign_change_metrics,
    worst_benign,
    worst_case,
    worst_case_unseen_family,
)
from evaluation.sets import Sets

log = logging.getLogger(__name__)


def split_by_image(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the fitting and the evaluation half of a test split of ``n`` images: a
    permutation seeded by ``seed``, cut in two; no image is on both sides."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm[:half], perm[half:]


def profile_ids(n_train: int, seed: int, max_profile: int) -> torch.Tensor:
    """Indices of at most ``max_profile`` of ``n_train`` training images, drawn with ``seed``:
    the images (the correctly classified ones among them) the class path profile is fitted
    on."""
    return torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:max_profile]


def fit_on_sets(detector: PathDetector, profile: PathProfile, fit: Sets) -> PathDetector:
    """Fit ``detector`` on ``profile``'s features of the fitting sets. Negatives: the clean
    fitting images and their benign copies (``fit.benign``); positives: every fitting attack;
    groups are source images, and only clean images set the threshold: the held-out share of
    the clean fitting images and, if given, every image of ``fit.threshold`` (never fitted).
    Returns the detector."""
    advs = [s for s in fit.adversarial.values() if s.paths is not None]
    if not advs:
        raise ValueError("no fitting attack succeeded; use stronger --fit-attacks")
    negatives = [fit.clean_paths] + ([fit.benign.paths] if fit.benign is not None else [])
    n_clean = len(fit.y_clean)
    n_benign = len(fit.benign.y) if fit.benign is not None else 0
    X = torch.cat([*(profile.transform(p) for p in negatives),
                   *(profile.transform(s.paths) for s in advs)]).numpy()
    y = np.r_[np.zeros(n_clean + n_benign), *(np.ones(len(s.y)) for s in advs)]
    groups = np.r_[np.arange(n_clean), fit.benign.image if fit.benign is not None else [],
                   *(s.image for s in advs)]
    eligible = np.r_[np.ones(n_clean, bool), np.zeros(len(y) - n_clean, bool)]
    more = None if fit.threshold is None else profile.transform(fit.threshold.clean_paths).numpy()
    return detector.fit(X, y, groups=groups, threshold_mask=eligible,  # threshold: clean only
                        threshold_X=more)


def evaluate_variant(detector: PathDetector, profile: PathProfile, raw: bool, fit: Sets,
                     evaluation: Sets, shifts: dict[str, PathBatch], y_eval: np.ndarray,
                     fitted: Iterable[str], seed: int, *,
                     clean_correct: np.ndarray | None = None) -> dict[str, Any]:
    """Fit ``detector`` on path features of the fitting sets (:func:`fit_on_sets`) and measure
    it on the evaluation sets.

    Features: ``profile``'s path statistics (with raw gates if ``raw``). Returns clean_fpr
    (evaluation clean images flagged), attacks (label -> :func:`evaluation.metrics
    .attack_metrics`), worst (:func:`evaluation.metrics.worst_case`), worst_unseen_family
    (the same over attacks of families not fitted on, or None), benign (shift label ->
    :func:`evaluation.metrics.benign_change_metrics` of the shifted images ``shifts`` with
    labels ``y_eval`` (N,); ``clean_correct`` (N,): whether the classifier got each image
    right before the change, all True if not given), worst_benign
    (:func:`evaluation.metrics.worst_benign`) and scores (clean (Nc,) and per attack (Na,)
    adversarial probabilities, for the ROC plot).
    """
    prof = profile.with_features(include_raw=raw)
    fit_on_sets(detector, prof, fit)

    def scores(paths: PathBatch) -> np.ndarray:
        return detector.positive_score(prof.transform(paths).numpy())

    t = detector.threshold_
    clean = scores(evaluation.clean_paths)
    adv_scores = {label: scores(s.paths) if s.paths is not None else np.empty(0)
                  for label, s in evaluation.adversarial.items()}
    attacks = attack_metrics(clean, adv_scores, t, attempts=evaluation.attempts, fitted=fitted,
                             seed=seed)
    before = np.ones(len(y_eval), bool) if clean_correct is None else clean_correct
    benign = {label: benign_change_metrics(scores(paths) > t, before,
                                           paths.logits.argmax(1).numpy() == y_eval)
              for label, paths in shifts.items()}
    return {
        "clean_fpr": float((clean > t).mean()),
        "attacks": attacks,
        "worst": worst_case(attacks),
        "worst_unseen_family": worst_case_unseen_family(attacks),
        "benign": benign,
        "worst_benign": worst_benign(benign),
        "scores": {"clean": clean, "attacks": adv_scores},
    }


def evaluate_scorer(score_images: Callable[[torch.Tensor], np.ndarray], threshold: float,
                    evaluation: Sets, fitted: Iterable[str], seed: int) -> dict[str, Any]:
    """Score every evaluation set with ``score_images``: x (N, C, H, W) in [0, 1] -> (N,)
    scores (higher = adversarial), flagged above ``threshold``. Returns clean_fpr, threshold,
    attacks (label -> :func:`evaluation.metrics.attack_metrics`), worst and
    worst_unseen_family (as :func:`evaluate_variant`)."""
    clean = score_images(evaluation.x_clean)
    advs = {label: score_images(s.x) if len(s.y) else np.empty(0)
            for label, s in evaluation.adversarial.items()}
    attacks = attack_metrics(clean, advs, threshold, attempts=evaluation.attempts,
                             fitted=fitted, seed=seed)
    return {"clean_fpr": float((clean > threshold).mean()), "threshold": threshold,
            "attacks": attacks, "worst": worst_case(attacks),
            "worst_unseen_family": worst_case_unseen_family(attacks)}


CLASS_HEADS = ("auto", "checkpoint", "fit", "none")


def class_heads(choice: str, checkpoint: Path, paths: PathBatch, labels: torch.Tensor,
                 num_classes: int) -> dict[str, Any] | None:
    """The class heads of the profile, by ``choice`` (one of :data:`CLASS_HEADS`): the
    decoupling's MI heads kept in ``checkpoint`` ("checkpoint"), logistic regressions fitted on
    the clean profile ``paths`` with classes ``labels`` (N,) ("fit"), the kept ones if any else
    fitted ("auto"), or None ("none"). ValueError if "checkpoint" finds none."""
    if choice == "none":
        return None
    kept = load_class_heads(checkpoint) if choice in ("auto", "checkpoint") else None
    if choice == "checkpoint" and kept is None:
        raise ValueError(f"--class-heads checkpoint: {checkpoint} kept no class heads (decoupled "
                         "before they were saved); use --class-heads fit")
    if kept is not None:
        log.info("class evidence from the decoupling's heads in %s", checkpoint)
        return kept
    log.info("class evidence from class heads fitted on %d clean profile paths", len(labels))
    return fit_class_heads(paths, labels.numpy(), num_classes)
