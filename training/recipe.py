"""Optimisation recipes: how :func:`training.engine.fit` steps, schedules and augments.

Two recipes exist:

- :data:`ONE_CYCLE` (the project's default): SGD with Nesterov momentum 0.9 and a one-cycle
  learning rate (15 % warm-up), random crop (zero padding 4) + flip.
- :data:`AIRBENCH`: the recipe of Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU"
  (arXiv 2404.00498): Nesterov momentum 0.85, learning rate from 0.2x to 1x of its peak over the
  first 23 % of steps then linearly down to 0.07x, label smoothing 0.2, every image flipped on
  alternate epochs + random 2-pixel translation (reflect padding), and a "lookahead" EMA of the
  weights every 5 steps (decay 0.95^5 x (step / total)^3, the weights reset to the average).
  Its learning rate and weight decay "per 1024 examples" become PyTorch's SGD values through
  :func:`airbench_sgd`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from detector.airbench import AirbenchNet

BN_BIAS_LR_MULT = 64.0
"""airbench's BN biases learn this much faster than the weights (with 1/64 the weight decay)."""


@dataclass(frozen=True)
class Augmentation:
    """Random translation by up to ``translate`` pixels, horizontal flips and benign changes.

    padding: "constant" (zeros) or "reflect" for the pixels shifted in.
    flip: flip images horizontally (off for digits, whose mirror image is another symbol).
    alternate_flip: each image is flipped on every other epoch (which half starts flipped is
        random per image) instead of with probability 1/2 in every epoch.
    benign: share in [0, 1] of each batch replaced by one random benign change of itself
        (noise, JPEG, brightness, contrast, a shift or a rotation, at strengths around the
        evaluated ones: :func:`evaluation.shifts.random_benign_changes`), so that the
        classifier keeps working on the changes a deployment sees.
    """

    translate: int = 4
    padding: str = "constant"
    flip: bool = True
    alternate_flip: bool = False
    benign: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.benign <= 1.0:
            raise ValueError(f"benign share must be in [0, 1], got {self.benign}")

    @property
    def crops_or_flips(self) -> bool:
        """Whether the translation + flip step changes anything."""
        return self.translate > 0 or self.flip or self.alternate_flip


@dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule, loss smoothing, weight averaging and memory layout of a training run.

    momentum: SGD Nesterov momentum.
    schedule: "one_cycle" (PyTorch's OneCycleLR, ``warmup`` share rising) or "warmup_linear"
        (``start_lr`` x peak rising linearly to the peak over ``warmup`` of the steps, then
        linearly to ``final_lr`` x peak).
    label_smoothing: in [0, 1), applied by the commands' cross-entropy terms.
    lookahead_every: steps between lookahead EMA updates (0 = off); the update's decay grows
        as ``lookahead_decay`` x (step / total)^3.
    augmentation: what ``augment=True`` means for this recipe.
    channels_last: keep activations in NHWC (faster convs under bf16 on x86 CPUs).
    """

    momentum: float = 0.9
    schedule: str = "one_cycle"
    warmup: float = 0.15
    start_lr: float = 0.2
    final_lr: float = 0.07
    label_smoothing: float = 0.0
    lookahead_every: int = 0
    lookahead_decay: float = 0.95**5
    augmentation: Augmentation = Augmentation()
    channels_last: bool = False

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the peak learning rate at ``step`` of ``total`` ("warmup_linear")."""
        warm = max(int(total * self.warmup), 1)
        if step < warm:
            frac = step / warm
            return self.start_lr * (1 - frac) + frac
        frac = (step - warm) / max(total - warm, 1)
        return (1 - frac) + self.final_lr * frac


ONE_CYCLE = Recipe()
AIRBENCH = Recipe(momentum=0.85, schedule="warmup_linear", warmup=0.23, start_lr=0.2,
                  final_lr=0.07, label_smoothing=0.2, lookahead_every=5,
                  augmentation=Augmentation(translate=2, padding="reflect", alternate_flip=True),
                  channels_last=True)
RECIPES = {"one_cycle": ONE_CYCLE, "airbench": AIRBENCH}


def airbench_sgd(lr_per_1024: float, weight_decay_per_1024: float, momentum: float,
                 batch_size: int) -> tuple[float, float]:
    """PyTorch SGD ``(lr, weight_decay)`` for a batch-mean loss from airbench's rates.

    airbench sums the loss over the batch and divides its rates by 1024 (1 + 1/(1 - momentum)).
    For a mean over ``batch_size`` examples that is lr = lr_per_1024 B / (1024 (1 + 1/(1 - m))),
    and the weight decay that gives airbench's per-step decay lr x wd is
    weight_decay_per_1024 / lr_per_1024 (a group whose lr is k times larger takes wd / k).
    Example: 11.5, 0.0153, 0.85, 1024 -> (1.5, 0.00133).
    """
    lr = lr_per_1024 * batch_size / (1024 * (1 + 1 / (1 - momentum)))
    return lr, weight_decay_per_1024 / lr_per_1024


class Lookahead:
    """airbench's lookahead EMA over every float entry of a model's state (weights and BN
    statistics): ``ema <- ema + (1 - decay)(net - ema); net <- ema``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()
                    if v.is_floating_point()}

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """decay in [0, 1]: 0 keeps the current weights, 1 resets them to the average."""
        for k, v in self.model.state_dict().items():
            if k in self.ema:
                self.ema[k].lerp_(v, 1 - decay)
                v.copy_(self.ema[k])


def parameter_groups(model: nn.Module, weight_decay: float,
                     exclude: Collection[nn.Parameter] = ()) -> list[dict[str, Any]]:
    """SGD parameter groups of ``model`` without ``exclude`` (e.g. gates trained separately).

    airbench's BN biases learn at :data:`BN_BIAS_LR_MULT` times the rate with as much less weight
    decay (the per-step decay is unchanged); every other network has one group.
    """
    skip = {id(p) for p in exclude}
    params = [p for p in model.parameters() if id(p) not in skip]
    if not isinstance(model, AirbenchNet):
        return [{"params": params}]
    bn_bias = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    return [
        {"params": [p for p in params if id(p) not in bn_bias]},
        {"params": [p for p in params if id(p) in bn_bias],
         "lr_mult": BN_BIAS_LR_MULT, "weight_decay": weight_decay / BN_BIAS_LR_MULT},
    ]


def whiten_bias_schedule(model: nn.Module, epochs: int) -> Callable[[int], None] | None:
    """A ``before_epoch`` hook: airbench's whitening bias trains for the first ``epochs`` epochs,
    then freezes (None for other networks)."""
    if not isinstance(model, AirbenchNet):
        return None

    def before_epoch(epoch: int) -> None:
        model.whiten.bias.requires_grad_(epoch < epochs)
        if epoch >= epochs:
            model.whiten.bias.grad = None

    return before_epoch
