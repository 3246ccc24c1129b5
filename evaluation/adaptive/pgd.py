"""Detector-aware PGD: a white-box attack on the network *and* the path detector.

BPDA (Athalye et al., ICML 2018) through the hard gates, on the objective
``relu(CW margin + kappa) + lambda * clamp(surrogate, -det_margin)`` (Carlini & Wagner 2017
margin): straight-through gradients through the gates
(:func:`detector.straight_through.straight_through_gates`), the shipped path statistics
(:class:`detector.features.PathProfile`, torch, straight-through bits) against the class the
input is pushed into (the best wrong class), and a differentiable version of the detector's
verdict: the shipped score itself where the detector has an exact torch export
(:class:`evaluation.adaptive.surrogate.ShippedScore`), else a fitted stand-in
(:class:`evaluation.adaptive.surrogate.Surrogate`; the forest is piecewise constant). L-inf,
budget eps, signed-gradient steps projected into the ball and into [0, 1].

Every lambda of the schedule is tried in order on the inputs not yet broken; every iterate is
judged by the real pipeline (:meth:`detector.bundle.Bundle.score_paths`, the shipped scoring)
and the first one that is misclassified and not flagged is kept. lambda 0 is PGD on the margin
alone with the real detector as a stopping oracle (what selection alone buys).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torchattacks.attack import Attack

from detector.bundle import Bundle
from detector.straight_through import straight_through_gates
from evaluation.adaptive.judge import evades, quantize_towards
from evaluation.adaptive.objectives import class_margin

#: A differentiable detector stand-in: (B, F) path features -> (B,) score, > 0 meaning
#: "flagged" (:class:`evaluation.adaptive.surrogate.Surrogate` or
#: :class:`~evaluation.adaptive.surrogate.ShippedScore`).
DetectorStandIn = Callable[[torch.Tensor], torch.Tensor]

#: Weights of the detector term tried in order (the benchmark's default schedule).
LAMBDAS = (0.0, 0.3, 1.0, 3.0)


@dataclass(frozen=True)
class PGDConfig:
    """One PGD run: L-inf budget ``eps`` and step ``alpha`` (pixel units, images in [0, 1]),
    ``steps`` sign-gradient steps, CW margin target ``kappa`` (logits), surrogate floor
    ``det_margin`` (the detector term stops pushing below ``-det_margin``), straight-through
    kind ``ste``, whether to start from a uniformly random point of the ball, and whether to
    keep every iterate on the 1/255 grid (:func:`~evaluation.adaptive.judge.quantize_towards`;
    what a PNG can carry)."""

    eps: float
    alpha: float
    steps: int
    kappa: float = 3.0
    det_margin: float = 3.0
    ste: str = "semhash"
    random_start: bool = False
    grid: bool = False

    def __post_init__(self) -> None:
        # On the grid every iterate's perturbation is rounded towards zero: a step below one
        # grid unit is undone at once and the attack never leaves its start.
        if self.grid and self.alpha * 255.0 < 1.0 - 1e-6:
            raise ValueError(f"a PGD step on the 1/255 grid must be at least 1/255, got "
                             f"{self.alpha * 255:.3g}/255 (eps {self.eps * 255:.3g}/255 over "
                             f"{self.steps} steps): take a larger step or fewer steps")


@dataclass
class Iterates:
    """Every iterate a run visited, as fitting points for a surrogate: features (N, F) against
    the real predicted class, the real detector's flags (N,) and which points are unmodified
    clean images (N,), one tensor of each per step."""

    features: list[torch.Tensor] = field(default_factory=list)
    flagged: list[torch.Tensor] = field(default_factory=list)
    clean: list[torch.Tensor] = field(default_factory=list)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.features), torch.cat(self.flagged), torch.cat(self.clean)


def attack_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Untargeted CW margin loss. logits (B, K), y (B,) true classes ->
    (B,) ``relu(logit_y - max_{j != y} logit_j + kappa)`` and (B,) the best wrong class."""
    margin, cls = class_margin(logits, y)
    return torch.relu(margin + kappa), cls


