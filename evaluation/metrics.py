"""Detection metrics: AUROC, TPR at a false-positive rate and at a threshold, balanced accuracy,
the worst case over attacks (all, and those of families not fitted on), and false alarms on
benign changes of clean images.

Scores are detector outputs, higher = more adversarial; "clean" and "adversarial" score arrays
are compared as a binary ranking problem (clean = 0, adversarial = 1). An input is flagged when
its score is strictly above the threshold (:func:`detector.threshold.threshold_at_fpr`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from evaluation.catalogue import family_of_label

#: A benign change "keeps the classifier's accuracy" when it drops it by at most this much.
ACCURACY_TOLERANCE = 0.02


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
    """Smallest AUROC, TPR@5%FPR and TPR at the threshold over the attacks with at least one
    adversarial example, and the attack of each; ``attacks``: label ->
    :func:`detection_metrics` (and more keys). Ties go to the first attack in order;
    ValueError if no attack has an adversarial example."""
    measured = {k: v for k, v in attacks.items() if v.get("n_adv", 0) > 0}
    if not measured:
        raise ValueError(f"no successful adversarial example for any attack of "
                         f"{list(attacks)}: no worst case")
    out: dict[str, Any] = {}
    for key in ("auroc", "tpr_at_5", "tpr_at_threshold"):
        worst = min(measured, key=lambda k: measured[k][key])
        out[key], out[f"{key}_attack"] = measured[worst][key], worst
    return out


def worst_case_unseen_family(attacks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """:func:`worst_case` over the attacks whose family was not fitted on (``family_fitted``
    False, see :func:`attack_metrics`), with ``families``: those families in order; None if no
    such attack has an adversarial example."""
    unseen = {k: v for k, v in attacks.items()
              if not v["family_fitted"] and v.get("n_adv", 0) > 0}
    if not unseen:
        return None
    families = list(dict.fromkeys(v["family"] for v in unseen.values()))
    return {**worst_case(unseen), "families": families}


def attack_metrics(clean: np.ndarray, advs: Mapping[str, np.ndarray], threshold: float, *,
                   attempts: Mapping[str, int], fitted: Iterable[str],
                   seed: int) -> dict[str, dict[str, Any]]:
    """Per attack label: its family (:func:`evaluation.catalogue.family_of_label`), whether it
    was fitted (the same label in ``fitted``), whether its family was (a fitted label of the
    same family), the images it ran on (``attempts``), its success rate (successful examples
    over the attempts) and :func:`detection_metrics` of its scores ``advs[label]`` (Na,)
    against the clean scores (Nc,)."""
    fitted = set(fitted)
    fitted_families = {family_of_label(label) for label in fitted}
    return {label: {"family": family_of_label(label), "fitted": label in fitted,
                    "family_fitted": family_of_label(label) in fitted_families,
                    "images": attempts[label], "success": len(a) / max(attempts[label], 1),
                    **detection_metrics(clean, a, threshold, seed)}
            for label, a in advs.items()}


def benign_change_metrics(flagged: np.ndarray, correct_before: np.ndarray,
                          correct_after: np.ndarray) -> dict[str, Any]:
    """False alarms on one benign change of N clean images, all (N,) bool: ``flagged``, the
    changed image flagged at the threshold; ``correct_before`` / ``correct_after``, the
    classifier right on the image before / after the change.

    accuracy_clean / accuracy: the classifier's accuracy before / after; accuracy_drop: their
    difference (negative if it rose); within_tolerance: the drop is at most
    :data:`ACCURACY_TOLERANCE` (2 points); n: images right before and after, on which
    ``flagged`` is the share flagged (None if n = 0).
    """
    kept = correct_before & correct_after
    before, after = float(correct_before.mean()), float(correct_after.mean())
    return {"accuracy_clean": before, "accuracy": after, "accuracy_drop": before - after,
            "within_tolerance": bool(before - after <= ACCURACY_TOLERANCE + 1e-12),
            "n": int(kept.sum()),
            "flagged": float(flagged[kept].mean()) if kept.any() else None}


def worst_benign(benign: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The largest false-alarm share over the benign changes that keep the classifier's
    accuracy (``within_tolerance``; ``benign``: label -> :func:`benign_change_metrics`), and
    its change; None if there is none."""
    kept = {k: v for k, v in benign.items()
            if v["within_tolerance"] and v["flagged"] is not None}
    if not kept:
        return None
    worst = max(kept, key=lambda k: kept[k]["flagged"])
    return {"flagged": kept[worst]["flagged"], "change": worst}
