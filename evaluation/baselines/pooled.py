"""The pooled-activations baseline: the project's detector
(:class:`~detector.estimator.PathDetector`, the run's inner model) on the concatenated
global-average-pooled outputs of every gated layer instead of path statistics. With every gate
forced open these are the dense network's own activations: what computation paths add over
plain activations."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from detector.estimator import PathDetector
from detector.paths import compute_path
from evaluation.detector_run import DetectorRun
from evaluation.protocol import evaluate_scorer


def pooled_features(model: nn.Module, x: torch.Tensor, force_open: bool,
                    batch_size: int = 256) -> np.ndarray:
    """(N, sum C) concatenated LayerPath.pooled of every gated layer for x: (N, C, H, W) in
    [0, 1]; ``force_open`` opens every gate."""
    model.eval()
    with torch.inference_mode():
        parts = [torch.cat([p.pooled for p in compute_path(
            model, x[i:i + batch_size], force_open=force_open).layers.values()], dim=1)
            for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy()


def fit_and_evaluate(run: DetectorRun, force_open: bool) -> dict[str, Any]:
    """Fit on the run's clean fitting images vs all fitting attacks (grouped by image),
    evaluate with :func:`evaluation.protocol.evaluate_scorer`."""
    fit = run.fit
    advs = [s for s in fit.adversarial.values() if len(s.y)]
    X = np.concatenate([pooled_features(run.model, x, force_open)
                        for x in (fit.x_clean, *(s.x for s in advs))])
    y = np.r_[np.zeros(len(fit.y_clean)), *(np.ones(len(s.y)) for s in advs)]
    groups = np.r_[np.arange(len(fit.y_clean)), *(s.image for s in advs)]
    detector = PathDetector(model=run.config["detector"], **run.threshold_rule,
                            random_state=run.seed).fit(X, y, groups=groups)
    out = evaluate_scorer(
        lambda x: detector.positive_score(pooled_features(run.model, x, force_open)),
        detector.threshold_, run.evaluation, run.fitted, run.seed)
    out["details"] = {"detector": run.config["detector"], "features": X.shape[1]}
    return out
