"""The gated convolution: conv -> (pool) -> BN -> per-filter mask decided from the conv's input.

Li et al., "Interpretable Neural Network Decoupling" (ECCV 2020): each gated layer has an
architecture control module (:mod:`detector.control`) whose logits become gates by Improved
SemHash (:mod:`detector.semhash`); a :func:`detector.recording.recording` block records what
each layer did, and a :func:`detector.conv_executor.conv_executor` block changes how the
convolution runs once the gates are decided (sparse, straight-through).
"""

from __future__ import annotations

import torch
from torch import nn

from detector.control import ControlModule
from detector.conv_executor import current_executor
from detector.recording import GateRecord, current_recorder
from detector.semhash import improved_semhash


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
                 pool: nn.Module | None = None, normalize_gate_input: bool = False,
                 initial_gate_logit: float = 1.0) -> None:
        super().__init__()
        self.name = name
        self.bn_slot = "bn"  # attribute of the parent that held ``bn`` (set by decouple)
        self.pool_slot: str | None = None  # attribute of the parent that held ``pool``
        self.conv = conv
        self.pool = pool
        self.bn = bn
        self.control = ControlModule(conv.in_channels, conv.out_channels, reduction,
                                     normalize_gate_input, initial_gate_logit)

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
        recorder = current_recorder()
        detach = recorder is not None and recorder.detach_input
        logits = self.control(x.detach() if detach else x)  # (B, C_out)
        if recorder is not None and recorder.force_open:
            z = torch.ones_like(logits)
        else:
            z = improved_semhash(logits, self.training)
        need_pooled = recorder is not None and recorder.pooled
        execute = current_executor()
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
