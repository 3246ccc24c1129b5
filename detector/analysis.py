"""One call from images to predictions, adversarial scores and per-layer path anomalies."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torch import nn

from detector.differentiable import TorchDetector, TorchForest, torch_detector
from detector.estimator import PathDetector
from detector.features import PathBatch, PathProfile
from detector.paths import compute_path
from detector.sparse import sparse_execution
from detector.stability import with_companions


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
        dense multiply-accumulates of the network's pass on the image (the stability
        transforms' extra passes, if the features use them, are not counted);
    path_bits: (N, sum of layer_filters) bool, the computation path itself: every gated
        filter's state, layer after layer in execution order (True = open);
    execution: how the network ran (see :data:`EXECUTIONS`).
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
    path_bits: np.ndarray | None = None
    execution: str = "masked"

    def layer_bits(self, row: int) -> dict[str, np.ndarray]:
        """Image ``row``'s path: layer name -> (C,) bool filter states, in execution order."""
        if self.path_bits is None:
            raise ValueError("this analysis has no path_bits")
        ends = np.cumsum(self.layer_filters)
        return {name: self.path_bits[row, end - c:end] for name, c, end in
                zip(self.layer_names, self.layer_filters, ends, strict=True)}

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


@dataclass(frozen=True)
class PathScores:
    """The detector's view of N paths: predictions (N,) int64 predicted classes; stats: layer
    statistics against them (:meth:`PathProfile.layer_stats`, each (N, L) float64); features
    (N, F) float32; scores (N,) float64 calibrated probability in [0, 1] that the input is
    adversarial; flagged (N,) bool, score above the detector's threshold. Tensors; stats and
    features keep their graph when the paths have one."""

    predictions: torch.Tensor
    stats: dict[str, torch.Tensor]
    features: torch.Tensor
    scores: torch.Tensor
    flagged: torch.Tensor


def score_paths(profile: PathProfile, detector: PathDetector, paths: PathBatch,
                exported: TorchDetector | TorchForest | None = None) -> PathScores:
    """Path -> features -> detector score, the one implementation of that step.

    Used by :func:`analyze` (serving), and by adaptive attacks on paths with straight-through
    bits. Where the detector has an exact torch version (:func:`detector.differentiable.
    torch_detector`: logistic, MLP and random forest inner models) the score is computed by it,
    far cheaper than scikit-learn at batch 1; ``exported`` passes it in, built once (as
    :class:`detector.bundle.Bundle` does), else it is built here. The logistic and MLP versions
    keep the graph, so attacks differentiate the score that ships. A random forest is piecewise
    constant (zero gradient almost everywhere, its torch version detaches) and gradient
    boosting runs in scikit-learn on a detached copy of the features: attacks differentiate the
    features and a fitted stand-in (:mod:`evaluation.adaptive.surrogate`).
    """
    predictions = paths.logits.argmax(1)  # an index: no graph
    stats = profile.layer_stats(paths, predictions)
    features = profile.transform(paths, stats)
    exported = exported if exported is not None else torch_detector(detector)
    if exported is not None:
        scores = exported(features)
    else:
        scores = torch.from_numpy(detector.predict_proba(features.detach().numpy())[:, 1])
    return PathScores(predictions, stats, features, scores,
                      scores.detach() > detector.threshold_)


def analyze(model: nn.Module, profile: PathProfile, detector: PathDetector,
            images: torch.Tensor, network_macs: int, execution: str = "masked",
            exported: TorchDetector | TorchForest | None = None) -> Analysis:
    """images: (N, C, H, W) float32 in [0, 1] -> :class:`Analysis`; model must be in eval.

    ``execution`` is one of :data:`EXECUTIONS`; ``exported`` as for :func:`score_paths`.
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {execution!r}")
    with torch.inference_mode(), (sparse_execution() if execution == "sparse"
                                  else contextlib.nullcontext()):
        result = compute_path(model, images, pooled=False)
        paths = PathBatch.from_result(result)
        if profile.stability:
            paths = with_companions(model, images, paths, profile.stability)
        scored = score_paths(profile, detector, paths, exported)
    probs = torch.softmax(result.logits, dim=1).numpy()
    names = profile.layer_names
    return Analysis(
        probs=probs,
        predictions=scored.predictions.numpy(),
        scores=scored.scores.numpy(),
        flagged=scored.flagged.numpy(),
        threshold=float(detector.threshold_),
        layer_names=names,
        layer_anomaly=profile.anomaly(scored.stats).numpy(),
        layer_open=torch.stack([paths.bits[k].sum(1) for k in names], dim=1).long().numpy(),
        layer_filters=np.array([paths.bits[k].shape[1] for k in names]),
        open_fraction=result.open_fraction().numpy(),
        flops_fraction=result.flops_fraction(network_macs).numpy(),
        path_bits=torch.cat([paths.bits[k] for k in names], dim=1).bool().numpy(),
        execution=execution,
    )
