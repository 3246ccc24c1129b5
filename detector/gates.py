"""Architecture control module and gated convolution.

Implements the gate of Li et al., "Interpretable Neural Network Decoupling" (ECCV 2020),
METHOD.md sections 1-2: a squeeze-excitation-like bottleneck reads the global average of a
conv layer's *input* and decides, before the convolution runs, which output filters are open.
Training uses Improved SemHash (noisy, saturated sigmoid mixed with hard bits, straight-through
gradient); inference uses hard bits ``z = 1(G(s) > 0)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from collections.abc import Iterator


class ControlModule(nn.Module):
    """G(s) = FC2(ReLU(FC1(GAP(x)))): gate logits for ``out_channels`` filters.

    Initialised as in the authors' code, so that the gates start input-independent and
    open-biased: FC1.weight = 0, FC1.bias = 1, FC2 Kaiming-normal, FC2.bias = 1, hence every
    logit is 1 + rowsum(FC2.weight) (about three quarters of the gates start open).

    ``normalize_input=True`` standardises s = GAP(x) per channel (batch statistics in training,
    running ones at inference; no learnt scale) before FC1. Not in the paper: where the pooled
    inputs differ little between images relative to their scale (airbench: class means spread
    by 0.03-0.08 around 0.07-0.38), FC1 starting at zero needs many steps to make the gates
    input-dependent, and the sparsity term closes a fixed set of filters first.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4,
                 normalize_input: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels, affine=False) if normalize_input else None
        hidden = max(in_channels // reduction, 4)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.fc1.weight)
        nn.init.ones_(self.fc1.bias)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.ones_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) layer input -> (B, C_out) real-valued gate logits."""
        s = x.mean(dim=(2, 3))  # (B, C_in)
        if self.norm is not None:
            s = self.norm(s)
        return self.fc2(F.relu(self.fc1(s)))


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


@dataclass
class GateRecord:
    """What one gated layer did in one forward pass (B = batch size, C = its filters).

    gates: (B, C) gate values z in [0, 1] (exactly 0/1 at inference; carries gradient in training).
    logits: (B, C) gate logits G(s) before binarisation.
    pooled: (B, C) global average of the layer's normalised output before masking, or None
        when the recorder did not ask for it.
    in_active: (B,) number of input channels that are not identically zero.
    in_channels, out_channels, macs: the layer's dense shape; macs = dense multiply-accumulates
        for one input at the observed spatial size.
    control_macs: multiply-accumulates of the control module for one input.
    """

    gates: torch.Tensor
    logits: torch.Tensor
    pooled: torch.Tensor | None
    in_active: torch.Tensor
    in_channels: int
    out_channels: int
    macs: int
    control_macs: int


@dataclass
class PathRecorder:
    """Collects :class:`GateRecord` s in execution order during one forward pass."""

    force_open: bool = False
    detach_input: bool = False
    pooled: bool = True
    records: dict[str, GateRecord] = field(default_factory=dict)


_RECORDER: ContextVar[PathRecorder | None] = ContextVar("pathguard_recorder", default=None)


@contextmanager
def recording(force_open: bool = False, detach_input: bool = False,
              pooled: bool = True) -> Iterator[PathRecorder]:
    """Record the gates of every forward pass run inside the block (this thread/task only).

    ``force_open=True`` opens every gate, which makes a decoupled network compute exactly like
    the network it was made from (useful for baselines and equivalence checks).
    ``detach_input=True`` feeds each control module a detached copy of its layer's input: losses
    on the gates then train the control modules only, not the convolutions before them (the
    values computed are the same).
    ``pooled=False`` leaves :attr:`GateRecord.pooled` empty (None): it needs every filter's
    output, closed ones included, which sparse execution can avoid computing only where no pool
    sits between conv and BN.
    """
    recorder = PathRecorder(force_open=force_open, detach_input=detach_input, pooled=pooled)
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


class ConvExecutor(Protocol):
    """Computes conv, BN and mask of one GatedConv whose gates are already decided."""

    def __call__(self, layer: GatedConv, x: torch.Tensor, z: torch.Tensor,
                 need_pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C_in, H, W) layer input, z: (B, C_out) gates -> masked output
        (B, C_out, H', W') and, if ``need_pooled``, the (B, C_out) spatial mean of the
        normalised output before masking (else None)."""


