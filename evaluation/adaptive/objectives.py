"""The quantities every detector-aware attack descends on: the class margin and the detector's
score as a log-odds gap to its threshold."""

from __future__ import annotations

import math

import torch

#: Scores are clamped into [EPS, 1 - EPS] before their log-odds are taken.
EPS = 1e-12


def class_margin(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, K), y (B,) true classes -> (B,) ``logit_y - max_{j != y} logit_j`` (< 0 iff
    misclassified) and (B,) that best wrong class."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(),
                               -math.inf)
    best, cls = other.max(1)
    return true - best, cls


def score_gap(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """scores (B,) in [0, 1] -> (B,) float64 ``logit(score) - logit(threshold)``, > 0 exactly
    when the detector flags (score above its threshold)."""
    s = scores.to(torch.float64).clamp(EPS, 1 - EPS)
    t = min(max(threshold, EPS), 1 - EPS)
    return torch.log(s) - torch.log1p(-s) - (math.log(t) - math.log1p(-t))
