"""Fast adversarial training: one-step attacks on every training batch.

Two single-step methods, one extra forward and backward pass per batch instead of PGD's ten:

- ``fgsm-rs`` (Wong, Rice & Kolter, "Fast is better than free", ICLR 2020): delta drawn
  uniformly from the L-inf ball of radius eps, one signed-gradient step of 1.25 eps on the
  cross-entropy, projected back into the ball and into [0, 1];
- ``n-fgsm`` (de Jorge et al., "Make some noise", NeurIPS 2022; the default): noise drawn
  uniformly from the ball of radius 2 eps, one step of eps, no projection (the perturbation may
  reach 3 eps), clipped to [0, 1] only.

Their known failure, *catastrophic overfitting* (robust accuracy against PGD falls to ~0 while
accuracy on the training attack rises), is watched by :func:`clean_and_pgd_accuracy` on
held-out images after every epoch (the commands log and record it). On airbench (CIFAR-10,
RESULTS 1.5) with its usual whitening stem FGSM-RS overfits catastrophically from the first
epoch (PGD-10 accuracy 0.000 at 8/255) and N-FGSM only a few epochs later: the stem scales the
rarest 2x2 patch directions ~130x the commonest, which hands a single-step attack a few cheap,
huge features.
With the stem regularised (``training.train --whiten-eps 0.1``: ~10x) FGSM-RS trains for 12
epochs without collapse (the committed robust base). N-FGSM stays the default: it is the safer
choice on a network nobody has checked.
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

#: Test images whose PGD-10 accuracy the commands report after adversarial training.
TEST_IMAGES = 1000

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
def clean_and_pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                           steps: int = 10, batch_size: int = 256) -> tuple[float, float]:
    """(clean, PGD) accuracy in [0, 1] of ``model`` (set to eval) on x (N, C, H, W) float in
    [0, 1], y (N,), on any device (each batch moves to the model's); PGD: ``steps`` steps of
    eps / 4 from a random start (:func:`detector.perturb.pgd`): the catastrophic-overfitting
    check."""
    model.eval()
    device = next(model.parameters()).device
    clean = robust = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        clean += int((model(xb).argmax(1) == yb).sum())
        adv = perturb.pgd(model, xb, yb, eps, steps=steps, alpha=eps / 4)
        robust += int((model(adv).argmax(1) == yb).sum())
    n = max(len(y), 1)
    return clean / n, robust / n


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                 steps: int = 10, batch_size: int = 256) -> float:
    """The PGD half of :func:`clean_and_pgd_accuracy`."""
    return clean_and_pgd_accuracy(model, x, y, eps, steps=steps, batch_size=batch_size)[1]


@dataclass
class AdversarialTraining:
    """What ``--adversarial-eps`` adds to a training command: the batches' attack, and the
    per-epoch check on ``x_check`` (N, C, H, W) float in [0, 1], ``y_check`` (N,): the
    training images at ``check_ids`` (N,), held out of training, on which the best epoch is
    chosen (Wong et al.'s early stopping: after catastrophic overfitting the last epoch is not
    the most robust one).

    The best epoch is the one with the highest clean + PGD-10 accuracy on the check images:
    catastrophic overfitting loses far more robust accuracy than it gains clean accuracy, so
    the sum still rejects a collapsed epoch, while among healthy epochs it does not trade
    several points of clean accuracy for a PGD difference within the check's noise (500
    images: +-2 points)."""

    attack: FastAdversarial
    x_check: torch.Tensor
    y_check: torch.Tensor
    check_ids: torch.Tensor
    best_clean: float = -1.0
    best_pgd: float = -1.0
    best_epoch: int = -1
    best_state: dict[str, torch.Tensor] | None = None

    def check(self, model: nn.Module) -> tuple[float, float]:
        """(clean, PGD-10) accuracy in [0, 1] of ``model`` (left in eval mode) on the check
        images."""
        return clean_and_pgd_accuracy(model, self.x_check, self.y_check, self.attack.eps)

    @classmethod
    def from_args(cls, args: argparse.Namespace, data: ImageData) -> AdversarialTraining | None:
        """What the command's ``--adversarial-*`` options ask for (None without
        ``--adversarial-eps``): the check on ``--adversarial-check`` training images drawn
        with a fixed seed (the same ones in ``train`` and ``decouple``, whatever ``--seed``;
        drawn at random because a split may be sorted by class, as ImageFolder's is), which
        :meth:`training_images` then leaves out."""
        if args.adversarial_eps is None:
            return None
        n = args.adversarial_check
        if n >= len(data.y_train):
            raise ValueError(f"--adversarial-check {n} leaves no training images "
                             f"({len(data.y_train)} in {data.name!r})")
        ids = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:n]
        return cls(FastAdversarial(args.adversarial_eps, args.adversarial_method),
                   to_float(data.x_train[ids]), data.y_train[ids], ids)

    def training_images(self, x: torch.Tensor, y: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training images x (N, C, H, W) uint8, y (N,) without the held-out check ones,
        in their order."""
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[self.check_ids] = False
        return x[keep], y[keep]

    def inputs(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch x (B, C, H, W) in [0, 1] the step trains on: its single-step adversarial
        copies (``self.attack.method``). ``net`` may be a DistributedDataParallel wrapper: the
        attack runs on the module inside it, so the attack's backward pass does not take part
        in gradient synchronisation."""
        return self.attack.perturb(getattr(net, "module", net), x, y)

    def monitor(self, model: nn.Module) -> Callable[[int], dict[str, float]]:
        """An ``after_epoch`` hook for :func:`training.engine.fit`: clean and PGD-10 accuracy of
        ``model`` on the check images; keeps a copy of the weights of the best epoch so far (see
        the class), and warns when the PGD accuracy falls below half of the best epoch's
        (catastrophic overfitting)."""

        def after_epoch(epoch: int) -> dict[str, float]:
            clean, acc = self.check(model)
            model.train()
            if acc < 0.5 * self.best_pgd:
                log.warning("epoch %d: PGD accuracy %.3f fell below half of the best epoch's "
                            "%.3f: catastrophic overfitting (lower --adversarial-eps or the "
                            "learning rate)", epoch + 1, acc, self.best_pgd)
            if clean + acc > self.best_clean + self.best_pgd:
                self.best_clean, self.best_pgd, self.best_epoch = clean, acc, epoch
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            log.info("epoch %d: on %d held-out training images, clean accuracy %.4f, PGD-10 "
                     "accuracy at eps %.4g %.4f", epoch + 1, len(self.y_check), clean,
                     self.attack.eps, acc)
            return {"check_accuracy": clean, "pgd_accuracy": acc}

        return after_epoch

    def test_accuracy(self, model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor,
                      n: int = TEST_IMAGES) -> float:
        """PGD-10 accuracy at the training eps on the first ``n`` uint8 test images x_test
        (N, C, H, W), y_test (N,): the robust accuracy ``metrics.json`` reports."""
        return pgd_accuracy(model, to_float(x_test[:n]), y_test[:n], self.attack.eps)

    def keep_best(self, model: nn.Module) -> dict[str, float | int]:
        """Load the best epoch's weights into ``model`` if the final ones (after the last
        epoch's weight averaging) score lower on the check images (clean + PGD-10 accuracy);
        returns what was measured and chosen (``clean_check_accuracy``,
        ``pgd_check_accuracy``, ``best_epoch`` counted from 1, 0 for the final weights)."""
        clean, acc = self.check(model)
        if self.best_state is None or clean + acc >= self.best_clean + self.best_pgd:
            return {"clean_check_accuracy": clean, "pgd_check_accuracy": acc, "best_epoch": 0}
        model.load_state_dict(self.best_state)
        log.info("keeping epoch %d's weights: clean %.4f + PGD %.4f on the check images, the "
                 "final ones %.4f + %.4f", self.best_epoch + 1, self.best_clean, self.best_pgd,
                 clean, acc)
        return {"clean_check_accuracy": self.best_clean, "pgd_check_accuracy": self.best_pgd,
                "best_epoch": self.best_epoch + 1}
