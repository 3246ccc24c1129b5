"""Detector features from computation paths, with class-conditional path statistics.

:class:`PathProfile` learns, from the paths of clean training images, per class and per gated
layer: how often each filter is open and the mean/variance of each gate logit. For a new path
and its predicted class, each layer then gets cheap, explainable statistics:

- ``bit_nll``: Bernoulli negative log-likelihood of the gate bits under the predicted class's
  gate frequencies, per filter (nats);
- ``bit_excess``: ``bit_nll`` minus the smallest ``bit_nll`` over all classes (>= 0: how much
  better another class explains this path);
- ``hamming``: share of filters that differ from the class's typical path (majority bits);
- ``logit_dist``: mean squared z-score of the gate logits under the class's logit Gaussian;
- ``logit_excess``: ``logit_dist`` minus its minimum over classes (>= 0);
- ``margin``: mean |gate logit|, how decisively the gates switched;
- ``open``: share of open filters.

Global features: softmax confidence, top-1 minus top-2 logit, softmax entropy. Optionally the
raw bits and gate logits are appended. The per-layer *anomaly* the server reports is
``logit_dist`` standardised against clean training paths of the same layer (a z-score; values
above ~3 are unusual).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

LAYER_STATS = ("bit_nll", "bit_excess", "hamming", "logit_dist", "logit_excess", "margin", "open")
GLOBAL_STATS = ("confidence", "logit_margin", "entropy")
_EPS = 1e-6


@dataclass(frozen=True)
class PathBatch:
    """Paths of N inputs as numpy arrays.

    logits: (N, K) class logits; bits: layer -> (N, C) in {0, 1}; gate_logits: layer -> (N, C).
    """

    logits: np.ndarray
    bits: Mapping[str, np.ndarray]
    gate_logits: Mapping[str, np.ndarray]

    @classmethod
    def from_result(cls, result: object) -> PathBatch:
        """From a :class:`detector.paths.PathResult` (tensors are detached and copied)."""
        layers = result.layers  # type: ignore[attr-defined]
        return cls(
            logits=result.logits.detach().cpu().numpy(),  # type: ignore[attr-defined]
            bits={k: v.bits.detach().cpu().numpy() for k, v in layers.items()},
            gate_logits={k: v.logits.detach().cpu().numpy() for k, v in layers.items()},
        )

    def __len__(self) -> int:
        return len(self.logits)

    @staticmethod
    def concat(batches: list[PathBatch]) -> PathBatch:
        first = batches[0]
        return PathBatch(
            logits=np.concatenate([b.logits for b in batches]),
            bits={k: np.concatenate([b.bits[k] for b in batches]) for k in first.bits},
            gate_logits={k: np.concatenate([b.gate_logits[k] for b in batches])
                         for k in first.gate_logits},
        )


@dataclass(frozen=True)
class LayerProfile:
    """Class-conditional statistics of one layer: arrays of shape (K, C)."""

    freq: np.ndarray  # P(filter open | class), smoothed into (0, 1)
    mean: np.ndarray  # mean gate logit per class
    var: np.ndarray  # gate-logit variance per class (floored)
    anomaly_mean: float  # mean of logit_dist on clean training paths
    anomaly_std: float  # its standard deviation


class PathProfile:
    """Typical computation paths per class, learnt from clean paths (see module doc)."""

    def __init__(self, layers: dict[str, LayerProfile], include_raw: bool = False) -> None:
        self.layers = layers
        self.include_raw = include_raw

    @classmethod
    def fit(cls, paths: PathBatch, labels: np.ndarray, num_classes: int,
            include_raw: bool = False, smoothing: float = 1.0) -> PathProfile:
        """labels: (N,) classes of clean inputs (use correctly classified ones).

        Frequencies use Laplace smoothing (``smoothing`` pseudo-counts per outcome); classes
        without examples fall back to the all-class statistics.
        """
        labels = np.asarray(labels)
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
        layers = {}
        for name, bits in paths.bits.items():
            # float64, as stored by to_arrays: the fitted and the reloaded profile agree exactly
            bits = bits.astype(np.float64)
            g = paths.gate_logits[name].astype(np.float64)
            k_freq, k_mean, k_var = [], [], []
            for c in range(num_classes):
                sel = labels == c
                b, gl = (bits[sel], g[sel]) if sel.any() else (bits, g)
                k_freq.append((b.sum(0) + smoothing) / (len(b) + 2 * smoothing))
                k_mean.append(gl.mean(0))
                k_var.append(gl.var(0))
            var = np.stack(k_var)
            floor = max(float(np.median(var)) * 0.01, _EPS)
            layers[name] = LayerProfile(np.stack(k_freq), np.stack(k_mean),
                                        np.maximum(var, floor), 0.0, 1.0)
        profile = cls(layers, include_raw)
        dist = profile.layer_stats(paths, labels)["logit_dist"]  # (N, L)
        for j, name in enumerate(layers):
            lp = layers[name]
            layers[name] = LayerProfile(lp.freq, lp.mean, lp.var, float(dist[:, j].mean()),
                                        float(dist[:, j].std()) + _EPS)
        return profile

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def layer_stats(self, paths: PathBatch, classes: np.ndarray) -> dict[str, np.ndarray]:
        """Per-layer statistics against ``classes`` (N,): stat name -> (N, L) array."""
        n = len(paths)
        rows = np.arange(n)
        out = {s: np.empty((n, len(self.layers))) for s in LAYER_STATS}
        for j, (name, lp) in enumerate(self.layers.items()):
            b = paths.bits[name].astype(np.float64)  # (N, C)
            g = paths.gate_logits[name].astype(np.float64)
            c = b.shape[1]
            nll_all = -(b @ np.log(lp.freq).T + (1 - b) @ np.log1p(-lp.freq).T) / c  # (N, K)
            # mean over filters of (g - mu)^2 / var, for every class at once: (N, K)
            inv = 1.0 / lp.var
            dist_all = ((g**2) @ inv.T - 2 * g @ (lp.mean * inv).T
                        + (lp.mean**2 * inv).sum(1)[None]) / c
            out["bit_nll"][:, j] = nll_all[rows, classes]
            out["bit_excess"][:, j] = nll_all[rows, classes] - nll_all.min(1)
            out["hamming"][:, j] = (b != (lp.freq[classes] > 0.5)).mean(1)
            out["logit_dist"][:, j] = dist_all[rows, classes]
            out["logit_excess"][:, j] = dist_all[rows, classes] - dist_all.min(1)
            out["margin"][:, j] = np.abs(g).mean(1)
            out["open"][:, j] = b.mean(1)
        return out

    def anomaly(self, stats: Mapping[str, np.ndarray]) -> np.ndarray:
        """(N, L) per-layer anomaly z-scores from :meth:`layer_stats` output."""
        mean = np.array([lp.anomaly_mean for lp in self.layers.values()])
        std = np.array([lp.anomaly_std for lp in self.layers.values()])
        return (stats["logit_dist"] - mean) / std

    def transform(self, paths: PathBatch,
                  stats: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """(N, F) float32 features: per-layer stats against the predicted class, global
        prediction statistics, and (if ``include_raw``) raw bits and gate logits.

        ``stats``: :meth:`layer_stats` against the predicted classes, if already computed.
        """
        if stats is None:
            stats = self.layer_stats(paths, paths.logits.argmax(1))
        parts = [stats[s] for s in LAYER_STATS]
        parts.append(prediction_stats(paths.logits))
        if self.include_raw:
            parts += [paths.bits[k] for k in self.layers]
            parts += [paths.gate_logits[k] for k in self.layers]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def feature_names(self) -> list[str]:
        names = [f"{s}[{k}]" for s in LAYER_STATS for k in self.layers]
        names += list(GLOBAL_STATS)
        if self.include_raw:
            for kind in ("bit", "gate_logit"):
                names += [f"{kind}[{k}][{i}]" for k, lp in self.layers.items()
                          for i in range(lp.freq.shape[1])]
        return names

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors storage (see :meth:`from_arrays`)."""
        arrays: dict[str, torch.Tensor] = {}
        for i, lp in enumerate(self.layers.values()):
            for field in ("freq", "mean", "var"):
                arrays[f"{i}.{field}"] = torch.from_numpy(np.ascontiguousarray(
                    getattr(lp, field), dtype=np.float64))
            arrays[f"{i}.anomaly"] = torch.tensor([lp.anomaly_mean, lp.anomaly_std],
                                                  dtype=torch.float64)
        return arrays

    @classmethod
    def from_arrays(cls, names: list[str], arrays: Mapping[str, torch.Tensor],
                    include_raw: bool) -> PathProfile:
        """Inverse of :meth:`to_arrays`; ``names`` are the layer names in order."""
        layers = {}
        for i, name in enumerate(names):
            a = arrays[f"{i}.anomaly"].numpy()
            layers[name] = LayerProfile(*(arrays[f"{i}.{f}"].numpy() for f in
                                          ("freq", "mean", "var")), float(a[0]), float(a[1]))
        return cls(layers, include_raw)


def prediction_stats(logits: np.ndarray) -> np.ndarray:
    """(N, 3): softmax confidence, top-1 minus top-2 logit, softmax entropy (nats)."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    top2 = np.sort(logits, axis=1)[:, -2:]
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return np.stack([p.max(1), top2[:, 1] - top2[:, 0], entropy], axis=1)
