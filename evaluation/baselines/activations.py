"""Hidden activations of a decoupled network for the Mahalanobis and LID baselines.

The baselines read the network's own activations rather than its computation path. By default
every gate is forced open (:func:`detector.recording.recording` with ``force_open=True``), so the
decoupled network computes exactly like the dense network it was made from; a gated conv's output
is then its batch-normalised conv output (before the following ReLU).

Layers are named like the computation path (module path of the gated conv, e.g.
``layer2.0.conv1``: its batch-normalised output), ``<gated conv>:input`` (what that conv reads:
the previous layer's output after its activation function, e.g. ``layer2.0.conv1:input`` is the
output of the last block of ``layer1``, residual sum and ReLU included), plus ``penultimate``
(the input of the final linear classifier) and ``logits``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from detector.control import ControlModule
from detector.gates import GatedConv
from detector.recording import recording

PENULTIMATE = "penultimate"
LOGITS = "logits"
INPUT = ":input"
"""Suffix of a gated conv's name that names its input (see the module docstring)."""


def conv_input(name: str) -> str:
    """The layer name of what gated conv ``name`` reads."""
    return name + INPUT


def gated_modules(model: nn.Module) -> dict[str, GatedConv]:
    """Gated convs in execution (module) order, by path name."""
    return {m.name: m for m in model.modules() if isinstance(m, GatedConv)}


def classifier_layer(model: nn.Module) -> nn.Linear:
    """The final linear classifier: the last ``nn.Linear`` outside the gates' control modules."""
    inside = {id(c) for m in model.modules() if isinstance(m, ControlModule) for c in m.modules()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside]
    if not linears:
        raise ValueError("model has no linear classifier layer")
    return linears[-1]


def output_sizes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, int]]:
    """Spatial output size (H, W) of every gated conv for one (C, H, W) input."""
    names = list(gated_modules(model))
    acts = _one_pass(model, names, input_shape)
    return {n: (int(acts[n].shape[2]), int(acts[n].shape[3])) for n in names}


def _one_pass(model: nn.Module, names: Sequence[str], input_shape: tuple[int, int, int]
              ) -> dict[str, torch.Tensor]:
    """The activations ``names`` of one zero (C, H, W) input, every gate open, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with activations(model, names, force_open=True) as acts, torch.no_grad():
            model(torch.zeros(1, *input_shape))
            return dict(acts)
    finally:
        model.train(was_training)


def select_inputs(model: nn.Module, input_shape: tuple[int, int, int],
                  max_layers: int = 6) -> list[str]:
    """What the gated convs read (``<conv>:input``), as Lee et al. read a ResNet after its stem
    and after each stage: a conv that reads the same tensor as an earlier one (a shortcut conv
    reads its block's input) is left out; all the rest if at most ``max_layers``, else the first
    (the stem's output) and the last at each spatial resolution (the output of each stage, as
    the next stage's strided conv reads it; the last stage's output is :data:`PENULTIMATE`,
    pooled). In execution order."""
    names = [conv_input(n) for n in gated_modules(model)]
    acts = _one_pass(model, names, input_shape)
    seen: set[int] = set()
    distinct = []
    for name in names:  # execution order
        if id(acts[name]) not in seen:
            seen.add(id(acts[name]))
            distinct.append(name)
    if len(distinct) <= max_layers:
        return distinct
    last: dict[tuple[int, int], str] = {}
    for name in distinct:  # later inputs of the same resolution overwrite
        last[tuple(acts[name].shape[2:])] = name
    keep = {distinct[0], *last.values()}
    return [n for n in distinct if n in keep]


def select_layers(model: nn.Module, input_shape: tuple[int, int, int],
                  max_layers: int = 6) -> list[str]:
    """Gated convs to read: all of them if there are at most ``max_layers``, else the last gated
    conv at each spatial resolution (the end of each stage, as Lee et al. use block outputs)."""
    names = list(gated_modules(model))
    if len(names) <= max_layers:
        return names
    sizes = output_sizes(model, input_shape)
    last: dict[tuple[int, int], str] = {}
    for name in names:  # execution order: later layers of the same resolution overwrite
        last[sizes[name]] = name
    keep = set(last.values())
    return [n for n in names if n in keep]


@contextmanager
def activations(model: nn.Module, names: Sequence[str], *, force_open: bool = True
                ) -> Iterator[dict[str, torch.Tensor]]:
    """Capture activations of every forward pass run inside the block.

    ``names``: gated conv names, their inputs (:func:`conv_input`), :data:`PENULTIMATE` and/or
    :data:`LOGITS`. The yielded dict is filled (and overwritten) by each forward pass: gated
    conv -> (B, C, H, W) output, its input -> (B, C', H', W'), penultimate -> (B, D) classifier
    input, logits -> (B, K). Tensors carry gradients if the caller enables them.
    ``force_open`` opens every gate (the dense network).
    """
    gated = gated_modules(model)
    inputs_of = {conv_input(n): n for n in gated}
    unknown = [n for n in names
               if n not in gated and n not in inputs_of and n not in (PENULTIMATE, LOGITS)]
    if unknown:
        raise ValueError(f"unknown layers {unknown}; gated layers are {list(gated)}")
    store: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            store[name] = out
        return hook

    def keep_input(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            store[name] = inputs[0]
        return hook

    for name in names:
        if name in gated:
            handles.append(gated[name].register_forward_hook(keep(name)))
        elif name in inputs_of:
            handles.append(gated[inputs_of[name]].register_forward_pre_hook(keep_input(name)))
    fc = classifier_layer(model)
    if PENULTIMATE in names:
        handles.append(fc.register_forward_pre_hook(
            lambda module, inputs: store.__setitem__(PENULTIMATE, inputs[0])))
    if LOGITS in names:
        handles.append(fc.register_forward_hook(keep(LOGITS)))
    try:
        with recording(force_open=force_open):
            yield store
    finally:
        for h in handles:
            h.remove()


def flat(a: torch.Tensor, pooled: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) spatial mean if ``pooled`` else (B, C*H*W); 2-D input unchanged."""
    if a.dim() == 2:
        return a
    return a.mean(dim=(2, 3)) if pooled else a.flatten(1)


def encoder(model: nn.Module, names: Sequence[str], *, pooled: bool, force_open: bool = True
            ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """x: (B, C, H, W) in [0, 1] -> layer name -> (B, D) features (pooled or flattened).

    Respects the caller's grad mode, so it can be differentiated with respect to x.
    """
    def encode(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with activations(model, names, force_open=force_open) as acts:
            model(x)
            return {n: flat(acts[n], pooled) for n in names}
    return encode


@torch.no_grad()
def collect(encode: Callable[[torch.Tensor], dict[str, torch.Tensor]], x: torch.Tensor,
            batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Features of x: (N, C, H, W) in batches -> layer name -> (N, D) float32 tensors."""
    parts = [encode(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
