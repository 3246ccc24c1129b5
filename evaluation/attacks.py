"""Adversarial attacks behind one thin function (:func:`craft`), named by :class:`AttackSpec`.

Inputs are images in [0, 1] (the models normalise internally); the model is put in eval mode.
Attack specs are strings ``name``, ``name:eps`` or either with ``@share``: eps absolute or a
fraction (``pgd:8/255``), an L-inf budget in (0, 1] or, for the L2 attacks, an L2 budget > 0;
``share`` in (0, 1] runs the attack on that share of the images it would otherwise run on
(``square:8/255@1/4``: slow attacks get fewer images, not dropped). The names, their families,
norms and parameters are :mod:`evaluation.catalogue`'s, among them:

- ``fgsm``: Goodfellow et al. 2015, one signed-gradient step of size eps;
- ``pgd``: Madry et al. 2018, 20 steps of eps/8 from a random start (these two are
  :mod:`detector.perturb`'s, which the server's perturb demo uses too; they match
  torchattacks' FGSM and PGD step for step);
- ``bim``: Kurakin et al. 2017, 20 steps of eps/10, no random start;
- ``cw``: Carlini & Wagner 2017, L2, c=1, kappa=0, 100 Adam steps (lr 0.01) — minimal
  perturbation, no eps;
- ``deepfool``: Moosavi-Dezfooli et al. 2016, L2, 50 steps, overshoot 0.02 — minimal
  perturbation, no eps;
- ``square``: Andriushchenko et al. 2020, black-box score-based, ``square_queries`` queries.

Adaptive attacks (:data:`ADAPTIVE`) attack the network *and* a fitted detector, so they need
the :class:`Defence` (the bundle, and for ``pgd-aware`` on a tree detector images of the
detector's fitting side):

- ``pgd-aware``: detector-aware PGD (:class:`evaluation.adaptive.pgd.DetectorAwarePGD`), BPDA
  through the gates plus the detector's own score where it is exact in torch
  (:class:`evaluation.adaptive.surrogate.ShippedScore`: logistic and MLP detectors), else a
  surrogate fitted on the defence's fitting images
  (:func:`evaluation.adaptive.surrogate.fit_attack_surrogate`, at most
  :data:`SURROGATE_IMAGES`), 20 steps of eps/8 per lambda of
  :data:`evaluation.adaptive.pgd.LAMBDAS`;
- ``square-aware``: detector-aware Square
  (:class:`evaluation.adaptive.square.DetectorAwareSquare`), ``square_queries`` queries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn
from tqdm import tqdm

from detector import perturb
from detector.bundle import Bundle
from evaluation.adaptive.pgd import LAMBDAS, DetectorAwarePGD, PGDConfig
from evaluation.adaptive.square import DetectorAwareSquare
from evaluation.adaptive.surrogate import ShippedScore, fit_attack_surrogate
from evaluation.catalogue import ADAPTIVE as ADAPTIVE_FAMILY
from evaluation.catalogue import CATALOGUE, Attack, AttackKind

#: Attacks on the network and a fitted detector: they need a :class:`Defence`.
ADAPTIVE = tuple(n for n, k in CATALOGUE.items() if k.family == ADAPTIVE_FAMILY)
#: Every attack name.
ATTACKS = tuple(CATALOGUE)
#: Fitting-side images whose attack iterates fit the surrogate of ``pgd-aware``.
SURROGATE_IMAGES = 64


@dataclass(frozen=True)
class AttackSpec:
    """An attack, its budget (L-inf, or L2 for the L2 attacks; None for minimal-perturbation
    attacks) and the share of the images it runs on (:meth:`images`)."""

    name: str
    eps: float | None = None
    eps_text: str = ""
    image_share: float = 1.0

    @property
    def kind(self) -> AttackKind:
        """The catalogue entry of the name (:data:`evaluation.catalogue.CATALOGUE`)."""
        return CATALOGUE[self.name]

    @property
    def family(self) -> str:
        """The attack family (one of :data:`evaluation.catalogue.FAMILIES`)."""
        return self.kind.family

    @property
    def adaptive(self) -> bool:
        """Whether the attack needs the fitted detector (:data:`ADAPTIVE`)."""
        return self.name in ADAPTIVE

    @property
    def label(self) -> str:
        """``"PGD eps=8/255"``, ``"CW"``: how reports and ``adversarial.npz`` name the attack
        (the image share is not part of it)."""
        return self.name.upper() if self.eps is None else f"{self.name.upper()} eps={self.eps_text}"

    @property
    def text(self) -> str:
        """The spec as :meth:`parse` reads it (``"square:8/255@1/4"``)."""
        text = self.name if self.eps is None else f"{self.name}:{self.eps_text}"
        if self.image_share < 1.0:
            text += f"@{Fraction(self.image_share).limit_denominator(1000)}"
        return text

    def images(self, n: int) -> int:
        """How many of ``n`` candidate images the attack runs on: the first
        ceil(share * n), at least one of a non-empty set."""
        return min(n, max(1, math.ceil(self.image_share * n))) if n else 0

    @classmethod
    def parse(cls, text: str) -> AttackSpec:
        """``"pgd:8/255"`` -> AttackSpec("pgd", 0.0314), ``"cw@1/4"`` -> AttackSpec("cw",
        image_share=0.25); ValueError naming a bad spec."""
        body, at, share_text = text.strip().lower().partition("@")
        name, _, eps_text = body.partition(":")
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {text!r}; choose from {', '.join(ATTACKS)}")
        share = _fraction(share_text, text, "image share") if at else 1.0
        if not 0.0 < share <= 1.0:
            raise ValueError(f"image share of {text!r} must be in (0, 1], got {share}")
        kind = CATALOGUE[name]
        if not kind.takes_eps:
            if eps_text:
                raise ValueError(f"attack {name!r} takes no eps, got {text!r}")
            return cls(name, image_share=share)
        if not eps_text:
            raise ValueError(f"attack {name!r} needs a strength, e.g. {name}:0.3 or {name}:8/255")
        eps = _fraction(eps_text, text, "strength")
        if kind.norm == "l2" and eps <= 0.0:
            raise ValueError(f"L2 strength of {text!r} must be > 0, got {eps}")
        if kind.norm == "linf" and not 0.0 < eps <= 1.0:
            raise ValueError(f"strength of {text!r} must be in (0, 1], got {eps}")
        return cls(name, eps, eps_text, share)


def _fraction(value: str, text: str, what: str) -> float:
    """``"8/255"`` or ``"0.25"`` as a float; ValueError naming ``what`` in spec ``text``."""
    try:
        return float(Fraction(value))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"bad {what} in attack {text!r}") from None


@dataclass(frozen=True)
class Defence:
    """What an adaptive attack must get past: the bundle (network, path profile, fitted
    detector and its threshold), and images x_fit (M, C, H, W) in [0, 1] with labels y_fit (M,)
    on which ``pgd-aware`` fits its stand-in of the detector: the detector's fitting side, never
    the attacked images (only ``pgd-aware`` needs them, and only for detectors without an exact
    torch export)."""

    bundle: Bundle
    x_fit: torch.Tensor | None = None
    y_fit: torch.Tensor | None = None


def make_attack(spec: AttackSpec, model: nn.Module, seed: int = 0,
                square_queries: int = 1000, defence: Defence | None = None) -> Attack:
    """``spec`` on ``model``: a function (images, labels) -> adversarial images.

    Adaptive attacks (``spec.adaptive``) attack ``defence.bundle`` (whose network is ``model``)
    and raise a ValueError without a defence; ``pgd-aware`` fits its surrogate here.
    """
    if spec.adaptive:
        return _adaptive_attack(spec, model, seed, square_queries, defence)
    build = spec.kind.build
    assert build is not None  # only adaptive attacks have none
    return build(model, spec.eps or 0.0, seed, square_queries)


def _adaptive_attack(spec: AttackSpec, model: nn.Module, seed: int, square_queries: int,
                     defence: Defence | None) -> Attack:
    if defence is None:
        raise ValueError(f"attack {spec.name!r} is adaptive: it attacks a fitted detector, so it "
                         "needs the defence (training.fit_detector crafts it after fitting)")
    if defence.bundle.model is not model:
        raise ValueError(f"attack {spec.name!r}: the model must be the defence's bundle model")
    eps = spec.eps or 0.0
    if spec.name == "square-aware":
        return DetectorAwareSquare(defence.bundle, eps=eps, n_queries=square_queries,
                                   seed=seed)
    config = PGDConfig(eps=eps, alpha=eps / perturb.PGD_STEP_DIV, steps=perturb.PGD_STEPS)
    shipped = ShippedScore.of(defence.bundle)
    if shipped is not None:
        return DetectorAwarePGD(defence.bundle, shipped, config, seed=seed)
    if defence.x_fit is None or defence.y_fit is None or len(defence.y_fit) == 0:
        raise ValueError(f"attack {spec.name!r} fits a surrogate of the detector: the defence "
                         "needs fitting-side images (x_fit, y_fit)")
    x_fit, y_fit = defence.x_fit[:SURROGATE_IMAGES], defence.y_fit[:SURROGATE_IMAGES]
    surrogate, _ = fit_attack_surrogate(defence.bundle, x_fit, y_fit, [config],
                                        LAMBDAS, seed=seed)
    return DetectorAwarePGD(defence.bundle, surrogate, config, seed=seed)


def craft(spec: AttackSpec, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
          batch_size: int = 256, seed: int = 0, square_queries: int = 1000,
          progress: bool = True, defence: Defence | None = None) -> torch.Tensor:
    """Adversarial versions of x: (N, C, H, W) in [0, 1] with labels y: (N,); same shape/range.

    ``defence``: the fitted pipeline that adaptive attacks (``spec.adaptive``) attack."""
    if spec.kind.colour_only and x.shape[1] != 3:
        raise ValueError(f"attack {spec.name!r} works on colour images only (3 channels), got "
                         f"{x.shape[1]}")
    model.eval()
    torch.manual_seed(seed)
    attack = make_attack(spec, model, seed, square_queries, defence)
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=f"craft {spec.label}", unit="batch",
                  disable=not progress, leave=False):
        out.append(attack(x[i:i + batch_size].contiguous(), y[i:i + batch_size]).detach())
    return torch.cat(out).clamp_(0.0, 1.0) if out else x.clone()
