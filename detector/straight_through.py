"""Straight-through gates: hard 0/1 gates forward, a smooth surrogate's gradient backward.

The gates of a decoupled network are hard bits ``z = 1(G(s) > 0)`` at inference, so the path,
and every score computed from it, has no useful gradient. Gradient-based (white-box) attacks
on the shipped pipeline use BPDA (Athalye et al., ICML 2018): inside
:func:`straight_through_gates` every :class:`~detector.gates.GatedConv` runs through an
executor (the mechanism :mod:`detector.sparse` uses) whose forward output is exactly the masked
output of inference, while the backward pass differentiates the mask as if it were
``sigmoid(G(s))`` (``"sigmoid"``) or the saturated sigmoid of the training-time estimator
(``"semhash"``; its gradient vanishes for ``|G(s)| > 2.4``). Gradients then flow through the
architecture control modules into the input; :meth:`detector.features.PathBatch.from_result`
with ``ste=`` gives the bits the same treatment, so the path features are differentiable too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from detector.conv_executor import conv_executor
from detector.gates import GatedConv
from detector.semhash import saturated_sigmoid

STE_KINDS = ("sigmoid", "semhash")


def soft_gates(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Differentiable gate values from gate logits (B, C) -> (B, C) in [0, 1].

    ``"sigmoid"``: sigmoid(logits); ``"semhash"``: clamp(1.2 sigmoid(logits) - 0.1, 0, 1), the
    noise-free version of the training-time estimator in :func:`detector.semhash.improved_semhash`.
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
