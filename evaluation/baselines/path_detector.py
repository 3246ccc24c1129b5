"""The computation-path detector itself ("ours") in the baseline comparison: the run's
:class:`~detector.estimator.PathDetector` refitted exactly as ``training.fit_detector`` fits it
(:func:`evaluation.protocol.evaluate_variant`) with the run's settings (class heads, stability
transforms, raw features, noise and benign negatives), so its numbers reproduce the run's."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from detector.estimator import PathDetector
from detector.features import PathProfile
from evaluation.detector_run import DetectorRun, resolve_path
from evaluation.protocol import class_heads, evaluate_variant
from evaluation.sets import attach_stability, extract_paths
from evaluation.shifts import add_benign_negatives, add_noise_negatives

log = logging.getLogger(__name__)


def fit_and_evaluate(run: DetectorRun, x_prof: torch.Tensor, y_prof: torch.Tensor
                     ) -> dict[str, Any]:
    """Profile from clean training images x_prof (N, C, H, W) in [0, 1] with classes y_prof
    (N,), the run's inner model and features; ``details`` records the largest AUROC difference
    to the run's own numbers (0 when the run is reproduced)."""
    config = run.config
    paths = extract_paths(run.model, x_prof)
    checkpoint = Path(resolve_path(config["checkpoint"]))
    heads = class_heads(config.get("class_heads", "none"), checkpoint, paths, y_prof,
                        run.spec.num_classes)
    stability = tuple(config.get("stability", ()))
    profile = PathProfile.fit(paths, y_prof.numpy(), run.spec.num_classes,
                              heads=heads).with_stability(stability)
    fit, evaluation = replace(run.fit), replace(run.evaluation)  # the run's sets stay as read
    reach = float(config.get("negative_reach", 1.0))
    if config.get("noise_negatives"):
        add_noise_negatives(run.model, fit, seed=run.seed + 2, reach=reach)
    if config.get("benign_negatives"):
        add_benign_negatives(run.model, fit, seed=run.seed + 3, reach=reach,
                             copies=int(config["benign_negatives"]))  # older runs: True
    if stability:
        fit.adversarial = {k: replace(v) for k, v in fit.adversarial.items()}
        evaluation.adversarial = {k: replace(v) for k, v in evaluation.adversarial.items()}
        for sets in (fit, evaluation):
            attach_stability(run.model, sets, stability)
    detector = PathDetector(model=config["detector"], **run.threshold_rule,
                            random_state=run.seed)
    res = evaluate_variant(detector, profile, bool(config["raw_features"]), fit,
                           evaluation, {}, evaluation.y_clean.numpy(), run.fitted,
                           seed=run.seed)
    out = {k: v for k, v in res.items() if k not in ("scores", "benign")}
    out["threshold"] = detector.threshold_
    out["details"] = {"detector": config["detector"],
                      "raw_features": bool(config["raw_features"]),
                      "class_heads": config.get("class_heads", "none"),
                      "stability": list(stability),
                      "noise_negatives": bool(config.get("noise_negatives")),
                      "benign_negatives": int(config.get("benign_negatives") or 0),
                      "negative_reach": reach,
                      "profile_images": len(y_prof)}
    name = run.config["detector"] + ("+raw" if run.config["raw_features"] else "")
    reference = run.metrics.get("variants", {}).get(name, {}).get("auroc") or {}
    # the run's adaptive attacks are not in adversarial.npz: compare the attacks both measured
    shared = [k for k in reference if out["attacks"].get(k, {}).get("n_adv", 0)]
    if shared:
        diff = max(abs(out["attacks"][k]["auroc"] - reference[k]) for k in shared)
        out["details"]["max_auroc_difference_to_run"] = diff
        (log.info if diff < 1e-9 else log.warning)(
            "ours vs the run's %s variant: largest AUROC difference %.2g", name, diff)
    return out
