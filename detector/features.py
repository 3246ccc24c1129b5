"""Detector features from computation paths, with class-conditional path statistics, in torch.

:class:`PathProfile` learns, from the paths of clean training images, per class and per gated
layer: how often each filter is open and the mean/variance of each gate logit. For a new path
and a class (the predicted one when serving; the one an attacker pushes the input into when
attacking), each layer then gets cheap, explainable statistics:

- ``bit_nll``: Bernoulli negative log-likelihood of the gate bits under the class's gate
  frequencies, per filter (nats);
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

Everything is torch (statistics in float64, features returned as float32), so one
implementation serves the server, the detector's fitting and the adaptive attacks: with
straight-through bits (:meth:`PathBatch.from_result` with ``ste=``) the features are
differentiable with respect to the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from detector.straight_through import straight_through

LAYER_STATS = ("bit_nll", "bit_excess", "hamming", "logit_dist", "logit_excess", "margin", "open")
GLOBAL_STATS = ("confidence", "logit_margin", "entropy")
_EPS = 1e-6
_CHUNK_ELEMENTS = 1 << 22  # (rows, K, D) float64 intermediates of layer_stats: 32 MB at most

ArrayLike = torch.Tensor | np.ndarray


def _tensor(a: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(a, dtype=dtype)


@dataclass(frozen=True)
class PathBatch:
    """Paths of N inputs: logits (N, K) class logits; bits: layer -> (N, C) in {0, 1};
    gate_logits: layer -> (N, C). Tensors (numpy arrays are converted)."""

    logits: torch.Tensor
    bits: Mapping[str, torch.Tensor]
    gate_logits: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        object.__setattr__(self, "logits", _tensor(self.logits))
        object.__setattr__(self, "bits", {k: _tensor(v) for k, v in self.bits.items()})
        object.__setattr__(self, "gate_logits",
                           {k: _tensor(v) for k, v in self.gate_logits.items()})

    @classmethod
    def from_result(cls, result: object, ste: str | None = None) -> PathBatch:
        """From a :class:`detector.paths.PathResult`.

        ``ste=None``: detached tensors (inference, fitting). ``ste="sigmoid"`` or ``"semhash"``:
        the graph is kept and each bit is straight-through (value of the hard bit, gradient of
        :func:`detector.straight_through.soft_gates` of its gate logit), for attacks.
        """
        layers = result.layers  # type: ignore[attr-defined]
        logits = result.logits  # type: ignore[attr-defined]
        if ste is None:
            return cls(logits.detach(), {k: v.bits.detach() for k, v in layers.items()},
                       {k: v.logits.detach() for k, v in layers.items()})
        return cls(logits,
                   {k: straight_through(v.bits.detach(), v.logits, ste)
                    for k, v in layers.items()},
                   {k: v.logits for k, v in layers.items()})

    def __len__(self) -> int:
        return len(self.logits)

    @staticmethod
    def concat(batches: list[PathBatch]) -> PathBatch:
        first = batches[0]
        return PathBatch(
            logits=torch.cat([b.logits for b in batches]),
            bits={k: torch.cat([b.bits[k] for b in batches]) for k in first.bits},
            gate_logits={k: torch.cat([b.gate_logits[k] for b in batches])
                         for k in first.gate_logits},
        )

    def take(self, rows: ArrayLike) -> PathBatch:
        """The paths at ``rows`` (an index or boolean mask of length N)."""
        idx = _tensor(rows)
        return PathBatch(self.logits[idx], {k: v[idx] for k, v in self.bits.items()},
                         {k: v[idx] for k, v in self.gate_logits.items()})


@dataclass(frozen=True)
class LayerProfile:
    """Class-conditional statistics of one layer: float64 tensors of shape (K, C)."""

    freq: torch.Tensor  # P(filter open | class), smoothed into (0, 1)
    mean: torch.Tensor  # mean gate logit per class
    var: torch.Tensor  # gate-logit variance per class (floored)
    anomaly_mean: float  # mean of logit_dist on clean training paths
    anomaly_std: float  # its standard deviation

    def __post_init__(self) -> None:
        for name in ("freq", "mean", "var"):
            object.__setattr__(self, name, _tensor(getattr(self, name), torch.float64))


class PathProfile:
    """Typical computation paths per class, learnt from clean paths (see module doc)."""

    def __init__(self, layers: dict[str, LayerProfile], include_raw: bool = False) -> None:
        self.layers = layers
        self.include_raw = include_raw
        # every layer side by side, so that scoring is a few tensor operations, not a few per
        # layer (small batches are dominated by per-operation overhead): (K, D), D = sum of C
        freq = torch.cat([lp.freq for lp in layers.values()], dim=1)
        self._log_freq, self._log1m_freq = torch.log(freq), torch.log1p(-freq)
        self._majority = (freq > 0.5).to(torch.float64)
        self._mean = torch.cat([lp.mean for lp in layers.values()], dim=1)
        self._inv_var = 1.0 / torch.cat([lp.var for lp in layers.values()], dim=1)
        # (D, L): averages each layer's filters
        sizes = [lp.freq.shape[1] for lp in layers.values()]
        self._layer_mean = torch.block_diag(*(torch.full((c, 1), 1.0 / c, dtype=torch.float64)
                                              for c in sizes))
        self._anomaly_mean = torch.tensor([lp.anomaly_mean for lp in layers.values()],
                                          dtype=torch.float64)
        self._anomaly_std = torch.tensor([lp.anomaly_std for lp in layers.values()],
                                         dtype=torch.float64)

    @classmethod
    def fit(cls, paths: PathBatch, labels: ArrayLike, num_classes: int,
            include_raw: bool = False, smoothing: float = 1.0) -> PathProfile:
        """labels: (N,) classes of clean inputs (use correctly classified ones).

        Frequencies use Laplace smoothing (``smoothing`` pseudo-counts per outcome); classes
        without examples fall back to the all-class statistics.
        """
        labels = _tensor(labels).long()
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} paths")
        layers = {}
        for name, bits in paths.bits.items():
            # float64, as stored by to_arrays: the fitted and the reloaded profile agree exactly
            bits = bits.detach().to(torch.float64)
            g = paths.gate_logits[name].detach().to(torch.float64)
            k_freq, k_mean, k_var = [], [], []
            for c in range(num_classes):
                sel = labels == c
                b, gl = (bits[sel], g[sel]) if sel.any() else (bits, g)
                k_freq.append((b.sum(0) + smoothing) / (len(b) + 2 * smoothing))
                k_mean.append(gl.mean(0))
                k_var.append(gl.var(0, unbiased=False))
            var = torch.stack(k_var)
            floor = max(float(torch.quantile(var.flatten(), 0.5)) * 0.01, _EPS)  # numpy's median
            layers[name] = LayerProfile(torch.stack(k_freq), torch.stack(k_mean),
                                        var.clamp_min(floor), 0.0, 1.0)
        dist = cls(layers, include_raw).layer_stats(paths, labels)["logit_dist"]  # (N, L)
        return cls({name: LayerProfile(lp.freq, lp.mean, lp.var, float(dist[:, j].mean()),
                                       float(dist[:, j].std(unbiased=False)) + _EPS)
                    for j, (name, lp) in enumerate(layers.items())}, include_raw)

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def layer_stats(self, paths: PathBatch, classes: ArrayLike) -> dict[str, torch.Tensor]:
        """Per-layer statistics against ``classes`` (N,): stat name -> (N, L) float64.

        Differentiable in the bits and gate logits of ``paths``.
        """
        classes = _tensor(classes).long()
        b = torch.cat([paths.bits[k] for k in self.layers], dim=1).to(torch.float64)  # (N, D)
        g = torch.cat([paths.gate_logits[k] for k in self.layers], dim=1).to(torch.float64)
        k, d = self._mean.shape
        rows = max(1, _CHUNK_ELEMENTS // (k * d))  # bounds the (rows, K, D) intermediates
        parts = [self._stats(b[i:i + rows], g[i:i + rows], classes[i:i + rows])
                 for i in range(0, len(b), rows)]
        return {s: torch.cat([p[s] for p in parts]) for s in LAYER_STATS}

    def _stats(self, b: torch.Tensor, g: torch.Tensor, classes: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """b, g: (N, D) bits and gate logits of every layer; classes (N,) -> (N, L) stats."""
        avg = self._layer_mean  # (D, L)
        rows = torch.arange(len(classes))
        nll_all = -(b[:, None] * self._log_freq + (1 - b[:, None]) * self._log1m_freq) @ avg
        dist_all = ((g[:, None] - self._mean) ** 2 * self._inv_var) @ avg  # (N, K, L)
        majority = self._majority[classes]  # (N, D)
        nll, dist = nll_all[rows, classes], dist_all[rows, classes]  # (N, L)
        return {"bit_nll": nll,
                "bit_excess": nll - nll_all.min(1).values,
                "hamming": (b + majority - 2 * b * majority) @ avg,  # share of b != majority
                "logit_dist": dist,
                "logit_excess": dist - dist_all.min(1).values,
                "margin": g.abs() @ avg,
                "open": b @ avg}

    def anomaly(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N, L) per-layer anomaly z-scores from :meth:`layer_stats` output."""
        return (stats["logit_dist"] - self._anomaly_mean) / self._anomaly_std

    def transform(self, paths: PathBatch,
                  stats: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(N, F) float32 features: per-layer stats against the predicted class, global
        prediction statistics, and (if ``include_raw``) raw bits and gate logits.

        ``stats``: :meth:`layer_stats` against the predicted classes, or against any other
        classes the caller chooses (an attacker's target); default: the predicted classes.
        """
        if stats is None:
            stats = self.layer_stats(paths, paths.logits.argmax(1))
        parts = [stats[s] for s in LAYER_STATS]
        parts.append(prediction_stats(paths.logits))
        if self.include_raw:
            parts += [paths.bits[k].to(torch.float64) for k in self.layers]
            parts += [paths.gate_logits[k].to(torch.float64) for k in self.layers]
        return torch.cat(parts, dim=1).to(torch.float32)

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
                arrays[f"{i}.{field}"] = getattr(lp, field).contiguous()
            arrays[f"{i}.anomaly"] = torch.tensor([lp.anomaly_mean, lp.anomaly_std],
                                                  dtype=torch.float64)
        return arrays

    @classmethod
    def from_arrays(cls, names: list[str], arrays: Mapping[str, torch.Tensor],
                    include_raw: bool) -> PathProfile:
        """Inverse of :meth:`to_arrays`; ``names`` are the layer names in order."""
        layers = {}
        for i, name in enumerate(names):
            a = arrays[f"{i}.anomaly"]
            layers[name] = LayerProfile(*(arrays[f"{i}.{f}"] for f in ("freq", "mean", "var")),
                                        float(a[0]), float(a[1]))
        return cls(layers, include_raw)


def prediction_stats(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N, 3) float64: softmax confidence, top-1 minus top-2 logit, softmax
    entropy (nats)."""
    z = _tensor(logits).to(torch.float64)
    p = torch.softmax(z, dim=1)
    top2 = z.topk(2, dim=1).values
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return torch.stack([p.max(1).values, top2[:, 0] - top2[:, 1], entropy], dim=1)
