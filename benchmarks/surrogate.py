"""Differentiable stand-ins for the path detector, for adaptive (white-box) attacks.

The deployed pipeline (:func:`detector.analysis.analyze`) is not differentiable in two places:
the gates are hard bits ``z = 1(G(s) > 0)``, and the detector is a random forest on statistics
of those bits. This module supplies what a gradient-based attacker needs, without touching the
inference code:

- :func:`straight_through_gates`: BPDA for the gates. Inside the block every ``GatedConv`` runs
  through a :class:`~detector.gates.ConvExecutor` (the extension point the sparse executor
  uses) whose forward output is exactly the masked output of inference (hard 0/1 gates), while
  the backward pass differentiates the mask as if it were ``sigmoid(G(s))`` (``"sigmoid"``) or
  the saturated sigmoid that the gates' training-time straight-through estimator uses
  (``"semhash"``; its gradient vanishes for ``|G(s)| > 2.4``). Gradients then also flow through
  the architecture control modules into the input.
- :class:`TorchPathFeatures`: :meth:`detector.features.PathProfile.transform` re-expressed in
  torch (float64), against any class the caller chooses (the detector uses the predicted class;
  an attacker uses the class it is pushing the input into), with straight-through bits.
- :class:`Surrogate` and :func:`fit_surrogate`: a differentiable model of the *real* detector's
  verdict, fitted on features and the real detector's flags (distillation of its decision), or
  a label-free anomaly score (standardised squared distance to clean features).
- :func:`real_verdict`: the real pipeline's predictions, scores and flags, computed from a
  path exactly as :func:`detector.analysis.analyze` does (used to judge attacks; never the
  surrogate).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from detector.bundle import Bundle
from detector.features import LAYER_STATS, PathBatch, PathProfile
from detector.gates import GatedConv, conv_executor, saturated_sigmoid
from detector.paths import PathResult

STE_KINDS = ("sigmoid", "semhash")
SURROGATES = ("mlp", "logistic", "anomaly")


def soft_gates(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Differentiable gate values from gate logits (B, C) -> (B, C) in [0, 1].

    ``"sigmoid"``: sigmoid(logits); ``"semhash"``: clamp(1.2 sigmoid(logits) - 0.1, 0, 1), the
    noise-free version of the training-time estimator in :func:`detector.gates.improved_semhash`.
    """
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "semhash":
        return saturated_sigmoid(logits)
    raise ValueError(f"unknown straight-through kind {kind!r}; choose one of {STE_KINDS}")


