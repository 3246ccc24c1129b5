"""The attacks by name: the family each belongs to, its norm, whether it takes a budget, its
rough cost, and how it is built (torchattacks 3.5.1, or :mod:`detector.perturb` for FGSM and
PGD).

Threat model: evasion of an image classifier on images in [0, 1] within an L-inf or L2 budget
(or a minimal-perturbation attack). Every torchattacks attack that fits it is here, grouped by
family (:data:`FAMILIES`); budgets are L-inf unless the norm says L2. Iterative attacks take
20 steps of eps/8 (PGD-like: PGD, TPGD, Jitter, PGD-L2, targeted PGD), 20 steps of eps/10
(BIM), 20 adaptive steps (APGD variants), or 10 steps of eps/10 (the momentum family, as in
their papers). Left out, and why:

- VANILA (returns the input), GN (Gaussian noise: a benign change, :mod:`evaluation.shifts`);
- EOTPGD and UPGD (PGD on a deterministic model, at more cost), PGDRS / PGDRSL2 (attack a
  randomised-smoothing classifier), PIFGSMPP (PI-FGSM++ needs an ensemble of models), LGV
  (trains surrogate models on the training set: a transfer attack);
- AutoAttack and MultiAttack (ensembles of attacks listed here: APGD-CE, APGD-T, FAB,
  Square);
- L0 / L1 attacks (JSMA, OnePixel, Pixle, SparseFool, EADL1, EADEN): another threat model.

Adaptive attacks (family "adaptive") attack the network *and* the fitted detector; they are
built by :mod:`evaluation.attacks` from a defence, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torchattacks
from torch import nn

from detector import perturb

Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: (model, eps, seed, square_queries) -> attack; eps is 0.0 for attacks without a budget.
Builder = Callable[[nn.Module, float, int, int], Attack]

SINGLE_STEP = "single-step"
ITERATIVE_CE = "iterative L-inf, cross-entropy"
ITERATIVE_OTHER_LOSS = "iterative L-inf, other loss"
MOMENTUM = "momentum / transfer"
ITERATIVE_L2 = "iterative L2"
MINIMAL = "minimal perturbation"
BLACK_BOX = "black-box score-based"
TARGETED = "targeted"
ADAPTIVE = "adaptive"
#: Every family, in report order.
FAMILIES = (SINGLE_STEP, ITERATIVE_CE, ITERATIVE_OTHER_LOSS, MOMENTUM, ITERATIVE_L2, MINIMAL,
            BLACK_BOX, TARGETED, ADAPTIVE)

STEPS = 20
MOMENTUM_STEPS = 10
#: SPSA's iterations and perturbation samples per iteration (2 forward passes each).
SPSA_ITERATIONS, SPSA_SAMPLES = 10, 64


@dataclass(frozen=True)
class AttackKind:
    """What an attack name stands for.

    family: one of :data:`FAMILIES`; norm: "linf" or "l2" (of the budget, or of the
    perturbation a minimal attack minimises); takes_eps: whether it needs a budget; cost:
    gradient evaluations per image (a forward pass ~ 1/3), to share work across processes
    (Square's is per query, see :func:`training.distributed_crafting.job_cost`); colour_only:
    torchattacks builds its smoothing kernel for 3 channels; build: None for adaptive attacks.
    """

    family: str
    norm: str
    takes_eps: bool
    cost: float
    build: Builder | None
    colour_only: bool = False


def _targeted(attack: torchattacks.Attack) -> torchattacks.Attack:
    """``attack`` aiming at a random wrong class per image (torch's global generator)."""
    attack.set_mode_targeted_random(quiet=True)
    return attack


def _apgdt(model: nn.Module, eps: float, seed: int) -> Attack:
    """Targeted APGD (DLR loss) over every wrong class in turn; torchattacks needs the number
    of classes, read off the model's output on the first image."""
    def attack(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            n_classes = model(x[:1]).shape[1]
        return torchattacks.APGDT(model, eps=eps, steps=STEPS, n_classes=n_classes,
                                  seed=seed)(x, y)
    return attack


CATALOGUE: dict[str, AttackKind] = {
    # single step
    "fgsm": AttackKind(SINGLE_STEP, "linf", True, 1.0,
                       lambda m, e, s, q: partial(perturb.perturb, "fgsm", m, eps=e)),
    "rfgsm": AttackKind(SINGLE_STEP, "linf", True, 1.0,  # Tramer et al. 2018: R+FGSM
                        lambda m, e, s, q: torchattacks.RFGSM(m, eps=e, alpha=e / 2, steps=1)),
    "ffgsm": AttackKind(SINGLE_STEP, "linf", True, 1.0,  # Wong et al. 2020: random start
                        lambda m, e, s, q: torchattacks.FFGSM(m, eps=e, alpha=1.25 * e)),
    # iterative, cross-entropy
    "pgd": AttackKind(ITERATIVE_CE, "linf", True, STEPS,
                      lambda m, e, s, q: partial(perturb.perturb, "pgd", m, eps=e)),
    "bim": AttackKind(ITERATIVE_CE, "linf", True, STEPS,
                      lambda m, e, s, q: torchattacks.BIM(m, eps=e, alpha=e / 10, steps=STEPS)),
    "apgd": AttackKind(ITERATIVE_CE, "linf", True, STEPS,  # Croce & Hein 2020
                       lambda m, e, s, q: torchattacks.APGD(m, eps=e, steps=STEPS, seed=s)),
    # iterative, another loss
    "apgd-dlr": AttackKind(ITERATIVE_OTHER_LOSS, "linf", True, STEPS,  # difference of logits
                           lambda m, e, s, q: torchattacks.APGD(m, eps=e, steps=STEPS, seed=s,
                                                                loss="dlr")),
    "tpgd": AttackKind(ITERATIVE_OTHER_LOSS, "linf", True, STEPS,  # TRADES' KL loss
                       lambda m, e, s, q: torchattacks.TPGD(m, eps=e, alpha=e / 8,
                                                            steps=STEPS)),
    "jitter": AttackKind(ITERATIVE_OTHER_LOSS, "linf", True, STEPS,  # Schwinn et al. 2021
                         lambda m, e, s, q: torchattacks.Jitter(m, eps=e, alpha=e / 8,
                                                                steps=STEPS)),
    # momentum and the transfer-oriented variants
    "mifgsm": AttackKind(MOMENTUM, "linf", True, MOMENTUM_STEPS,  # Dong et al. 2018
                         lambda m, e, s, q: torchattacks.MIFGSM(m, eps=e, alpha=e / 10,
                                                                steps=MOMENTUM_STEPS)),
    "nifgsm": AttackKind(MOMENTUM, "linf", True, MOMENTUM_STEPS,  # Nesterov, Lin et al. 2020
                         lambda m, e, s, q: torchattacks.NIFGSM(m, eps=e, alpha=e / 10,
                                                                steps=MOMENTUM_STEPS)),
    "difgsm": AttackKind(MOMENTUM, "linf", True, MOMENTUM_STEPS,  # input diversity, Xie 2019
                         lambda m, e, s, q: torchattacks.DIFGSM(m, eps=e, alpha=e / 10,
                                                                steps=MOMENTUM_STEPS,
                                                                decay=1.0)),
    "vmifgsm": AttackKind(MOMENTUM, "linf", True, 6 * MOMENTUM_STEPS,  # variance tuning
                          lambda m, e, s, q: torchattacks.VMIFGSM(m, eps=e, alpha=e / 10,
                                                                  steps=MOMENTUM_STEPS)),
    "vnifgsm": AttackKind(MOMENTUM, "linf", True, 6 * MOMENTUM_STEPS,
                          lambda m, e, s, q: torchattacks.VNIFGSM(m, eps=e, alpha=e / 10,
                                                                  steps=MOMENTUM_STEPS)),
    "sinifgsm": AttackKind(MOMENTUM, "linf", True, 5 * MOMENTUM_STEPS,  # scale invariance
                           lambda m, e, s, q: torchattacks.SINIFGSM(m, eps=e, alpha=e / 10,
                                                                    steps=MOMENTUM_STEPS)),
    "tifgsm": AttackKind(MOMENTUM, "linf", True, MOMENTUM_STEPS,  # translation invariance
                         lambda m, e, s, q: torchattacks.TIFGSM(m, eps=e, alpha=e / 10,
                                                                steps=MOMENTUM_STEPS,
                                                                decay=1.0),
                         colour_only=True),
    "pifgsm": AttackKind(MOMENTUM, "linf", True, MOMENTUM_STEPS,  # patch-wise, Gao et al. 2020
                         lambda m, e, s, q: torchattacks.PIFGSM(m, max_epsilon=e,
                                                                num_iter_set=MOMENTUM_STEPS),
                         colour_only=True),
    # L2
    "pgdl2": AttackKind(ITERATIVE_L2, "l2", True, STEPS,
                        lambda m, e, s, q: torchattacks.PGDL2(m, eps=e, alpha=e / 8,
                                                              steps=STEPS)),
    "apgd-l2": AttackKind(ITERATIVE_L2, "l2", True, STEPS,
                          lambda m, e, s, q: torchattacks.APGD(m, norm="L2", eps=e,
                                                               steps=STEPS, seed=s)),
    # minimal perturbation (no budget)
    "cw": AttackKind(MINIMAL, "l2", False, 100.0,  # Carlini & Wagner 2017
                     lambda m, e, s, q: torchattacks.CW(m, c=1.0, kappa=0.0, steps=100,
                                                        lr=0.01)),
    "deepfool": AttackKind(MINIMAL, "l2", False, 50.0,  # ~5 steps x 10 class gradients
                           lambda m, e, s, q: torchattacks.DeepFool(m, steps=50,
                                                                    overshoot=0.02)),
    "fab": AttackKind(MINIMAL, "linf", False, 100.0,  # Croce & Hein 2020, L-inf, unbounded
                      lambda m, e, s, q: torchattacks.FAB(m, norm="Linf", eps=1.0, steps=10,
                                                         seed=s)),
    # black box, scores only
    "square": AttackKind(BLACK_BOX, "linf", True, 0.0,  # Andriushchenko et al. 2020
                         lambda m, e, s, q: torchattacks.Square(m, norm="Linf", eps=e,
                                                                n_queries=q, seed=s,
                                                                verbose=False)),
    "spsa": AttackKind(BLACK_BOX, "linf", True, SPSA_ITERATIONS * SPSA_SAMPLES * 2 / 3,
                       lambda m, e, s, q: torchattacks.SPSA(m, eps=e, lr=e / 2,
                                                           nb_iter=SPSA_ITERATIONS,
                                                           nb_sample=SPSA_SAMPLES)),
    # targeted: a random wrong class (success is still counted as any misclassification)
    "pgd-targeted": AttackKind(TARGETED, "linf", True, STEPS,
                               lambda m, e, s, q: _targeted(torchattacks.PGD(
                                   m, eps=e, alpha=e / 8, steps=STEPS, random_start=True))),
    "apgdt": AttackKind(TARGETED, "linf", True, 3 * STEPS,  # up to every wrong class
                        lambda m, e, s, q: _apgdt(m, e, s)),
    # adaptive: built from a defence by evaluation.attacks
    "pgd-aware": AttackKind(ADAPTIVE, "linf", True, 3 * STEPS, None),
    "square-aware": AttackKind(ADAPTIVE, "linf", True, 0.0, None),
}


def family_of_label(label: str) -> str:
    """The family of an attack label (``"PGD eps=8/255"`` -> the family of ``pgd``); a name not
    in :data:`CATALOGUE` (from an older archive) is its own family."""
    name = label.partition(" eps=")[0].strip().lower()
    kind = CATALOGUE.get(name)
    return kind.family if kind is not None else name
