"""Turn a trained CNN into a decoupled (gated) one, keeping its weights.

Every ``Conv2d`` followed by its ``BatchNorm2d`` becomes a :class:`~detector.gates.GatedConv`
(the BN slot becomes ``Identity``), except the stem: the first conv of the network. The mask
therefore lands after normalisation, which equals masking after the ReLU of plain layers and
masks the residual branch before the add in ResNet blocks (downsample convs get their own gate).

Pairs are found in two layouts: consecutive ``Conv2d, BatchNorm2d`` in a ``Sequential`` (VGG,
the small CNN, ResNet downsample branches) and sibling attributes ``convK``/``bnK`` (ResNet
BasicBlock and Bottleneck, airbench's conv groups). A sibling ``poolK`` between them (airbench:
conv -> max-pool -> BN) moves into the gated layer too, its slot becoming ``Identity``; a
per-channel mask after BN commutes with it. Anything else is refused with the name of the
module.
"""

from __future__ import annotations

import copy

from torch import nn

from detector.gates import GatedConv


def _bn_partner(parent: nn.Module, conv_attr: str) -> str | None:
    """Attribute name of the BatchNorm2d that normalises ``parent.<conv_attr>``, if any."""
    if isinstance(parent, nn.Sequential):
        keys = list(parent._modules)
        i = keys.index(conv_attr)
        if i + 1 < len(keys) and isinstance(parent._modules[keys[i + 1]], nn.BatchNorm2d):
            return keys[i + 1]
        return None
    if conv_attr.startswith("conv"):
        bn_attr = "bn" + conv_attr[4:]
        if isinstance(getattr(parent, bn_attr, None), nn.BatchNorm2d):
            return bn_attr
    return None


def decouple(model: nn.Module, reduction: int = 4,
             normalize_gate_input: bool = False, initial_gate_logit: float = 1.0) -> nn.Module:
    """Return a gated copy of ``model`` (the argument is left untouched).

    ``reduction`` is the control modules' bottleneck factor; ``normalize_gate_input``
    standardises their pooled input and ``initial_gate_logit`` sets the gates' starting logit
    (see :class:`~detector.control.ControlModule`; 1.0 is the authors' initialisation).

    Raises ValueError naming the module if a conv has no BatchNorm2d partner, if the model has
    no conv beyond its stem, or if it is already decoupled.
    """
    if gated_layers(model):
        raise ValueError("model is already decoupled (it contains GatedConv layers)")
    model = copy.deepcopy(model)
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) < 2:
        raise ValueError("model has no conv layer to gate besides its stem")
    for name, conv in convs[1:]:  # the stem conv stays ungated
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        bn_attr = _bn_partner(parent, attr)
        if bn_attr is None:
            raise ValueError(
                f"unsupported layout: conv {name!r} ({type(parent).__name__}) is not followed by a "
                "BatchNorm2d; decouple supports conv-BN pairs in Sequential or convK/bnK blocks"
            )
        bn = getattr(parent, bn_attr)
        pool_attr = _pool_partner(parent, attr)
        pool = None if pool_attr is None else getattr(parent, pool_attr)
        gated = GatedConv(name, conv, bn, reduction, pool=pool,
                          normalize_gate_input=normalize_gate_input,
                          initial_gate_logit=initial_gate_logit)
        gated.bn_slot = bn_attr
        gated.pool_slot = pool_attr
        setattr(parent, attr, gated)
        setattr(parent, bn_attr, nn.Identity())
        if pool_attr is not None:
            setattr(parent, pool_attr, nn.Identity())
    return model


def _pool_partner(parent: nn.Module, conv_attr: str) -> str | None:
    """Attribute name of a pooling layer ``poolK`` run between ``convK`` and ``bnK``, if any."""
    if isinstance(parent, nn.Sequential) or not conv_attr.startswith("conv"):
        return None
    pool_attr = "pool" + conv_attr[4:]
    pool = getattr(parent, pool_attr, None)
    return pool_attr if isinstance(pool, nn.MaxPool2d | nn.AvgPool2d) else None


def strip_gates(model: nn.Module) -> nn.Module:
    """A plain copy of a decoupled model: gates removed, conv and BN back in their slots.

    Computes what the decoupled model computes with every gate forced open, at dense cost.
    """
    model = copy.deepcopy(model)
    for name, layer in gated_layers(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, layer.conv)
        setattr(parent, layer.bn_slot, layer.bn)
        if layer.pool_slot is not None:
            setattr(parent, layer.pool_slot, layer.pool)
    return model


def gated_layers(model: nn.Module) -> dict[str, GatedConv]:
    """The gated layers of a model, by their module name in the original network, in order."""
    return {m.name: m for m in model.modules() if isinstance(m, GatedConv)}