def straight_through(hard: torch.Tensor, logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Value of ``hard`` (B, C) in {0, 1}, gradient of :func:`soft_gates` (``logits``)."""
    soft = soft_gates(logits, kind)
    return hard + (soft - soft.detach())


class _StraightThroughExecutor:
    """ConvExecutor: conv -> BN -> mask with straight-through gates (value unchanged)."""

    def __init__(self, kind: str) -> None:
        soft_gates(torch.zeros(1), kind)  # validates the kind
        self.kind = kind

    def __call__(self, layer: GatedConv, x: torch.Tensor, z: torch.Tensor,
                 need_pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C_in, H, W), z: (B, C_out) hard gates -> masked (B, C_out, H', W'), pooled."""
        y = layer.normalized(x)
        logits = layer.control(x)  # the same logits GatedConv computed, recomputed for the graph
        mask = straight_through(z, logits, self.kind)
        out = y * mask[:, :, None, None]
        return out, (y.mean(dim=(2, 3)) if need_pooled else None)


@contextmanager
def straight_through_gates(kind: str = "sigmoid") -> Iterator[None]:
    """BPDA for every gated layer run inside the block (this thread/task only).

    Forward values (logits, paths) are bit-for-bit those of inference in eval mode; gradients
    of the masks follow :func:`soft_gates`. Not meant for ``force_open`` passes.
    """
    with conv_executor(_StraightThroughExecutor(kind)):
        yield


class TorchPathFeatures(nn.Module):
    """:meth:`PathProfile.transform` in torch: path -> (B, F) features, differentiable.

    Buffers are float64 copies of the profile's per-class statistics; the features are computed
    in float64 and returned as float32, like the numpy version (agreement about 1e-6 relative).
    """

    def __init__(self, profile: PathProfile) -> None:
        super().__init__()
        self.layer_names = profile.layer_names
        self.include_raw = profile.include_raw
        for i, lp in enumerate(profile.layers.values()):
            freq = torch.from_numpy(np.asarray(lp.freq, dtype=np.float64))
            self.register_buffer(f"log_freq{i}", torch.log(freq))
            self.register_buffer(f"log1m_freq{i}", torch.log1p(-freq))
            self.register_buffer(f"majority{i}", (freq > 0.5).to(torch.float64))
            self.register_buffer(f"mean{i}", torch.from_numpy(np.asarray(lp.mean, np.float64)))
            self.register_buffer(f"inv_var{i}",
                                 1.0 / torch.from_numpy(np.asarray(lp.var, np.float64)))

    def _buf(self, name: str, i: int) -> torch.Tensor:
        return getattr(self, f"{name}{i}")

    def forward(self, result: PathResult, classes: torch.Tensor,
                ste: str | None = "sigmoid") -> torch.Tensor:
        """result: a path of B inputs; classes: (B,) int64 class to score each path against.

        ``ste``: straight-through kind for the bits (their values are the recorded hard bits);
        None uses the recorded bits as they are (no gradient through them). Returns (B, F)
        float32 in the order of :meth:`PathProfile.feature_names`.
        """
        classes = classes.long()
        rows = torch.arange(len(classes))
        stats: dict[str, list[torch.Tensor]] = {s: [] for s in LAYER_STATS}
        raw_bits, raw_logits = [], []
        for i, name in enumerate(self.layer_names):
            layer = result.layers[name]
            g = layer.logits.to(torch.float64)  # (B, C)
            hard = layer.bits.detach().to(torch.float64)
            b = hard if ste is None else straight_through(hard, g, ste)
            c = b.shape[1]
            log_f, log_1mf = self._buf("log_freq", i), self._buf("log1m_freq", i)  # (K, C)
            nll_all = -(b @ log_f.T + (1 - b) @ log_1mf.T) / c  # (B, K)
            mean, inv = self._buf("mean", i), self._buf("inv_var", i)
            dist_all = ((g[:, None, :] - mean[None]) ** 2 * inv[None]).mean(-1)  # (B, K)
            maj = self._buf("majority", i)[classes]  # (B, C)
            nll, dist = nll_all[rows, classes], dist_all[rows, classes]
            stats["bit_nll"].append(nll)
            stats["bit_excess"].append(nll - nll_all.min(1).values)
            stats["hamming"].append((b + maj - 2 * b * maj).mean(1))  # = (b != maj) for bits
            stats["logit_dist"].append(dist)
            stats["logit_excess"].append(dist - dist_all.min(1).values)
            stats["margin"].append(g.abs().mean(1))
            stats["open"].append(b.mean(1))
            raw_bits.append(b)
            raw_logits.append(g)
        parts = [torch.stack(stats[s], dim=1) for s in LAYER_STATS]  # each (B, L)
        parts.append(prediction_stats(result.logits))
        if self.include_raw:
            parts += raw_bits + raw_logits
        return torch.cat(parts, dim=1).to(torch.float32)


def prediction_stats(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> (B, 3) float64: softmax confidence, top-1 minus top-2 logit, entropy
    (nats), as :func:`detector.features.prediction_stats`."""
    z = logits.to(torch.float64)
    p = torch.softmax(z, dim=1)
    top2 = z.topk(2, dim=1).values
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return torch.stack([p.max(1).values, top2[:, 0] - top2[:, 1], entropy], dim=1)


class Surrogate(nn.Module):
    """Differentiable detector stand-in: (B, F) features -> (B,) score, > 0 meaning "flagged".

    ``kind``: ``"mlp"`` (two hidden layers of ``hidden`` SiLU units) or ``"logistic"`` (linear),
    both on standardised features and fitted to the real detector's flags; ``"anomaly"``:
    mean squared z-score of the features against clean inputs, minus ``offset`` (a label-free
    distance; its scale is not a log-odds).
    """

    def __init__(self, n_features: int, kind: str = "mlp", hidden: int = 64) -> None:
        super().__init__()
        if kind not in SURROGATES:
            raise ValueError(f"unknown surrogate {kind!r}; choose one of {SURROGATES}")
        self.kind = kind
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("offset", torch.zeros(()))
        if kind == "mlp":
            self.net: nn.Module = nn.Sequential(
                nn.Linear(n_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                nn.Linear(hidden, 1))
        else:
            self.net = nn.Linear(n_features, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, F) float32 -> (B,) float32 score (log-odds of "flagged" if fitted)."""
        z = (features - self.mean) / self.std
        if self.kind == "anomaly":
            return (z**2).mean(1) - self.offset
        return self.net(z).squeeze(1)


@dataclass(frozen=True)
class SurrogateFit:
    """A fitted surrogate and how well it agrees with the real detector on held-out points.

    n_points / n_flagged: fitting points and how many the real detector flags;
    holdout_accuracy / holdout_balanced: agreement (sign of the score vs the real flag) on the
    held-out fifth of the points.
    """

    surrogate: Surrogate
    n_points: int
    n_flagged: int
    holdout_accuracy: float
    holdout_balanced: float


def fit_surrogate(features: torch.Tensor, flagged: torch.Tensor, clean: torch.Tensor, *,
                  kind: str = "mlp", seed: int = 0, epochs: int = 400,
                  hidden: int = 64) -> SurrogateFit:
    """Fit a :class:`Surrogate` to the real detector's flags.

    features: (N, F) float32 path features (:class:`TorchPathFeatures` of the real predicted
    class); flagged: (N,) bool, the real detector's verdict at its threshold; clean: (N,) bool,
    unmodified clean inputs (the anomaly surrogate's reference). A random fifth is held out to
    measure agreement. Full-batch Adam on class-balanced logistic loss.
    """
    n = len(features)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    hold, fit = perm[: n // 5], perm[n // 5:]
    sur = Surrogate(features.shape[1], kind, hidden)
    ref = features[fit][clean[fit]] if kind == "anomaly" else features[fit]
    if len(ref) < 2:
        raise ValueError("too few fitting points for the surrogate")
    sur.mean.copy_(ref.mean(0))
    sur.std.copy_(ref.std(0).clamp_min(1e-6))
    y = flagged.to(torch.float32)
    if kind == "anomaly":
        with torch.no_grad():  # offset: the score that best separates the real flags
            s = sur(features[fit])
            grid = torch.quantile(s, torch.linspace(0.01, 0.99, 99))
            acc = torch.stack([_balanced((s > t), flagged[fit]) for t in grid])
            sur.offset.fill_(float(grid[acc.argmax()]))
    else:
        torch.manual_seed(seed)
        for m in sur.net.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()
        pos = float(y[fit].sum())
        weight = torch.tensor(max(len(fit) - pos, 1.0) / max(pos, 1.0))
        opt = torch.optim.Adam(sur.net.parameters(), lr=1e-2, weight_decay=1e-4)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)
        for _ in range(epochs):
            opt.zero_grad()
            loss = loss_fn(sur(features[fit]), y[fit])
            loss.backward()
            opt.step()
    sur.requires_grad_(False)
    with torch.no_grad():
        pred = sur(features[hold]) > 0
    truth = flagged[hold]
    return SurrogateFit(sur, n, int(flagged.sum()),
                        float((pred == truth).float().mean()) if len(hold) else float("nan"),
                        float(_balanced(pred, truth)) if len(hold) else float("nan"))


def _balanced(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Balanced accuracy of bool predictions (N,) against bool truth (N,); a class without
    samples counts as fully right."""
    tpr = (pred & truth).sum() / truth.sum() if truth.any() else torch.tensor(1.0)
    tnr = (~pred & ~truth).sum() / (~truth).sum() if (~truth).any() else torch.tensor(1.0)
    return (tpr + tnr) / 2


@dataclass(frozen=True)
class Verdict:
    """The real pipeline's output for B inputs (numpy): predictions (B,), scores (B,) in [0, 1],
    flagged (B,) bool (score above the bundle's threshold)."""

    predictions: np.ndarray
    scores: np.ndarray
    flagged: np.ndarray


def real_verdict(bundle: Bundle, result: PathResult) -> Verdict:
    """Predictions and detector verdicts of the real pipeline for an eval-mode path.

    Exactly the computation of :func:`detector.analysis.analyze` after its forward pass (real
    features from :class:`PathProfile`, the bundle's scikit-learn detector and threshold).
    """
    paths = PathBatch.from_result(result)
    preds = paths.logits.argmax(1)
    stats = bundle.profile.layer_stats(paths, preds)
    scores = bundle.detector.predict_proba(bundle.profile.transform(paths, stats))[:, 1]
    return Verdict(preds, scores, scores > bundle.detector.threshold_)
