"""The computation-path detector itself ("ours") in the baseline comparison: the run's
:class:`~detector.estimator.PathDetector` refitted exactly as ``training.fit_detector`` fits it
(:func:`evaluation.protocol.evaluate_variant`), so its numbers reproduce the run's."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from detector.estimator import PathDetector
from detector.features import PathProfile
from evaluation.detector_run import DetectorRun
from evaluation.protocol import evaluate_variant
from evaluation.sets import extract_paths

log = logging.getLogger(__name__)


def fit_and_evaluate(run: DetectorRun, x_prof: torch.Tensor, y_prof: torch.Tensor
                     ) -> dict[str, Any]:
    """Profile from clean training images x_prof (N, C, H, W) in [0, 1] with classes y_prof
    (N,), the run's inner model and features; ``details`` records the largest AUROC difference
    to the run's own numbers (0 when the run is reproduced)."""
    profile = PathProfile.fit(extract_paths(run.model, x_prof), y_prof.numpy(),
                              run.spec.num_classes)
    detector = PathDetector(model=run.config["detector"], target_fpr=run.target_fpr,
                            random_state=run.seed)
    res = evaluate_variant(detector, profile, bool(run.config["raw_features"]), run.fit,
                           run.evaluation, {}, run.evaluation.y_clean.numpy(), run.fitted,
                           seed=run.seed)
    out = {k: v for k, v in res.items() if k not in ("scores", "benign")}
    out["threshold"] = detector.threshold_
    out["details"] = {"detector": run.config["detector"],
                      "raw_features": bool(run.config["raw_features"]),
                      "profile_images": len(y_prof)}
    name = run.config["detector"] + ("+raw" if run.config["raw_features"] else "")
    reference = run.metrics.get("variants", {}).get(name, {}).get("auroc")
    if reference:
        diff = max(abs(out["attacks"][k].get("auroc", np.nan) - v) for k, v in reference.items()
                   if out["attacks"][k].get("n_adv", 0))
        out["details"]["max_auroc_difference_to_run"] = diff
        (log.info if diff < 1e-9 else log.warning)(
            "ours vs the run's %s variant: largest AUROC difference %.2g", name, diff)
    return out
