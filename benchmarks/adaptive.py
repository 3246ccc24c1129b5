"""Adaptive attacks on the path detector: the attacker knows the model, the gates and the
detector, and wants an input that is misclassified *and* not flagged.

Attacks, all L-inf with budget eps, on correctly classified test images that the bundle's
detector was not fitted on (the evaluation half of the test split as
``python -m training.fit_detector --seed <split-seed>`` splits it):

- ``pgd`` (non-adaptive): PGD (cross-entropy, random start) with the same eps, steps and step
  size as the adaptive attack; the detector is ignored and its last iterate is judged.
- ``adaptive``: detector-aware PGD (:class:`evaluation.adaptive.pgd.DetectorAwarePGD`) on
  ``relu(CW margin + kappa) + lambda * clamp(surrogate, -det_margin)``: straight-through
  (BPDA) gradients through the hard gates, the shipped path statistics against the class the
  input is pushed into, and a differentiable surrogate of the detector's verdict
  (``--surrogate auto``, the default: the detector's own score where its torch export is
  exact, logistic and MLP detectors, else :class:`evaluation.adaptive.surrogate.Surrogate`, an
  MLP distilled from the real detector's flags; the JSON's ``config.surrogate`` records which).
  Every lambda in ``--lambdas`` is tried in order on
  the inputs not yet broken; every iterate is judged by the real pipeline and the first one
  that is misclassified and not flagged is kept. lambda 0 is PGD on the margin alone with the
  real detector as a stopping oracle (what selection alone buys).
- ``square`` (black-box, plain): torchattacks Square (:mod:`evaluation.attacks`), margin loss;
  ``square-aware``: Square on a detector-aware margin computed from the real pipeline's scores
  (the score is part of every API response; :mod:`evaluation.adaptive.square`); it stops on an
  input as soon as it is misclassified and not flagged.

The surrogate is fitted on images of the *fitting* half (never the evaluated ones): features of
clean images and of every iterate of PGD at each eps, labelled by the real detector's flag;
then ``--refit-rounds`` times, the adaptive attack runs on those images with the current
surrogate and its iterates are added (so the surrogate learns the region the attack visits).

Success is always judged with the real pipeline (:meth:`detector.bundle.Bundle.analyze`: the
bundle's features, scikit-learn detector and threshold), never with the surrogate. The rate
reported is the share of the evaluated images that end misclassified and not flagged
(``evaded_up_to_eps`` in the JSON: by the attack at this or any smaller eps of the sweep);
``8-bit`` repeats that after rounding the perturbation towards zero to the 1/255 grid (what a
PNG upload can carry; ``--grid`` keeps the adaptive attack's iterates on that grid instead).
If a black-box attack beats the white-box adaptive one at some eps,
gradients are probably masked: a warning is printed and recorded.

The attacks and the sweep are library code (:mod:`evaluation.adaptive`); this script loads the
bundle and the images, runs :func:`evaluation.adaptive.benchmark.sweep` and writes the results.

Usage::

    python benchmarks/adaptive.py --bundle models/mnist/bundle \\
        --dataset ../shared/data/mnist.npz --n 300 --eps 0.05 0.1 0.2 0.3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.bundle import load_bundle
from detector.straight_through import STE_KINDS
from evaluation.adaptive.benchmark import (
    ATTACKS,
    markdown_table,
    plot_curves,
    select_images,
    sweep,
)
from evaluation.adaptive.pgd import PGDConfig
from evaluation.adaptive.surrogate import (
    SURROGATES,
    ShippedScore,
    Surrogate,
    fit_attack_surrogate,
)
from training.cli import pixel_budget, positive
from training.data import load_dataset, to_float


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON content (also printed as a Markdown table)."""
    t_start = time.perf_counter()
    bundle = load_bundle(args.bundle)
    bundle.model.requires_grad_(False)  # gradients only ever with respect to inputs
    data = load_dataset(args.dataset, args.data_dir)
    if data.input_shape != tuple(bundle.spec.input_shape):
        raise ValueError(f"--dataset {args.dataset!r} has images {data.input_shape}, the bundle "
                         f"expects {tuple(bundle.spec.input_shape)}")
    x_test = to_float(data.x_test)
    x, y, ids = select_images(bundle, x_test, data.y_test, args.n, side="eval",
                              split_seed=args.split_seed, seed=args.seed)
    configs = [PGDConfig(eps=e, alpha=args.alpha_factor * e / args.steps, steps=args.steps,
                         kappa=args.kappa, det_margin=args.det_margin, ste=args.ste,
                         random_start=args.random_start, grid=args.grid) for e in sorted(args.eps)]
    seconds: dict[str, float] = {}
    surrogate: Surrogate | ShippedScore | None = None
    history: list[dict[str, Any]] = []
    sur_ids = np.zeros(0, dtype=np.int64)
    if args.surrogate in ("shipped", "auto"):
        surrogate = ShippedScore.of(bundle)
        if args.surrogate == "auto":  # the config records what was used
            args.surrogate = "mlp" if surrogate is None else "shipped"
        if surrogate is None and args.surrogate == "shipped":
            raise ValueError(f"--surrogate shipped: the bundle's {bundle.detector.model} detector "
                             "has no exact torch version (only logistic and mlp have); fit a "
                             "stand-in with --surrogate mlp")
    if surrogate is None and any(lam > 0 for lam in args.lambdas):
        t0 = time.perf_counter()
        xs, ys, sur_ids = select_images(bundle, x_test, data.y_test, args.surrogate_images,
                                        side="fit", split_seed=args.split_seed,
                                        seed=args.seed + 1)
        surrogate, history = fit_attack_surrogate(
            bundle, xs, ys, configs, args.lambdas, kind=args.surrogate,
            rounds=args.refit_rounds, seed=args.seed, batch_size=args.batch_size)
        seconds["surrogate"] = time.perf_counter() - t0

    clean = bundle.analyze(x) if len(y) else None
    n_bb = len(y) if args.n_blackbox is None else min(args.n_blackbox, len(y))
    rows, warnings = sweep(bundle, x, y, ids, configs, attacks=args.attacks,
                           lambdas=args.lambdas, restarts=args.restarts,
                           surrogate=surrogate, n_blackbox=n_bb,
                           square_queries=args.square_queries, batch_size=args.batch_size,
                           seed=args.seed)
    seconds["total"] = time.perf_counter() - t_start
    content = {
        "bundle": str(args.bundle), "dataset": str(args.dataset),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("json", "quiet")},
        "pgd_configs": [asdict(c) for c in configs],
        "threshold": float(bundle.detector.threshold_),
        "n": len(y), "n_blackbox": n_bb, "image_ids": ids.tolist(),
        "surrogate_image_ids": sur_ids.tolist(),
        "clean_flagged": float(clean.flagged.mean()) if clean is not None else float("nan"),
        "surrogate": history, "results": rows, "warnings": warnings, "seconds": seconds,
    }
    print(markdown_table(content))  # noqa: T201
    for w in warnings:
        print(f"WARNING: {w}")  # noqa: T201
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(content, indent=2) + "\n")
    if args.plot is not None:
        plot_curves(content, args.plot, f"{bundle.name}: adaptive attacks "
                    f"({args.steps} steps, {args.restarts} restart(s) per lambda)")
    return content


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/adaptive.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    p.add_argument("--dataset", required=True,
                   help="the data set the bundle was fitted on: digits, a .npz file, "
                        "mnist/cifar10 (torchvision, under --data-dir)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="root of torchvision datasets (default: %(default)s)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="--seed of the fit_detector run that made the bundle: its evaluation "
                        "half of the test split is attacked (default: %(default)s)")
    p.add_argument("--n", type=int, default=300,
                   help="correctly classified evaluation images to attack (default: "
                        "%(default)s)")
    p.add_argument("--n-blackbox", type=int, default=100,
                   help="the first this many of them are also attacked by the black-box "
                        "attacks (default: %(default)s)")
    p.add_argument("--eps", type=pixel_budget, nargs="+", default=[0.05, 0.1, 0.2, 0.3],
                   help="L-inf budgets, pixel units in (0, 1], e.g. 0.1 or 8/255 (default: "
                        "%(default)s)")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS),
                   help="attacks to run (default: all)")
    a = p.add_argument_group("PGD (both kinds)")
    a.add_argument("--steps", type=int, default=20,
                   help="sign-gradient steps per run (default: %(default)s)")
    a.add_argument("--alpha-factor", type=float, default=2.5,
                   help="step size = factor * eps / steps (default: %(default)s, i.e. eps/8 at "
                        "20 steps as in evaluation.attacks)")
    g = p.add_argument_group("adaptive attack")
    g.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0],
                   help="weights of the detector term, tried in order on the inputs not yet "
                        "broken (default: %(default)s)")
    g.add_argument("--restarts", type=positive(int), default=1,
                   help="runs per lambda on the images not yet broken, every one after the "
                        "first from a random point of the ball (default: %(default)s)")
    g.add_argument("--kappa", type=float, default=3.0,
                   help="CW margin target in logits (default: %(default)s)")
    g.add_argument("--det-margin", type=float, default=3.0,
                   help="the detector term stops pushing once the surrogate score is below "
                        "minus this (default: %(default)s)")
    g.add_argument("--ste", choices=STE_KINDS, default="semhash",
                   help="backward pass of the hard gates (default: %(default)s)")
    g.add_argument("--random-start", action="store_true",
                   help="start from a uniformly random point of the ball (default: the image)")
    g.add_argument("--grid", action="store_true",
                   help="keep every iterate on the 1/255 grid, perturbation rounded towards "
                        "zero (attacks through 8-bit uploads; each step must be at least 1/255, "
                        "e.g. --steps 20 --alpha-factor 5 from eps 4/255; default: float "
                        "iterates, what the exact FP32 tensor endpoint accepts)")
    g.add_argument("--surrogate", choices=(*SURROGATES, "shipped", "auto"), default="auto",
                   help="differentiable stand-in of the detector, fitted to its flags, or "
                        "'shipped': the detector's own score (exact for logistic and mlp "
                        "detectors); 'auto': shipped where it exists, else mlp "
                        "(default: %(default)s)")
    g.add_argument("--surrogate-images", type=int, default=64,
                   help="fitting-side images whose attack iterates fit the surrogate (default: "
                        "%(default)s)")
    g.add_argument("--refit-rounds", type=int, default=1,
                   help="rounds of adding the adaptive attack's own iterates and refitting "
                        "(default: %(default)s)")
    b = p.add_argument_group("black-box")
    b.add_argument("--square-queries", type=int, default=300,
                   help="Square query budget per image (default: %(default)s)")
    r = p.add_argument_group("runtime")
    r.add_argument("--batch-size", type=int, default=300,
                   help="images per attack batch (default: %(default)s)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    r.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads (default: %(default)s)")
    r.add_argument("--json", type=Path, default=None, help="write the results to this file")
    r.add_argument("--plot", type=Path, default=None,
                   help="write the attacker's success against eps as a PNG to this file")
    r.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("n", "steps", "surrogate_images", "square_queries", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.refit_rounds < 0:
        parser.error(f"--refit-rounds must be >= 0, got {args.refit_rounds}")
    if args.n_blackbox is not None and args.n_blackbox < 0:
        parser.error(f"--n-blackbox must be >= 0, got {args.n_blackbox}")
    for name in ("json", "plot"):  # refused now, not after a long run
        path = getattr(args, name)
        if path is not None and path.is_dir():
            parser.error(f"--{name} {path} is a directory; give a file name")
    if any(lam < 0 for lam in args.lambdas):
        parser.error(f"--lambdas must be >= 0, got {args.lambdas}")
    if args.alpha_factor <= 0:
        parser.error(f"--alpha-factor must be > 0, got {args.alpha_factor}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check(args, parser)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    try:
        with threadpool_limits(args.threads):
            return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