def pgd_run(bundle: Bundle, surrogate: DetectorStandIn | None,
            x0: torch.Tensor, y: torch.Tensor, lam: float, cfg: PGDConfig, *,
            stop_on_success: bool, collect: Iterates | None = None, seed: int = 0
            ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """One detector-aware PGD run with one lambda on x0 (B, C, H, W) in [0, 1], labels y (B,).

    Every iterate (the start included) is judged by the real pipeline. Returns the first
    iterate that is misclassified and not flagged (else the last iterate) (B, C, H, W), success
    (B,) bool and the step of success (B,) (-1 if none). With ``stop_on_success`` broken inputs
    leave the run; ``collect`` receives every iterate's real features and flags. The detector
    term is left out while ``lam`` is 0 or there is no ``surrogate``; ``seed`` seeds the random
    start.
    """
    n = len(y)
    out = x0.clone()
    success = np.zeros(n, dtype=bool)
    step = np.full(n, -1)
    idx = np.arange(n)
    xa = x0.clone()
    if cfg.random_start:
        g = torch.Generator().manual_seed(seed)
        noise = (torch.rand(x0.shape, generator=g) * 2 - 1) * cfg.eps
        xa = (x0 + noise).clamp(0.0, 1.0)
        if cfg.grid:
            xa = quantize_towards(x0, xa)
    for t in range(cfg.steps + 1):
        xa = xa.detach().requires_grad_(True)
        with straight_through_gates(cfg.ste):
            paths = bundle.record(xa, ste=cfg.ste)
        scored = bundle.score_paths(paths)  # the real verdict
        ok = evades(scored.predictions.numpy(), scored.flagged.numpy(), y[idx].numpy())
        if collect is not None:
            collect.features.append(scored.features.detach())
            collect.flagged.append(scored.flagged)
            collect.clean.append(torch.full((len(idx),), t == 0 and not cfg.random_start))
        new = ok & ~success[idx]
        out[idx[new]] = xa.detach()[torch.from_numpy(new)]
        success[idx[new]] = True
        step[idx[new]] = t
        keep = ~ok if stop_on_success else np.ones(len(idx), dtype=bool)
        if t == cfg.steps or not keep.any():
            break
        cls_loss, wrong = attack_loss(paths.logits, y[idx], cfg.kappa)
        loss = cls_loss
        if lam > 0 and surrogate is not None:
            stats = bundle.profile.layer_stats(paths, wrong.detach())
            score = surrogate(bundle.profile.transform(paths, stats))
            loss = loss + lam * score.clamp_min(-cfg.det_margin)
        keep_t = torch.from_numpy(keep)
        (grad,) = torch.autograd.grad(loss[keep_t].sum(), xa)
        idx = idx[keep]
        x0k = x0[torch.from_numpy(idx)]
        xa = xa.detach()[keep_t] - cfg.alpha * grad[keep_t].sign()
        xa = torch.min(torch.max(xa, x0k - cfg.eps), x0k + cfg.eps).clamp(0.0, 1.0)
        if cfg.grid:
            xa = quantize_towards(x0k, xa)
    rest = ~success[idx]
    out[idx[rest]] = xa.detach()[torch.from_numpy(rest)]
    return out, success, step


@dataclass
class AdaptiveResult:
    """x_adv (N, C, H, W): per input the first successful iterate, else the last iterate of the
    last lambda tried; success (N,) bool as judged in the loop; lam_index (N,) index of the
    lambda that succeeded (-1: none); step (N,) its step."""

    x_adv: torch.Tensor
    success: np.ndarray
    lam_index: np.ndarray
    step: np.ndarray


class DetectorAwarePGD(Attack):
    r"""Detector-aware PGD (see the module doc) on a bundle: L-inf, white-box.

    Arguments:
        bundle: the attacked pipeline (network, path profile, fitted detector, threshold).
        surrogate: differentiable stand-in of the detector's verdict; needed when a lambda is
            positive (:func:`evaluation.adaptive.surrogate.fit_attack_surrogate` fits one).
        config: budget, step, steps and the other settings of each run.
        lambdas: weights of the detector term, tried in order on the inputs not yet broken
            (default :data:`LAMBDAS`).
        batch_size: images per run.
        restarts: runs per lambda on the inputs not yet broken: the first starts where the
            config says (the image, or a random point with ``random_start``), every further one
            from a uniformly random point of the ball.
        seed: the random start of lambda ``i``, restart ``r`` is seeded by
            ``seed + i * restarts + r``.

    Shape: images (N, C, H, W) in [0, 1], labels (N,) true classes; output (N, C, H, W) in
    [0, 1]. :meth:`run` returns the per-input verdicts of the loop as well.
    """

    def __init__(self, bundle: Bundle, surrogate: DetectorStandIn | None, config: PGDConfig,
                 *, lambdas: Sequence[float] = LAMBDAS, batch_size: int = 300,
                 restarts: int = 1, seed: int = 0) -> None:
        super().__init__("DetectorAwarePGD", bundle.model)
        if not lambdas or any(lam < 0 for lam in lambdas):
            raise ValueError(f"lambdas must be a non-empty list of values >= 0, got {lambdas}")
        if surrogate is None and any(lam > 0 for lam in lambdas):
            raise ValueError(f"positive lambdas {list(lambdas)} need a surrogate of the detector")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {restarts}")
        self.bundle = bundle
        self.surrogate = surrogate
        self.config = config
        self.lambdas = tuple(lambdas)
        self.batch_size = batch_size
        self.restarts = restarts
        self.seed = seed

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adversarial images (N, C, H, W) in [0, 1]."""
        return self.run(images, labels).x_adv

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> AdaptiveResult:
        """Each lambda in turn, each with its restarts, on the inputs no earlier run broke.
        Uses the model as it is
        (a loaded bundle's is in eval mode; calling the attack switches modes as every
        torchattacks attack does)."""
        x = images.clone().detach().to(self.device)
        y = labels.clone().detach().to(self.device)
        n = len(y)
        res = AdaptiveResult(x.clone(), np.zeros(n, dtype=bool), np.full(n, -1),
                             np.full(n, -1))
        for li, lam in enumerate(self.lambdas):
            for r in range(self.restarts):
                cfg = self.config if r == 0 else replace(self.config, random_start=True)
                todo = np.flatnonzero(~res.success)
                for start in range(0, len(todo), self.batch_size):
                    b = todo[start:start + self.batch_size]
                    bt = torch.from_numpy(b)
                    xb, ok, step = pgd_run(self.bundle, self.surrogate, x[bt], y[bt], lam, cfg,
                                           stop_on_success=True,
                                           seed=self.seed + li * self.restarts + r)
                    res.x_adv[bt] = xb
                    res.success[b[ok]] = True
                    res.lam_index[b[ok]] = li
                    res.step[b[ok]] = step[ok]
        return res
