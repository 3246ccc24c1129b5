"""Classifier accuracy under the benign changes a deployment sees, checkpoints side by side.

For each checkpoint (base or decoupled) this measures test accuracy on the clean images and on
each change of :func:`evaluation.shifts.benign_shifts` (Gaussian noise, JPEG quality 30-90,
brightness and contrast, 1-2 pixel shifts, rotations by 5 degrees: the list the detector's false
alarms are judged on), and the change in points against clean. A classifier that breaks under
one of them (the MNIST models before ``--benign-augment``: 9.5 % under brightness +0.1) gives
its detector inputs no clean profile covers.

Usage::

    python benchmarks/benign.py --checkpoint models/mnist/base --checkpoint models/mnist/decoupled \
        --dataset ../shared/data/mnist.npz --threads 2 [--json benign.json]

prints a Markdown table (rows: changes, columns: checkpoints) and the worst change per
checkpoint; exits 2 naming a missing checkpoint or a data set whose images do not fit it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from detector.checkpoint import load_checkpoint
from evaluation.sets import predict
from evaluation.shifts import benign_shifts
from training.cli import positive
from training.data import load_dataset, to_float


def accuracies(model: torch.nn.Module, images: dict[str, torch.Tensor],
               y: torch.Tensor) -> dict[str, float]:
    """Accuracy in [0, 1] on each set of ``images`` (name -> (N, C, H, W) float in [0, 1],
    e.g. clean and each benign change of the same images), labels y: (N,)."""
    with torch.inference_mode():
        return {name: float((predict(model, x) == y).float().mean())
                for name, x in images.items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, action="append", required=True,
                   help="checkpoint directory (base or decoupled), repeatable")
    p.add_argument("--dataset", default="digits",
                   help="'digits' or a .npz file; its test split is used (default: digits)")
    p.add_argument("--n", type=positive(int), default=None,
                   help="first N test images only (default: all)")
    p.add_argument("--threads", type=positive(int), default=1,
                   help="torch threads (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for d in args.checkpoint:
        if not (d / "model.json").is_file():
            p.error(f"no checkpoint in {d}")
    try:
        data = load_dataset(args.dataset)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    x, y = to_float(data.x_test[:args.n]), data.y_test[:args.n]
    images = {"clean": x, **benign_shifts(x, seed=0)}  # the same changed images for every model
    results = {}
    for d in args.checkpoint:
        model, spec = load_checkpoint(d)
        if tuple(spec.input_shape) != tuple(x.shape[1:]):
            p.error(f"{d} takes {tuple(spec.input_shape)} images, {args.dataset} has "
                    f"{tuple(x.shape[1:])}")
        results[str(d)] = accuracies(model, images, y)
    w = sys.stdout.write
    w(f"{len(y)} test images of {args.dataset}; accuracy (points against clean)\n\n")
    w("| change | " + " | ".join(results) + " |\n|---|" + "---|" * len(results) + "\n")
    for change in next(iter(results.values())):
        cells = [f"{r[change]:.2%}" + ("" if change == "clean" else
                                       f" ({100 * (r[change] - r['clean']):+.1f})")
                 for r in results.values()]
        w(f"| {change} | " + " | ".join(cells) + " |\n")
    for name, r in results.items():
        worst = min((k for k in r if k != "clean"), key=r.__getitem__)
        w(f"\n{name}: worst {worst}, {r[worst]:.2%}")
    w("\n")
    if args.json is not None:
        args.json.write_text(json.dumps({"dataset": args.dataset, "images": len(y),
                                         "accuracy": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
