"""A differentiable stand-in for the path detector's verdict, for adaptive (white-box) attacks.

The shipped scoring step (:func:`detector.analysis.score_paths`) is differentiable up to the
features (straight-through gates: :mod:`detector.straight_through`); its last step, the fitted
scikit-learn detector (a random forest by default), is piecewise constant. An attacker
therefore descends on :class:`Surrogate`, fitted by :func:`fit_surrogate` on the shipped
features and the real detector's flags (distillation of its decision), or a label-free anomaly
score (standardised squared distance to clean features). Attacks are always judged by the real
pipeline, never by the surrogate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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
