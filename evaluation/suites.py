"""Named evaluation suites: the attacks ``training.fit_detector --eval-suite NAME`` evaluates
on, for grey (MNIST, digits) or colour (CIFAR-10) images, as attack spec strings
(:class:`evaluation.attacks.AttackSpec`).

- ``default``: the fast list (FGSM, PGD at the main strength and two unseen ones, BIM, CW,
  DeepFool, Square);
- ``full``: every attack of :mod:`evaluation.catalogue` that fits the image type (not the
  adaptive ones), grouped by family. One attack per family (the first listed) runs at every
  L-inf strength, 1, 2, 4, 8, 16 /255 for colour and 0.02, 0.05, 0.1, 0.2, 0.3 for grey (the
  L2 one at 0.25, 0.5, 1 for colour and 0.5, 1, 2 for grey); the other members at a small
  and the main strength (colour 2/255 and 8/255, grey 0.1 and 0.3) or, the costly ones, at
  the main strength only. Slow attacks run on a share of the evaluation images
  (:data:`SLOW_SHARE`) rather than being dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

from evaluation.catalogue import CATALOGUE

GREY_DEFAULT = ("fgsm:0.3", "pgd:0.3", "pgd:0.05", "pgd:0.15", "pgd:0.25", "bim:0.3", "cw",
                "deepfool", "square:0.3")
COLOUR_DEFAULT = ("fgsm:8/255", "pgd:8/255", "pgd:1/255", "pgd:12/255", "bim:8/255", "cw",
                  "deepfool", "square:8/255")
#: Image share of the slow attacks in the full suite; the momentum variants that average
#: gradients over several copies of the input get :data:`COPIES_SHARE`.
SLOW_SHARE = "1/4"
COPIES_SHARE = "1/2"
SUITES = ("default", "full")


@dataclass(frozen=True)
class Strengths:
    """Budgets of one image type, as spec strengths: every L-inf strength, the small and main
    ones, every L2 strength and the main L2 one."""

    linf: tuple[str, ...]
    linf_two: tuple[str, ...]
    l2: tuple[str, ...]
    l2_main: str

    @property
    def linf_main(self) -> str:
        return self.linf_two[-1]


GREY = Strengths(("0.02", "0.05", "0.1", "0.2", "0.3"), ("0.1", "0.3"), ("0.5", "1", "2"), "1")
COLOUR = Strengths(("1/255", "2/255", "4/255", "8/255", "16/255"), ("2/255", "8/255"),
                   ("0.25", "0.5", "1"), "0.5")

ALL, TWO, MAIN = "all", "two", "main"
#: The full suite: (attack name, which strengths, image share), grouped by family in the order
#: of :data:`evaluation.catalogue.FAMILIES`; minimal
#: perturbation attacks take no strength. Each family's first attack runs at ALL strengths.
FULL: tuple[tuple[str, str, str], ...] = (
    ("fgsm", ALL, "1"), ("rfgsm", TWO, "1"), ("ffgsm", TWO, "1"),
    ("pgd", ALL, "1"), ("bim", TWO, "1"), ("apgd", TWO, "1"),
    ("apgd-dlr", ALL, "1"), ("tpgd", TWO, "1"), ("jitter", TWO, "1"),
    ("mifgsm", ALL, "1"), ("nifgsm", TWO, "1"), ("difgsm", TWO, "1"),
    ("vmifgsm", MAIN, COPIES_SHARE), ("vnifgsm", MAIN, COPIES_SHARE),
    ("sinifgsm", MAIN, COPIES_SHARE), ("tifgsm", MAIN, "1"), ("pifgsm", MAIN, "1"),
    ("pgdl2", ALL, "1"), ("apgd-l2", MAIN, "1"),
    ("cw", MAIN, SLOW_SHARE), ("deepfool", MAIN, SLOW_SHARE), ("fab", MAIN, SLOW_SHARE),
    ("square", ALL, SLOW_SHARE), ("spsa", MAIN, SLOW_SHARE),
    ("pgd-targeted", ALL, "1"), ("apgdt", TWO, SLOW_SHARE),
)


def full_suite(grey: bool) -> tuple[str, ...]:
    """The ``full`` suite's attack specs for grey or colour images, family by family."""
    strengths = GREY if grey else COLOUR
    specs = []
    for name, which, share in FULL:
        kind = CATALOGUE[name]
        if kind.colour_only and grey:
            continue
        suffix = "" if share == "1" else f"@{share}"
        if not kind.takes_eps:
            specs.append(name + suffix)
            continue
        if kind.norm == "l2":
            eps = strengths.l2 if which == ALL else (strengths.l2_main,)
        else:
            eps = {ALL: strengths.linf, TWO: strengths.linf_two,
                   MAIN: (strengths.linf_main,)}[which]
        specs += [f"{name}:{e}{suffix}" for e in eps]
    return tuple(specs)


def eval_suite(name: str, grey: bool) -> tuple[str, ...]:
    """The attack specs of suite ``name`` (one of :data:`SUITES`) for grey or colour images;
    ValueError naming an unknown suite."""
    if name == "default":
        return GREY_DEFAULT if grey else COLOUR_DEFAULT
    if name == "full":
        return full_suite(grey)
    raise ValueError(f"unknown evaluation suite {name!r}; choose from {', '.join(SUITES)}")
