"""Gradient attacks in plain torch: FGSM and PGD (L-inf), the two the server can demonstrate.

They live here, not in ``training``, so that the service can craft a perturbed copy of an image
(its optional "perturb it" demo, :mod:`service.perturb`) without the ``train`` extra: the same
functions make the FGSM and PGD examples of ``evaluation.attacks``. Both follow torchattacks
3.5.1 step for step (the same operations in the same order, the same use of torch's global
random generator for PGD's start), so the committed results, crafted with torchattacks, are
reproduced exactly; ``tests/evaluation/test_attacks.py`` checks that.

Inputs are images in [0, 1] (models normalise internally); the model is used as it is (call
``.eval()`` first: gates and batch norm behave differently in training), and only the input
gets a gradient: parameters' ``.grad`` are left untouched, so a model that serves requests in
other threads can be attacked at the same time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Attacks implemented here; PGD takes :data:`PGD_STEPS` steps of eps / :data:`PGD_STEP_DIV`.
GRADIENT_ATTACKS = ("fgsm", "pgd")
PGD_STEPS = 20
PGD_STEP_DIV = 8


def _input_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d cross-entropy(model(x), y) / dx for the mean loss over the batch."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x, retain_graph=False, create_graph=False)
    return grad


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Goodfellow et al. 2015: one step of ``eps`` along the sign of the loss gradient.

    x: (N, C, H, W) in [0, 1], y: (N,) labels to move away from -> (N, C, H, W) in [0, 1].
    """
    x = x.clone().detach()
    return torch.clamp(x + eps * _input_gradient(model, x, y).sign(), 0, 1).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
        steps: int = PGD_STEPS, alpha: float | None = None,
        random_start: bool = True) -> torch.Tensor:
    """Madry et al. 2018: ``steps`` signed-gradient steps of ``alpha`` (default eps / 8), each
    projected back into the L-inf ball of ``eps`` around x and into [0, 1]; the start is a
    uniform random point of the ball (torch's global generator: seed it for repeatable runs).
    """
    alpha = eps / PGD_STEP_DIV if alpha is None else alpha
    x = x.clone().detach()
    adv = x.clone().detach()
    if random_start:
        adv = torch.clamp(adv + torch.empty_like(adv).uniform_(-eps, eps), 0, 1).detach()
    for _ in range(steps):
        adv = adv.detach() + alpha * _input_gradient(model, adv, y).sign()
        delta = torch.clamp(adv - x, min=-eps, max=eps)
        adv = torch.clamp(x + delta, 0, 1).detach()
    return adv


def perturb(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
            eps: float) -> torch.Tensor:
    """The attack ``name`` (one of :data:`GRADIENT_ATTACKS`) with its default parameters."""
    if name == "fgsm":
        return fgsm(model, x, y, eps)
    if name == "pgd":
        return pgd(model, x, y, eps)
    raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(GRADIENT_ATTACKS)}")
