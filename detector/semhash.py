"""Improved SemHash (Kaiser & Bengio 2018): binary gates with a training-time gradient.

METHOD.md section 2: training uses noisy, saturated-sigmoid values mixed with hard bits and a
straight-through gradient; inference uses hard bits ``z = 1(G(s) > 0)``.
"""

from __future__ import annotations

import torch


def saturated_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """clamp(1.2 sigmoid(x) - 0.1, 0, 1), elementwise, in [0, 1] (Kaiser & Bengio 2018)."""
    return torch.clamp(1.2 * torch.sigmoid(x) - 0.1, 0.0, 1.0)


def improved_semhash(logits: torch.Tensor, training: bool) -> torch.Tensor:
    """Binary gates from gate logits (B, C) -> (B, C) with values in [0, 1].

    Training: g = logits + N(0, 1); v1 = clamp(1.2 sigmoid(g) - 0.1, 0, 1); v2 = 1(g > 0).
    Each entry uses v1 or v2 with probability 1/2 in the forward pass; the backward pass always
    takes the gradient of v1 (straight-through). Inference: hard bits 1(logits > 0), no noise.
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    g = logits + torch.randn_like(logits)
    v1 = saturated_sigmoid(g)
    v2 = (g > 0).to(logits.dtype)
    hard = v1 + (v2 - v1).detach()  # value v2, gradient of v1
    use_soft = torch.rand_like(logits) < 0.5
    return torch.where(use_soft, v1, hard)
