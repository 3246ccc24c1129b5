"""Command-line plumbing shared by the training commands: options, runtime, error handling."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch

from detector.models import MODEL_NAMES, min_input_size
from training.adversarial import METHODS
from training.data import DATASET_HELP, ImageData, load_dataset
from training.engine import PRECISIONS


def add_data_args(p: argparse.ArgumentParser, default: str = "digits") -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=default, help=f"{DATASET_HELP} (default: %(default)s)")
    g.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="root for torchvision datasets (default: %(default)s)")
    g.add_argument("--download", action="store_true",
                   help="let torchvision download mnist/cifar10 into --data-dir")
    g.add_argument("--image-size", type=int, default=64,
                   help="side length ImageFolder images are resized to (default: %(default)s)")


def add_adversarial_args(p: argparse.ArgumentParser) -> None:
    """--adversarial-eps, --adversarial-method and --adversarial-check (fast adversarial
    training, :mod:`training.adversarial`)."""
    g = p.add_argument_group("fast adversarial training (single-step attacks on every batch)")
    g.add_argument("--adversarial-eps", type=pixel_budget, default=None, metavar="EPS",
                   help="train on single-step adversarial examples at this L-inf budget (pixel "
                        "units, e.g. 8/255) instead of clean images (one more forward and "
                        "backward pass per batch; default: off)")
    g.add_argument("--adversarial-method", choices=sorted(METHODS), default="n-fgsm",
                   help="n-fgsm (de Jorge et al. 2022: noise of 2 eps, step eps, no projection) "
                        "or fgsm-rs (Wong et al. 2020: random start, step 1.25 eps; overfits "
                        "catastrophically on airbench unless its stem is regularised with "
                        "training.train --whiten-eps 0.1, RESULTS 1.5) (default: %(default)s)")
    g.add_argument("--adversarial-check", type=positive(int), default=500, metavar="N",
                   help="after every epoch, clean and PGD-10 accuracy at that eps on N "
                        "training images drawn with a fixed seed (left out of training), to "
                        "catch catastrophic overfitting; the epoch with the best sum of the "
                        "two is kept (default: %(default)s)")


def pixel_budget(text: str) -> float:
    """argparse type: an L-inf budget in (0, 1], as ``0.03`` or ``8/255``."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def add_runtime_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    """--seed, --threads, --precision, -q and (for commands that train) --device."""
    g = p.add_argument_group("runtime")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: all cores)")
    if device:
        g.add_argument("--device", default="cpu",
                       help="torch device that trains, e.g. cpu or cuda; evaluation and the "
                            "written checkpoint are on the CPU (default: %(default)s)")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="arithmetic of any training this command does: bf16 autocast is "
                        "~3.7x faster on CPUs with AMX/AVX-512 BF16 (Sapphire Rapids and later) "
                        "and on recent GPUs (default: %(default)s)")
    g.add_argument("-q", "--quiet", action="store_true", help="log warnings only")


def setup_runtime(args: argparse.Namespace) -> None:
    """Logging, seed and thread count from the parsed options."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = getattr(args, "device", "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; e.g. cpu, cuda or cuda:1") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")


def load_data(args: argparse.Namespace) -> ImageData:
    return load_dataset(args.dataset, args.data_dir, args.download, args.image_size)


def check_arch(arch: str, data: ImageData) -> None:
    """ValueError naming the architecture or image size if they cannot work together."""
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(MODEL_NAMES)}")
    _, h, w = data.input_shape
    side = min_input_size(arch)
    if min(h, w) < side:
        raise ValueError(f"images of {data.name!r} are {h}x{w}, too small for {arch} "
                         f"(needs at least {side}x{side})")


def _finite_number(text: str, kind: type[int] | type[float]) -> int | float:
    """``text`` as a finite ``kind``, else argparse's error naming it."""
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def finite(text: str) -> float:
    """argparse type: a finite real number (not nan or inf), error naming the bad value."""
    return float(_finite_number(text, float))


def share(text: str) -> float:
    """argparse type: a number in [0, 1], error naming the bad value."""
    value = finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text!r}")
    return value


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1, error naming the bad value."""
    value = finite(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value


def _at_least(kind: type[int] | type[float], low: float, strict: bool
              ) -> Callable[[str], int | float]:
    """argparse type: a finite number above ``low`` (or at least ``low`` unless ``strict``),
    error naming the bad value."""
    def parse(text: str) -> int | float:
        value = _finite_number(text, kind)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got {text!r}")
        return value
    return parse


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """argparse type: a positive finite number, error naming the bad value."""
    return _at_least(kind, 0, strict=True)


def nonnegative(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """argparse type: a finite number >= 0, error naming the bad value."""
    return _at_least(kind, 0, strict=False)


def run_command(parser: argparse.ArgumentParser, main: Callable[[argparse.Namespace], None],
                argv: list[str] | None = None) -> None:
    """Parse, run, and turn user errors (bad values, missing files) into a one-line exit 2."""
    args = parser.parse_args(argv)
    try:
        setup_runtime(args)
        main(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None
