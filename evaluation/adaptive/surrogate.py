"""A differentiable stand-in for the path detector's verdict, for adaptive (white-box) attacks.

The shipped scoring step (:func:`detector.analysis.score_paths`) is differentiable up to the
features (straight-through gates: :mod:`detector.straight_through`); its last step, the fitted
scikit-learn detector (a random forest by default), is piecewise constant. An attacker
therefore descends on :class:`Surrogate`, fitted by :func:`fit_surrogate` on the shipped
features and the real detector's flags (distillation of its decision), or a label-free anomaly
score (standardised squared distance to clean features). Where the detector has an exact torch
export (logistic or MLP inner model: :attr:`detector.bundle.Bundle.exported`) nothing needs to
be fitted: :class:`ShippedScore` is the shipped score itself. :func:`fit_attack_surrogate` fits
the stand-in
where the attack goes: on the iterates of detector-aware PGD
(:mod:`evaluation.adaptive.pgd`), refitted on the attack's own iterates. Attacks are always
judged by the real pipeline, never by the surrogate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from detector.bundle import Bundle
from detector.differentiable import TorchDetector
from evaluation.adaptive.objectives import score_gap
from evaluation.adaptive.pgd import Iterates, PGDConfig, pgd_run

log = logging.getLogger(__name__)

SURROGATES = ("mlp", "logistic", "anomaly")


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


class ShippedScore(nn.Module):
    """The bundle's own detector score as a stand-in, where it is exact in torch: (B, F)
    features -> (B,) ``logit(score) - logit(threshold)`` (float64), > 0 exactly when the real
    detector flags. Build it with :meth:`of`."""

    def __init__(self, exported: TorchDetector, threshold: float) -> None:
        super().__init__()
        self.exported = exported
        self.threshold = threshold

    @classmethod
    def of(cls, bundle: Bundle) -> ShippedScore | None:
        """The stand-in for ``bundle``, None where its detector has no exact differentiable torch
        export (tree ensembles, isotonic calibration)."""
        if bundle.exported is None or not bundle.exported.differentiable:
            return None
        return cls(bundle.exported, float(bundle.detector.threshold_))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return score_gap(self.exported(features), self.threshold)


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

    features: (N, F) float32 path features against the real predicted class (as
    :func:`detector.analysis.score_paths` computes them); flagged: (N,) bool, the real
    detector's verdict at its threshold; clean: (N,) bool, unmodified clean inputs (the anomaly
    surrogate's reference). A random fifth is held out to
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


def fit_attack_surrogate(bundle: Bundle, x: torch.Tensor, y: torch.Tensor,
                         configs: Sequence[PGDConfig], lambdas: Sequence[float], *,
                         kind: str = "mlp", rounds: int = 1, seed: int = 0,
                         batch_size: int = 300) -> tuple[Surrogate, list[dict[str, Any]]]:
    """Fit the surrogate on images x (N, C, H, W) in [0, 1], labels y (N,), that the attack
    will not be evaluated on (the benchmark takes them from the detector's fitting side).

    Round 0: clean images and every iterate of margin-only PGD (lambda 0) at each config;
    each of the ``rounds`` further rounds adds every iterate of the detector-aware attack with
    the current surrogate at each positive lambda and config. Returns the surrogate and
    per-round diagnostics (points, flagged, held-out agreement, seconds).
    """
    data = Iterates()
    history: list[dict[str, Any]] = []
    surrogate: Surrogate | None = None
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        lams = [0.0] if r == 0 else [lam for lam in lambdas if lam > 0]
        for cfg in configs:
            for lam in lams:
                for start in range(0, len(y), batch_size):
                    sl = slice(start, start + batch_size)
                    pgd_run(bundle, surrogate, x[sl], y[sl], lam, cfg,
                            stop_on_success=False, collect=data, seed=seed + r)
        X, flagged, clean = data.tensors()
        fit = fit_surrogate(X, flagged, clean, kind=kind, seed=seed)
        surrogate = fit.surrogate
        history.append({"round": r, "points": fit.n_points, "flagged": fit.n_flagged,
                        "holdout_accuracy": fit.holdout_accuracy,
                        "holdout_balanced_accuracy": fit.holdout_balanced,
                        "seconds": time.perf_counter() - t0})
        log.info("surrogate round %d: %d points (%d flagged), held-out agreement %.3f "
                 "(balanced %.3f), %.0fs", r, fit.n_points, fit.n_flagged,
                 fit.holdout_accuracy, fit.holdout_balanced, history[-1]["seconds"])
    assert surrogate is not None
    return surrogate, history
