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

Global features: softmax confidence, top-1 minus top-2 logit, softmax entropy.

*Class evidence* (when the profile has class heads): each gated layer's linear classifier
q(y | z^l) = softmax(W_l z^l + b_l) on its gate bits (the decoupling's mutual-information heads,
kept in the checkpoint, or heads fitted on clean paths) says which class the path points to at
that depth. A clean input's evidence agrees with the prediction through the network; an
adversarial one is pushed into its class late, so early layers still point elsewhere:

- ``head_p``: q^l(class), the layer's probability of the class;
- ``head_excess``: max_k log q^l(k) - log q^l(class) (>= 0; 0 iff the layer's top class is the
  class: the agreement indicator is ``head_excess == 0``);
- ``head_shift``: KL(q^l || q^{l-1}), how much the evidence moved since the previous gated layer
  (the first layer against the uniform distribution; nats);
- ``head_kl``: KL(p || q^l) of the network's softmax output p against the layer's evidence.

Optionally the raw bits and gate logits are appended. :data:`FEATURE_GROUPS` names the groups;
a profile can emit a subset (``groups``), for ablations. The per-layer *anomaly* the server
reports is ``logit_dist`` standardised against clean training paths of the same layer (a
z-score; values above ~3 are unusual).

Everything is torch (statistics in float64, features returned as float32), so one
implementation serves the server, the detector's fitting and the adaptive attacks: with
straight-through bits (:meth:`PathBatch.from_result` with ``ste=``) the features are
differentiable with respect to the input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from detector.straight_through import straight_through

LAYER_STATS = ("bit_nll", "bit_excess", "hamming", "logit_dist", "logit_excess", "margin", "open")
GLOBAL_STATS = ("confidence", "logit_margin", "entropy")
HEAD_STATS = ("head_p", "head_excess", "head_shift", "head_kl")
STABILITY_STATS = ("stab_prob_l1", "stab_pred_change", "stab_flips")
#: Feature groups a profile can emit: per-layer gate-bit statistics, gate-logit statistics, the
#: prediction's statistics, the per-layer class evidence (needs class heads) and the path
#: stability under small transforms (needs stability transforms and companion paths).
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "bits": ("bit_nll", "bit_excess", "hamming", "open"),
    "gate_logits": ("logit_dist", "logit_excess", "margin"),
    "prediction": GLOBAL_STATS,
    "class_evidence": HEAD_STATS,
    "stability": STABILITY_STATS,
}
_EPS = 1e-6
_CHUNK_ELEMENTS = 1 << 22  # (rows, 3K, D) float64 intermediates of layer_stats: 32 MB at most

ArrayLike = torch.Tensor | np.ndarray


