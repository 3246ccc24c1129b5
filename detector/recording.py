"""Recording what every gated layer did in a forward pass: its gates, logits and cost.

A :func:`recording` block collects one :class:`GateRecord` per :class:`~detector.gates.GatedConv`
run inside it (this thread/task only); :func:`detector.paths.compute_path` turns them into a
computation path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch


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


def current_recorder() -> PathRecorder | None:
    """The recorder of the innermost :func:`recording` block of this thread/task, if any."""
    return _RECORDER.get()


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
