"""Computation paths: one forward pass -> logits + per-layer gate bits and gate logits.

A computation path is an ordered mapping ``layer name -> (bits, gate logits)`` where the layer
name is the module path of the conv in the original network (``layer2.0.conv1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detector.gates import GatedConv
from detector.recording import recording


@dataclass(frozen=True)
class LayerPath:
    """One gated layer for a batch of B inputs and its C filters.

    bits: (B, C) float32 in {0, 1}, 1 = filter open.
    logits: (B, C) gate logits G(s); bits = 1(logits > 0) at inference.
    pooled: (B, C) global average of the layer's normalised output before masking (None when
        the path was computed with ``pooled=False``).
    dense_macs: multiply-accumulates of the dense conv for one input.
    executed_macs: (B,) multiply-accumulates when only open filters on non-zero inputs run,
        plus the control module's own cost.
    """

    bits: torch.Tensor
    logits: torch.Tensor
    pooled: torch.Tensor | None
    dense_macs: int
    executed_macs: torch.Tensor

    @property
    def open_fraction(self) -> torch.Tensor:
        """(B,) share of open filters in [0, 1]."""
        return self.bits.mean(dim=1)


@dataclass(frozen=True)
class PathResult:
    """logits: (B, K) class scores; layers: gated layers in execution order."""

    logits: torch.Tensor
    layers: dict[str, LayerPath]

    def bits(self) -> torch.Tensor:
        """(B, sum C) concatenated gate bits: the path as one binary vector."""
        return torch.cat([p.bits for p in self.layers.values()], dim=1)

    def gate_logits(self) -> torch.Tensor:
        """(B, sum C) concatenated gate logits."""
        return torch.cat([p.logits for p in self.layers.values()], dim=1)

    def open_fraction(self) -> torch.Tensor:
        """(B,) share of open filters over all gated layers, in [0, 1]."""
        return self.bits().mean(dim=1)

    def flops_fraction(self, network_macs: int) -> torch.Tensor:
        """(B,) executed / dense multiply-accumulates of the whole network, in (0, ~1].

        ``network_macs`` is the dense network's total for one input (:func:`network_macs`).
        """
        gated_dense = sum(p.dense_macs for p in self.layers.values())
        executed = sum(p.executed_macs for p in self.layers.values())
        return (network_macs - gated_dense + executed) / network_macs


def to_inference_layout(x: torch.Tensor) -> torch.Tensor:
    """x: (B, C, H, W) laid out channels_last (NHWC), the layout every inference pass runs in
    (fitting the detector, serving, attacking: they all read the same scores); the same values.
    A CIFAR-10 bundle's forward pass takes 0.74-0.81x the time it takes in NCHW on x86 CPUs
    (``benchmarks/memory_format.py``). Other shapes are returned as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def compute_path(model: nn.Module, x: torch.Tensor, force_open: bool = False,
                 detach_gate_input: bool = False, pooled: bool = True) -> PathResult:
    """Run ``model`` once on x: (B, C, H, W) in [0, 1] and return logits and path.

    Gradients flow if the caller enables them; the model's mode (train/eval) is respected.
    ``detach_gate_input=True`` stops gradients from the gates into the layers before them
    (training only; see :func:`detector.recording.recording`). ``pooled=False`` skips
    :attr:`LayerPath.pooled` (the decoupling loss needs it, detection does not), which lets sparse
    execution skip closed filters of layers with a pool between conv and BN. In eval mode x runs
    in :func:`to_inference_layout` (results as in NCHW up to float rounding).
    """
    if not model.training:
        x = to_inference_layout(x)
    with recording(force_open=force_open, detach_input=detach_gate_input,
                   pooled=pooled) as rec:
        logits = model(x)
    layers = {}
    for name, r in rec.records.items():
        open_out = r.gates.detach().sum(dim=1)
        executed = r.macs * open_out * r.in_active / (r.out_channels * r.in_channels)
        layers[name] = LayerPath(
            bits=r.gates,
            logits=r.logits,
            pooled=r.pooled,
            dense_macs=r.macs,
            executed_macs=executed + r.control_macs,
        )
    return PathResult(logits=logits, layers=layers)


def network_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Dense multiply-accumulates of all Conv2d and Linear layers for one (C, H, W) input."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            per_px = module.in_channels // module.groups * kh * kw * module.out_channels
            total += per_px * out.shape[2] * out.shape[3]
        else:
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d | nn.Linear) and not _in_control(m, model)]
    was_training = model.training
    model.eval()  # no batch-norm statistics updates from the probe input
    try:
        with torch.no_grad(), recording(force_open=True):
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def _in_control(module: nn.Module, model: nn.Module) -> bool:
    return any(module is c for g in model.modules() if isinstance(g, GatedConv)
               for c in g.control.modules())