def _tensor(a: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.as_tensor(a, dtype=dtype)


@dataclass(frozen=True)
class PathBatch:
    """Paths of N inputs: logits (N, K) class logits; bits: layer -> (N, C) in {0, 1};
    gate_logits: layer -> (N, C). Tensors (numpy arrays are converted). companions: the paths
    of transformed copies of the same N inputs, by transform name (:mod:`detector.stability`;
    empty unless attached)."""

    logits: torch.Tensor
    bits: Mapping[str, torch.Tensor]
    gate_logits: Mapping[str, torch.Tensor]
    companions: Mapping[str, PathBatch] = field(default_factory=dict)
    # layer names -> their (bits, gate logits) side by side, filled by flat() (not a field of
    # the value: two batches with the same paths are equal whatever either has computed)
    _flat: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "logits", _tensor(self.logits))
        object.__setattr__(self, "bits", {k: _tensor(v) for k, v in self.bits.items()})
        object.__setattr__(self, "gate_logits",
                           {k: _tensor(v) for k, v in self.gate_logits.items()})
        for name, other in self.companions.items():
            if len(other) != len(self.logits):
                raise ValueError(f"companion {name!r} has {len(other)} paths for "
                                 f"{len(self.logits)} inputs")

    def with_companions(self, companions: Mapping[str, PathBatch]) -> PathBatch:
        """These paths with ``companions`` attached (added to any already there)."""
        return PathBatch(self.logits, self.bits, self.gate_logits,
                         {**self.companions, **companions})

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

    def flat(self, layers: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The bits and gate logits of ``layers``, in that order, side by side: two (N, D)
        float64 tensors, D the layers' filters together. Computed once per batch and order
        (the features read them several times; they keep the graph of straight-through bits).
        """
        key = tuple(layers)
        if key not in self._flat:
            self._flat[key] = (torch.cat([self.bits[k] for k in key], 1).to(torch.float64),
                               torch.cat([self.gate_logits[k] for k in key], 1).to(torch.float64))
        return self._flat[key]

    @staticmethod
    def concat(batches: list[PathBatch]) -> PathBatch:
        """One batch of all ``batches``' paths in order (companions those all of them have)."""
        first = batches[0]
        shared = [k for k in first.companions if all(k in b.companions for b in batches)]
        return PathBatch(
            logits=torch.cat([b.logits for b in batches]),
            bits={k: torch.cat([b.bits[k] for b in batches]) for k in first.bits},
            gate_logits={k: torch.cat([b.gate_logits[k] for b in batches])
                         for k in first.gate_logits},
            companions={k: PathBatch.concat([b.companions[k] for b in batches])
                        for k in shared},
        )

    def take(self, rows: ArrayLike | slice) -> PathBatch:
        """The paths at ``rows`` (an index or boolean mask of length N, or a slice: views),
        companions and the :meth:`flat` arrays already computed too."""
        idx = rows if isinstance(rows, slice) else _tensor(rows)
        part = PathBatch(self.logits[idx], {k: v[idx] for k, v in self.bits.items()},
                         {k: v[idx] for k, v in self.gate_logits.items()},
                         {k: v.take(idx) for k, v in self.companions.items()})
        part._flat.update({key: (b[idx], g[idx]) for key, (b, g) in self._flat.items()})
        return part


@dataclass(frozen=True)
class LayerProfile:
    """Class-conditional statistics of one layer: float64 tensors of shape (K, C), and optionally
    its class head q(y | z) = softmax(head_weight @ z + head_bias): (K, C) and (K,) float64."""

    freq: torch.Tensor  # P(filter open | class), smoothed into (0, 1)
    mean: torch.Tensor  # mean gate logit per class
    var: torch.Tensor  # gate-logit variance per class (floored)
    anomaly_mean: float  # mean of logit_dist on clean training paths
    anomaly_std: float  # its standard deviation
    head_weight: torch.Tensor | None = None
    head_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("freq", "mean", "var"):
            object.__setattr__(self, name, _tensor(getattr(self, name), torch.float64))
        if self.head_weight is None:
            if self.head_bias is not None:
                raise ValueError("a class head bias without its weight")
            return
        weight = _tensor(self.head_weight, torch.float64)
        if weight.shape != self.freq.shape:
            raise ValueError(f"class head of shape {tuple(weight.shape)} for a layer of "
                             f"{tuple(self.freq.shape)} (classes, filters)")
        bias = (torch.zeros(len(weight), dtype=torch.float64) if self.head_bias is None
                else _tensor(self.head_bias, torch.float64))
        if bias.shape != (len(weight),):
            raise ValueError(f"class head bias of shape {tuple(bias.shape)}, expected "
                             f"({len(weight)},)")
        object.__setattr__(self, "head_weight", weight)
        object.__setattr__(self, "head_bias", bias)

    def with_head(self, weight: ArrayLike | None, bias: ArrayLike | None = None) -> LayerProfile:
        """The same statistics with another class head (None: without one)."""
        return LayerProfile(self.freq, self.mean, self.var, self.anomaly_mean, self.anomaly_std,
                            weight, bias)


class PathProfile:
    """Typical computation paths per class, learnt from clean paths (see module doc).

    ``groups``: the feature groups :meth:`transform` emits (names of :data:`FEATURE_GROUPS`);
    default: every group the profile can compute (``class_evidence`` only with class heads on
    every layer, ``stability`` only with ``stability`` transforms). ``stability``: names of
    :data:`detector.stability.TRANSFORMS` whose companion paths the features compare with the
    input's own (the paths given to :meth:`transform` must carry them).
    """

    def __init__(self, layers: dict[str, LayerProfile], include_raw: bool = False,
                 groups: tuple[str, ...] | None = None, stability: tuple[str, ...] = ()) -> None:
        self.layers = layers
        self.include_raw = include_raw
        self.stability = tuple(stability)
        self.has_heads = all(lp.head_weight is not None for lp in layers.values())
        available = tuple(g for g in FEATURE_GROUPS
                          if (g != "class_evidence" or self.has_heads)
                          and (g != "stability" or self.stability))
        if groups is None:
            groups = available
        unknown = sorted(set(groups) - set(available))
        if unknown:
            raise ValueError(f"feature groups {unknown} not available; this profile has "
                             f"{list(available)}")
        self.groups = tuple(g for g in FEATURE_GROUPS if g in groups)  # canonical order
        # every layer side by side, so that scoring is a few tensor operations, not a few per
        # layer (small batches are dominated by per-operation overhead): (K, D), D = sum of C
        freq = torch.cat([lp.freq for lp in layers.values()], dim=1)
        log_freq, log1m_freq = torch.log(freq), torch.log1p(-freq)
        majority = (freq > 0.5).to(torch.float64)
        self._mean = torch.cat([lp.mean for lp in layers.values()], dim=1)
        # (D, L): averages each layer's filters
        sizes = [lp.freq.shape[1] for lp in layers.values()]
        avg = torch.block_diag(*(torch.full((c, 1), 1.0 / c, dtype=torch.float64)
                                 for c in sizes))
        self._layer_mean = avg
        # per class, each statistic is a weighted average over each layer's filters plus a
        # constant, (term * weight) @ layer mean + offset, with the terms: rows 0..K-1 the bits
        # b for their NLL (-sum of log(1 - f) + b * (log(1 - f) - log f), averaged), rows
        # K..2K-1 the bits for their distance to the majority bits (m + b * (1 - 2m),
        # averaged), rows 2K..3K-1 the gate logits' squared deviations from the class's means,
        # weighted by the inverse variances (no constant); (3K, D) and (3K, L)
        self._class_weight = torch.cat([log1m_freq - log_freq, 1 - 2 * majority,
                                        1.0 / torch.cat([lp.var for lp in layers.values()], 1)])
        self._class_offset = torch.cat([-(log1m_freq @ avg), majority @ avg,
                                        torch.zeros(len(freq), len(sizes), dtype=torch.float64)])
        if self.has_heads:  # every layer's head on its own filters' bits, the same way:
            # (b * weight) @ layer mean, the weights scaled by the layer's size (K, D), (L, K)
            self._head_weight = torch.cat([lp.head_weight * c  # type: ignore[operator]
                                           for lp, c in zip(layers.values(), sizes, strict=True)],
                                          dim=1)
            self._head_bias = torch.stack([lp.head_bias for lp in layers.values()])  # type: ignore[misc]
        self._anomaly_mean = torch.tensor([lp.anomaly_mean for lp in layers.values()],
                                          dtype=torch.float64)
        self._anomaly_std = torch.tensor([lp.anomaly_std for lp in layers.values()],
                                         dtype=torch.float64)

    @classmethod
    def fit(cls, paths: PathBatch, labels: ArrayLike, num_classes: int,
            include_raw: bool = False, smoothing: float = 1.0,
            heads: Mapping[str, ArrayLike | tuple[ArrayLike, ArrayLike]] | None = None
            ) -> PathProfile:
        """labels: (N,) classes of clean inputs (use correctly classified ones).

        Frequencies use Laplace smoothing (``smoothing`` pseudo-counts per outcome); classes
        without examples fall back to the all-class statistics. ``heads``: class heads to
        carry, gated layer -> (K, C) weight (bias-free, as the decoupling trains them) or
        ((K, C) weight, (K,) bias) (as :func:`fit_class_heads` returns); None: no class
        evidence.
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
            if heads is not None and name not in heads:
                raise ValueError(f"no class head for gated layer {name!r} (heads for "
                                 f"{sorted(heads)})")
            head = None if heads is None else heads[name]
            weight, bias = head if isinstance(head, tuple) else (head, None)
            layers[name] = LayerProfile(torch.stack(k_freq), torch.stack(k_mean),
                                        var.clamp_min(floor), 0.0, 1.0, weight, bias)
        dist = cls(layers, include_raw).layer_stats(paths, labels)["logit_dist"]  # (N, L)
        return cls({name: LayerProfile(lp.freq, lp.mean, lp.var, float(dist[:, j].mean()),
                                       float(dist[:, j].std(unbiased=False)) + _EPS,
                                       lp.head_weight, lp.head_bias)
                    for j, (name, lp) in enumerate(layers.items())}, include_raw)

    def with_features(self, groups: tuple[str, ...] | None = None,
                      include_raw: bool | None = None) -> PathProfile:
        """The same profile emitting other feature groups / raw features (for ablations); None
        keeps this profile's setting."""
        return PathProfile(self.layers, self.include_raw if include_raw is None else include_raw,
                           self.groups if groups is None else groups, self.stability)

    def with_stability(self, stability: tuple[str, ...]) -> PathProfile:
        """The same statistics, comparing paths with the companions of ``stability`` transforms
        (every available feature group emitted)."""
        return PathProfile(self.layers, self.include_raw, None, stability)

    def stability_stats(self, paths: PathBatch) -> torch.Tensor:
        """(N, S * (2 + L)) float64 stability features, per transform of ``stability`` in order:
        ``stab_prob_l1``, the L1 distance between the softmax outputs of the input and of its
        transformed copy (in [0, 2]); ``stab_pred_change``, 1 if the predicted class changes;
        ``stab_flips``, per gated layer the share of its filters whose state changes (L values).
        """
        missing = [t for t in self.stability if t not in paths.companions]
        if missing:
            raise ValueError(f"the paths carry no companions for stability transforms {missing}")
        n, s = len(paths.logits), len(self.stability)
        others = [paths.companions[t] for t in self.stability]
        # every transform at once: (S, N, ...) stacks, one operation per statistic
        p = torch.softmax(paths.logits.to(torch.float64), 1)  # (N, K)
        q = torch.softmax(torch.stack([o.logits for o in others]).to(torch.float64), 2)
        b = paths.flat(self.layers)[0]  # (N, D)
        b_t = torch.stack([o.flat(self.layers)[0] for o in others])  # (S, N, D)
        changed = p.argmax(1) != q.argmax(2)  # (S, N)
        flipped = torch.addcmul(b + b_t, b, b_t, value=-2)  # b != b_t, for bits in {0, 1}
        parts = torch.cat([(p - q).abs().sum(2, keepdim=True),
                           changed.to(torch.float64)[..., None],
                           flipped @ self._layer_mean],  # share of flipped bits per layer
                          dim=2)  # (S, N, 2 + L)
        return parts.transpose(0, 1).reshape(n, s * parts.shape[2])

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def layer_stats(self, paths: PathBatch, classes: ArrayLike) -> dict[str, torch.Tensor]:
        """Per-layer statistics against ``classes`` (N,): stat name -> (N, L) float64
        (:data:`LAYER_STATS`, and :data:`HEAD_STATS` if the profile has class heads).

        Differentiable in the bits and gate logits (and, for ``head_kl``, the logits) of
        ``paths``.
        """
        classes = _tensor(classes).long()
        b, g = paths.flat(self.layers)  # (N, D)
        k, d = self._mean.shape
        rows = max(1, _CHUNK_ELEMENTS // (3 * k * d))  # bounds the (rows, 3K, D) intermediates
        chunks = [slice(i, i + rows) for i in range(0, len(b), rows)]
        if len(chunks) == 1:  # no slicing: three operations fewer at batch 1
            stats = self._stats(b, g, classes)
        else:
            parts = [self._stats(b[c], g[c], classes[c]) for c in chunks]
            stats = {s: torch.cat([p[s] for p in parts]) for s in LAYER_STATS}
        if self.has_heads:  # every layer's head on its own filters' bits: (N, L, K) logits
            heads = torch.cat([((b[c, None] * self._head_weight) @ self._layer_mean
                                ).transpose(1, 2) for c in chunks])
            stats.update(self._class_evidence(heads + self._head_bias, _tensor(paths.logits),
                                              classes))
        return stats

    def _class_evidence(self, heads: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor
                        ) -> dict[str, torch.Tensor]:
        """heads: (N, L, K) every layer's head logits, logits (N, K), classes (N,) ->
        HEAD_STATS, (N, L)."""
        n, k = len(heads), len(self._mean)
        log_q = torch.log_softmax(heads, -1)
        q = log_q.exp()  # (N, L, K)
        picked = log_q.gather(2, classes.view(n, 1, 1).expand(n, log_q.shape[1], 1))[..., 0]
        uniform = torch.full((n, 1, k), -math.log(k), dtype=log_q.dtype)
        before = torch.cat([uniform, log_q[:, :-1]], dim=1)
        log_p = torch.log_softmax(logits.to(torch.float64), 1)[:, None]  # (N, 1, K)
        return {"head_p": picked.exp(),
                "head_excess": log_q.max(2).values - picked,
                "head_shift": (q * (log_q - before)).sum(2),
                "head_kl": (log_p.exp() * (log_p - log_q)).sum(2)}

    def _stats(self, b: torch.Tensor, g: torch.Tensor, classes: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """b, g: (N, D) bits and gate logits of every layer; classes (N,) -> (N, L) stats."""
        n, (k, layers) = len(g), (len(self._mean), self._layer_mean.shape[1])
        avg = self._layer_mean  # (D, L)
        # per class and layer, in one product (few operations: at batch 1 their number is the
        # cost): the bits' NLL, their distance to the majority bits, the logits' distance
        terms = torch.cat([b[:, None].expand(n, 2 * k, -1), (g[:, None] - self._mean).square()],
                          1)  # (N, 3K, D)
        every = ((terms * self._class_weight) @ avg + self._class_offset).view(n, 3, k, layers)
        picked = every.gather(2, classes.view(n, 1, 1, 1).expand(n, 3, 1, layers)).squeeze(2)
        nll, hamming, dist = picked.unbind(1)  # (N, L) each; hamming: share of b != majority
        nll_excess, _, dist_excess = (picked - every.amin(2)).unbind(1)
        return {"bit_nll": nll, "bit_excess": nll_excess, "hamming": hamming,
                "logit_dist": dist, "logit_excess": dist_excess,
                "margin": g.abs() @ avg, "open": b @ avg}

    def anomaly(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N, L) per-layer anomaly z-scores from :meth:`layer_stats` output."""
        return (stats["logit_dist"] - self._anomaly_mean) / self._anomaly_std

    def transform(self, paths: PathBatch,
                  stats: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(N, F) float32 features: per-layer stats against the predicted class, global
        prediction statistics, the per-layer class evidence (the profile's ``groups``; see
        :meth:`feature_names` for the columns) and (if ``include_raw``) raw bits and gate logits.

        ``stats``: :meth:`layer_stats` against the predicted classes, or against any other
        classes the caller chooses (an attacker's target); default: the predicted classes.
        """
        if stats is None:
            stats = self.layer_stats(paths, paths.logits.argmax(1))
        parts = [stats[s] for s in self._layer_columns()]
        if "prediction" in self.groups:
            parts.append(prediction_stats(paths.logits))
        parts += [stats[s] for s in HEAD_STATS if "class_evidence" in self.groups]
        if "stability" in self.groups:
            parts.append(self.stability_stats(paths))
        if self.include_raw:
            parts += [paths.bits[k].to(torch.float64) for k in self.layers]
            parts += [paths.gate_logits[k].to(torch.float64) for k in self.layers]
        return torch.cat(parts, dim=1).to(torch.float32)

    def _layer_columns(self) -> list[str]:
        """The gate statistics (of :data:`LAYER_STATS`) that the profile's groups emit."""
        chosen = {s for g in ("bits", "gate_logits") if g in self.groups
                  for s in FEATURE_GROUPS[g]}
        return [s for s in LAYER_STATS if s in chosen]

    def feature_names(self) -> list[str]:
        """Names of :meth:`transform`'s F columns, in order: ``stat[layer]`` or a global name."""
        names = [f"{s}[{k}]" for s in self._layer_columns() for k in self.layers]
        if "prediction" in self.groups:
            names += list(GLOBAL_STATS)
        if "class_evidence" in self.groups:
            names += [f"{s}[{k}]" for s in HEAD_STATS for k in self.layers]
        if "stability" in self.groups:
            for t in self.stability:
                names += [f"stab_prob_l1[{t}]", f"stab_pred_change[{t}]"]
                names += [f"stab_flips[{t}][{k}]" for k in self.layers]
        if self.include_raw:
            for kind in ("bit", "gate_logit"):
                names += [f"{kind}[{k}][{i}]" for k, lp in self.layers.items()
                          for i in range(lp.freq.shape[1])]
        return names

    def to_arrays(self) -> dict[str, torch.Tensor]:
        """Flat tensors for safetensors storage (see :meth:`from_arrays`)."""
        arrays: dict[str, torch.Tensor] = {}
        for i, lp in enumerate(self.layers.values()):
            for name in ("freq", "mean", "var"):
                arrays[f"{i}.{name}"] = getattr(lp, name).contiguous()
            arrays[f"{i}.anomaly"] = torch.tensor([lp.anomaly_mean, lp.anomaly_std],
                                                  dtype=torch.float64)
            if lp.head_weight is not None:
                arrays[f"{i}.head_weight"] = lp.head_weight.contiguous()
                arrays[f"{i}.head_bias"] = lp.head_bias.contiguous()  # type: ignore[union-attr]
        return arrays

    @classmethod
    def from_arrays(cls, names: list[str], arrays: Mapping[str, torch.Tensor],
                    include_raw: bool, stability: tuple[str, ...] = ()) -> PathProfile:
        """Inverse of :meth:`to_arrays`; ``names`` are the layer names in order (the feature
        settings ``include_raw`` and ``stability`` are kept in the bundle's manifest)."""
        layers = {}
        for i, name in enumerate(names):
            a = arrays[f"{i}.anomaly"]
            layers[name] = LayerProfile(*(arrays[f"{i}.{f}"] for f in ("freq", "mean", "var")),
                                        float(a[0]), float(a[1]), arrays.get(f"{i}.head_weight"),
                                        arrays.get(f"{i}.head_bias"))
        return cls(layers, include_raw, stability=stability)


def fit_class_heads(paths: PathBatch, labels: ArrayLike, num_classes: int, *,
                    regularization: float = 1.0, seed: int = 0
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Class heads fitted on clean paths, for networks whose decoupling did not keep its own:
    per gated layer, a multinomial logistic regression q(y | z) on the gate bits z (scikit-learn,
    L2 with inverse strength ``regularization``).

    labels: (N,) classes of the paths' inputs. Returns layer -> ((K, C) weight, (K,) bias),
    float64; a class absent from ``labels`` gets a bias of -30 (probability ~0).
    """
    from sklearn.linear_model import LogisticRegression

    y = _tensor(labels).long().numpy()
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got {y.min()}..{y.max()}")
    heads = {}
    for name, bits in paths.bits.items():
        x = bits.detach().to(torch.float64).numpy()
        weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
        bias = torch.full((num_classes,), -30.0, dtype=torch.float64)
        present = np.unique(y)
        if len(present) == 1:
            bias[present] = 0.0
        else:
            clf = LogisticRegression(C=regularization, max_iter=1000, random_state=seed)
            clf.fit(x, y)
            coef, intercept = clf.coef_, clf.intercept_
            if len(present) == 2:  # scikit-learn's binary case: one row for the second class
                coef = np.stack([np.zeros_like(coef[0]), coef[0]])
                intercept = np.array([0.0, intercept[0]])
            weight[clf.classes_] = torch.as_tensor(coef, dtype=torch.float64)
            bias[clf.classes_] = torch.as_tensor(intercept, dtype=torch.float64)
        heads[name] = (weight, bias)
    return heads


def prediction_stats(logits: torch.Tensor) -> torch.Tensor:
    """(N, K) logits -> (N, 3) float64: softmax confidence, top-1 minus top-2 logit, softmax
    entropy (nats)."""
    z = _tensor(logits).to(torch.float64)
    p = torch.softmax(z, dim=1)
    top2 = z.topk(2, dim=1).values
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return torch.stack([p.max(1).values, top2[:, 0] - top2[:, 1], entropy], dim=1)