_EXECUTOR: ContextVar[ConvExecutor | None] = ContextVar("pathguard_conv_executor", default=None)


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


def conv_output_size(conv: nn.Conv2d, h: int, w: int) -> tuple[int, int]:
    """Output size (H', W') of ``conv`` for an (h, w) input."""
    if conv.padding == "same":
        return h, w
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv_geometry(conv)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def conv_geometry(conv: nn.Conv2d) -> tuple[tuple[int, ...], ...]:
    """(kernel, stride, padding, dilation) of ``conv`` as (h, w) pairs; string padding resolved."""
    k, d = conv.kernel_size, conv.dilation
    if conv.padding == "valid":
        p: tuple[int, ...] = (0, 0)
    elif conv.padding == "same":  # PyTorch pads the odd pixel at the end; stride is 1
        p = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    else:
        p = conv.padding  # type: ignore[assignment]
    return k, conv.stride, p, d


class GatedConv(nn.Module):
    """conv -> (pool) -> batch norm -> per-filter mask, the mask decided from the conv's input.

    Replaces a ``(Conv2d, BatchNorm2d)`` pair of the original network, with the pooling layer
    between them where the network has one (airbench's conv -> max-pool -> BN); the original
    modules are kept as ``conv``, ``pool`` and ``bn`` so their trained weights are reused. Closed
    filters are exactly zero after normalisation, hence also after a following ReLU or GELU.
    """

    def __init__(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d, reduction: int = 4,
                 pool: nn.Module | None = None, normalize_gate_input: bool = False) -> None:
        super().__init__()
        self.name = name
        self.bn_slot = "bn"  # attribute of the parent that held ``bn`` (set by decouple)
        self.pool_slot: str | None = None  # attribute of the parent that held ``pool``
        self.conv = conv
        self.pool = pool
        self.bn = bn
        self.control = ControlModule(conv.in_channels, conv.out_channels, reduction,
                                     normalize_gate_input)

    @property
    def control_macs(self) -> int:
        """Multiply-accumulates of the control module's two FC layers for one input."""
        fc1, fc2 = self.control.fc1, self.control.fc2
        return fc1.in_features * fc1.out_features + fc2.in_features * fc2.out_features

    def dense_macs(self, in_hw: tuple[int, int]) -> int:
        """Multiply-accumulates of the dense conv for one input of spatial size ``in_hw``."""
        kh, kw = self.conv.kernel_size
        per_pixel = self.conv.in_channels // self.conv.groups * kh * kw * self.conv.out_channels
        out_h, out_w = conv_output_size(self.conv, *in_hw)
        return per_pixel * out_h * out_w

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """bn(pool(conv(x))) of every filter: (B, C_in, H, W) -> (B, C_out, H', W')."""
        y = self.conv(x)
        return self.bn(y if self.pool is None else self.pool(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H', W') with closed filters set to 0."""
        recorder = _RECORDER.get()
        detach = recorder is not None and recorder.detach_input
        logits = self.control(x.detach() if detach else x)  # (B, C_out)
        if recorder is not None and recorder.force_open:
            z = torch.ones_like(logits)
        else:
            z = improved_semhash(logits, self.training)
        need_pooled = recorder is not None and recorder.pooled
        execute = _EXECUTOR.get()
        if execute is None:
            y = self.normalized(x)  # (B, C_out, H', W')
            out = y * z[:, :, None, None]
            pooled = y.mean(dim=(2, 3)) if need_pooled else None
        else:
            out, pooled = execute(self, x, z, need_pooled)
        if recorder is not None:
            recorder.records[self.name] = GateRecord(
                gates=z,
                logits=logits,
                pooled=pooled,
                in_active=(x.detach().abs().amax(dim=(2, 3)) > 0).sum(dim=1),
                in_channels=self.conv.in_channels,
                out_channels=self.conv.out_channels,
                macs=self.dense_macs((x.shape[2], x.shape[3])),
                control_macs=self.control_macs,
            )
        return out
