"""Fast adversarial training: one-step attacks on every training batch.

Two single-step methods, one extra forward and backward pass per batch instead of PGD's ten:

- ``fgsm-rs`` (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020): delta drawn
  uniformly from the L-inf ball of radius eps, one signed-gradient step of 1.25 eps on the
  cross-entropy, projected back into the ball and into [0, 1];
- ``n-fgsm`` (de Jorge et al., "Make some noise", NeurIPS 2022; the default): noise drawn
  uniformly from the ball of radius 2 eps, one step of eps, no projection (the perturbation may
  reach 3 eps), clipped to [0, 1] only.

Their known failure, *catastrophic overfitting* (robust accuracy against PGD falls to ~0 while
accuracy on the training attack rises), is watched by :func:`pgd_accuracy` on held-out images
after every epoch (the commands log and record it). On airbench (CIFAR-10, RESULTS 1.5)
FGSM-RS overfits catastrophically from the first epoch (PGD-10 accuracy 0.000 at 8/255 for four
epochs) and N-FGSM does not, hence the default.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detector import perturb
from training.data import ImageData, to_float

log = logging.getLogger(__name__)

#: method -> (noise radius, step, whether the result is projected into the eps-ball), in
#: units of eps.
METHODS = {"fgsm-rs": (1.0, 1.25, True), "n-fgsm": (2.0, 1.0, False)}


@dataclass(frozen=True)
class FastAdversarial:
    """A single-step attack of :data:`METHODS` at L-inf budget ``eps`` (pixel units, images in
    [0, 1])."""

    eps: float
    method: str = "n-fgsm"

    def __post_init__(self) -> None:
        if not 0.0 < self.eps <= 1.0:
            raise ValueError(f"adversarial eps must be in (0, 1], got {self.eps}")
        if self.method not in METHODS:
            raise ValueError(f"unknown adversarial method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial copies of x (B, C, H, W) in [0, 1] with labels y (B,), same shape and
        range (within eps of x for fgsm-rs, 3 eps for n-fgsm), detached. ``model`` is used in
        whatever mode it is in (training: batch-norm statistics see the attack's pass, as in
        Wong et al.'s code); its parameters' ``.grad`` are not touched. Random start from
        torch's global generator."""
        noise, step, project = METHODS[self.method]
        x = x.detach()
        delta = torch.empty_like(x).uniform_(-noise * self.eps, noise * self.eps)
        delta = ((x + delta).clamp(0.0, 1.0) - x).requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
        delta = delta.detach() + step * self.eps * grad.sign()
        if project:
            delta = delta.clamp(-self.eps, self.eps)
        return (x + delta).clamp(0.0, 1.0).detach()


@torch.no_grad()
def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                 steps: int = 10, batch_size: int = 256) -> float:
    """Accuracy in [0, 1] of ``model`` (set to eval) under PGD (``steps`` steps of eps / 4,
    random start; :func:`detector.perturb.pgd`) on x (N, C, H, W) float in [0, 1], y (N,): the
    catastrophic-overfitting check."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        adv = perturb.pgd(model, xb, yb, eps, steps=steps, alpha=eps / 4)
        correct += int((model(adv).argmax(1) == yb).sum())
    return correct / max(len(y), 1)


@dataclass(frozen=True)
class AdversarialTraining:
    """What ``--adversarial-eps`` adds to a training command: the batches' attack and the
    per-epoch PGD check on ``x_check`` (N, C, H, W) float in [0, 1], ``y_check`` (N,)."""

    attack: FastAdversarial
    x_check: torch.Tensor
    y_check: torch.Tensor

    @classmethod
    def from_args(cls, args: argparse.Namespace, data: ImageData) -> AdversarialTraining | None:
        """What the command's ``--adversarial-*`` options ask for (None without
        ``--adversarial-eps``): the check on the first ``--adversarial-check`` test images."""
        if args.adversarial_eps is None:
            return None
        n = args.adversarial_check
        return cls(FastAdversarial(args.adversarial_eps, args.adversarial_method),
                   to_float(data.x_test[:n]), data.y_test[:n])

    def inputs(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch x (B, C, H, W) in [0, 1] the step trains on: its FGSM-RS copies. ``net`` may
        be a DistributedDataParallel wrapper: the attack runs on the module inside it, so the
        attack's backward pass does not take part in gradient synchronisation."""
        return self.attack.perturb(getattr(net, "module", net), x, y)

    def monitor(self, model: nn.Module) -> Callable[[int], dict[str, float]]:
        """An ``after_epoch`` hook for :func:`training.engine.fit`: PGD-10 accuracy of ``model``
        on the check images, with a warning when it falls below half of its best so far
        (catastrophic overfitting)."""
        best = [0.0]

        def after_epoch(epoch: int) -> dict[str, float]:
            acc = pgd_accuracy(model, self.x_check, self.y_check, self.attack.eps)
            model.train()
            if acc < 0.5 * best[0]:
                log.warning("epoch %d: PGD accuracy %.3f fell below half of its best %.3f: "
                            "catastrophic overfitting (lower --adversarial-eps or the learning "
                            "rate)", epoch + 1, acc, best[0])
            best[0] = max(best[0], acc)
            log.info("epoch %d: PGD-10 accuracy at eps %.4g on %d test images: %.4f",
                     epoch + 1, self.attack.eps, len(self.y_check), acc)
            return {"pgd_accuracy": acc}

        return after_epoch
