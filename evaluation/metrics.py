"""Detection metrics: AUROC, TPR at a false-positive rate and at a threshold, balanced accuracy,
and the worst case over attacks.

Scores are detector outputs, higher = more adversarial; "clean" and "adversarial" score arrays
are compared as a binary ranking problem (clean = 0, adversarial = 1). An input is flagged when
its score is strictly above the threshold (:func:`detector.threshold.threshold_at_fpr`).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def roc(clean: np.ndarray, adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) of the ROC curve of clean (Nc,) against
    adversarial (Na,) scores, both non-empty; rates in [0, 1], FPR ascending."""
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(clean)), np.ones(len(adv))], np.r_[clean, adv])
    return fpr, tpr


def tpr_at_fpr(clean: np.ndarray, adv: np.ndarray, fpr: float) -> float:
    """Largest TPR in [0, 1] whose FPR (on ``clean`` scores) is at most ``fpr``, read off the
    ROC curve (every threshold between observed scores); clean (Nc,), adv (Na,) non-empty."""
    f, t = roc(clean, adv)
    return float(t[f <= fpr].max())


def detection_metrics(clean: np.ndarray, adv: np.ndarray, threshold: float,
                      seed: int = 0) -> dict[str, float]:
    """Scores of clean (Nc,) and adversarial (Na,) inputs -> metrics; {"n_adv": 0} if Na = 0.

    auroc; tpr_at_5/1: TPR at 5% / 1% FPR read off this ROC; tpr_at_threshold: share of
    adversarial inputs flagged at ``threshold``; balanced_accuracy: detection accuracy at the
    threshold on a balanced set (min(Nc, Na) of each, drawn with ``seed``). All in [0, 1].
    """
    if len(adv) == 0:
        return {"n_adv": 0}
    labels = np.r_[np.zeros(len(clean)), np.ones(len(adv))]
    rng = np.random.default_rng(seed)
    n = min(len(clean), len(adv))
    c = rng.choice(clean, n, replace=False)
    a = rng.choice(adv, n, replace=False)
    return {
        "n_adv": len(adv),
        "auroc": float(roc_auc_score(labels, np.r_[clean, adv])),
        "tpr_at_5": tpr_at_fpr(clean, adv, 0.05),
        "tpr_at_1": tpr_at_fpr(clean, adv, 0.01),
        "tpr_at_threshold": float((adv > threshold).mean()),
        "balanced_accuracy": float(((c <= threshold).sum() + (a > threshold).sum()) / (2 * n)),
    }


def worst_case(attacks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Smallest AUROC and TPR@5%FPR over the attacks with at least one adversarial example, and
    the attack of each; ``attacks``: label -> :func:`detection_metrics` (and more keys).
    Ties go to the first attack in order; ValueError if no attack has an adversarial example."""
    measured = {k: v for k, v in attacks.items() if v.get("n_adv", 0) > 0}
    if not measured:
        raise ValueError(f"no successful adversarial example for any attack of "
                         f"{list(attacks)}: no worst case")
    auc = min(measured, key=lambda k: measured[k]["auroc"])
    tpr = min(measured, key=lambda k: measured[k]["tpr_at_5"])
    return {"auroc": measured[auc]["auroc"], "auroc_attack": auc,
            "tpr_at_5": measured[tpr]["tpr_at_5"], "tpr_at_5_attack": tpr}


def attack_metrics(clean: np.ndarray, advs: Mapping[str, np.ndarray], threshold: float, *,
                   attempts: Mapping[str, int], fitted: Container[str], seed: int
                   ) -> dict[str, dict[str, Any]]:
    """Per attack label: whether it was fitted, its success rate (successful examples over
    ``attempts``) and :func:`detection_metrics` of its scores ``advs[label]`` (Na,) against
    the clean scores (Nc,)."""
    return {label: {"fitted": label in fitted, "success": len(a) / max(attempts[label], 1),
                    **detection_metrics(clean, a, threshold, seed)}
            for label, a in advs.items()}
