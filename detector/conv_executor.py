"""How a gated layer computes once its gates are decided: the extension point of execution.

By default a :class:`~detector.gates.GatedConv` computes every filter and zeroes the closed
ones (masked execution). Inside a :func:`conv_executor` block (this thread/task only) it calls
the given :class:`ConvExecutor` instead: :mod:`detector.sparse` runs only the open filters,
:mod:`detector.straight_through` keeps the masked values and gives the mask a gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from detector.gates import GatedConv


class ConvExecutor(Protocol):
    """Computes conv, BN and mask of one GatedConv whose gates are already decided."""

    def __call__(self, layer: GatedConv, x: torch.Tensor, z: torch.Tensor,
                 need_pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C_in, H, W) layer input, z: (B, C_out) gates -> masked output
        (B, C_out, H', W') and, if ``need_pooled``, the (B, C_out) spatial mean of the
        normalised output before masking (else None)."""


_EXECUTOR: ContextVar[ConvExecutor | None] = ContextVar("pathguard_conv_executor", default=None)


def current_executor() -> ConvExecutor | None:
    """The executor of the innermost :func:`conv_executor` block of this thread/task, if any."""
    return _EXECUTOR.get()


@contextmanager
def conv_executor(executor: ConvExecutor) -> Iterator[None]:
    """Run conv, BN and mask of every GatedConv inside the block through ``executor``.

    Affects this thread/task only; used by :func:`detector.sparse.sparse_execution`.
    """
    token = _EXECUTOR.set(executor)
    try:
        yield
    finally:
        _EXECUTOR.reset(token)
