"""One call from images to predictions, adversarial scores and per-layer path anomalies."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from detector.estimator import PathDetector
from detector.features import PathBatch, PathProfile
from detector.paths import compute_path
from detector.sparse import sparse_execution


@dataclass(frozen=True)
class Analysis:
    """Results for N images, K classes and L gated layers (numpy arrays).

    probs: (N, K) softmax probabilities; predictions: (N,) class indices;
    scores: (N,) calibrated probability in [0, 1] that the input is adversarial;
    flagged: (N,) bool, score above the detector's threshold;
    layer_names: the L gated layers in execution order;
    layer_anomaly: (N, L) z-score of each layer's path against the predicted class's typical
        path (clean inputs: mean 0, std 1; larger is more unusual);
    layer_open: (N, L) open filters per layer; layer_filters: (L,) filters per layer;
    open_fraction: (N,) open share over all gated filters; flops_fraction: (N,) executed /
        dense multiply-accumulates of the whole network.
    """

    probs: np.ndarray
    predictions: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray
    threshold: float
    layer_names: list[str]
    layer_anomaly: np.ndarray
    layer_open: np.ndarray
    layer_filters: np.ndarray
    open_fraction: np.ndarray
    flops_fraction: np.ndarray
    execution: str = "masked"

    def __len__(self) -> int:
        return len(self.predictions)

    def take(self, start: int, stop: int) -> Analysis:
        """The results of images ``start:stop`` (per-image arrays sliced, the rest shared)."""
        rows = slice(start, stop)
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self)
                                if f.name not in _PER_LAYER and
                                isinstance(getattr(self, f.name), np.ndarray)})


_PER_LAYER = {"layer_filters"}


EXECUTIONS = ("masked", "sparse")
"""``masked``: every filter computed, closed ones zeroed; ``sparse``: only open filters run
(:mod:`detector.sparse`). Both give the same logits and paths up to float rounding."""


def analyze(model: nn.Module, profile: PathProfile, detector: PathDetector,
            images: torch.Tensor, network_macs: int, execution: str = "masked") -> Analysis:
    """images: (N, C, H, W) float32 in [0, 1] -> :class:`Analysis`; model must be in eval.

    ``execution`` is one of :data:`EXECUTIONS`.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    with torch.inference_mode(), (sparse_execution() if execution == "sparse"
                                  else contextlib.nullcontext()):
        result = compute_path(model, images, pooled=False)
    paths = PathBatch.from_result(result)
    stats = profile.layer_stats(paths, paths.logits.argmax(1))
    scores = detector.predict_proba(profile.transform(paths, stats))[:, 1]
    probs = torch.softmax(result.logits, dim=1).numpy()
    names = profile.layer_names
    return Analysis(
        probs=probs,
        predictions=probs.argmax(1),
        scores=scores,
        flagged=scores > detector.threshold_,
        threshold=float(detector.threshold_),
        layer_names=names,
        layer_anomaly=profile.anomaly(stats),
        layer_open=np.stack([paths.bits[k].sum(1) for k in names], axis=1).astype(np.int64),
        layer_filters=np.array([paths.bits[k].shape[1] for k in names]),
        open_fraction=result.open_fraction().numpy(),
        flops_fraction=result.flops_fraction(network_macs).numpy(),
        execution=execution,
    )
