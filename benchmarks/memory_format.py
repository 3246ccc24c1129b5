"""The decoupled network's inference forward pass in NCHW against NHWC (channels_last) memory
layout, side by side in one run.

:func:`detector.paths.compute_path` runs every inference-mode pass (fitting the detector,
serving, attacking) on a channels_last input; this benchmark is why. For a bundle it times,
interleaved on ``--threads`` threads (the server's default is one), the gated network's forward
pass (gates recorded, as the analysis runs it) on the same test images with a contiguous and
with a channels_last input, at batch 1 and batch 32, and prints the medians and their ratio.
The weights keep their layout in both.

Usage::

    python benchmarks/memory_format.py --bundle models/cifar10/bundle \\
        --dataset ../shared/data/cifar10.npz
"""

from __future__ import annotations

import argparse

import torch

from detector.execution import median_times_ms
from detector.paths import to_inference_layout
from detector.recording import recording
from training.bundle_options import add_bundle_options, bundle_and_data
from training.cli import positive
from training.data import to_float


def gated_forward(model: torch.nn.Module, x: torch.Tensor) -> None:
    """One gated forward pass of ``model`` (eval mode) on x: (B, C, H, W) as laid out, gates
    recorded as :func:`detector.paths.compute_path` records them."""
    with torch.inference_mode(), recording(pooled=False):
        model(x)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bundle_options(parser)
    parser.add_argument("--rounds", type=positive(int), default=200,
                        help="interleaved timed rounds per batch size (default: %(default)s)")
    parser.add_argument("--threads", type=positive(int), default=1,
                        help="torch threads (default: %(default)s)")
    args = parser.parse_args(argv)
    bundle, data = bundle_and_data(parser, args.bundle, args.dataset)
    torch.set_num_threads(args.threads)
    model = bundle.model.eval()
    print(f"{args.bundle}: {args.rounds} interleaved rounds, {args.threads} thread(s)\n"  # noqa: T201
          "batch | NCHW us | NHWC us | NHWC / NCHW")
    for batch in (1, 32):
        images = to_float(data.x_test[:batch]).contiguous()
        layouts = {"nchw": images, "nhwc": to_inference_layout(images)}
        medians = median_times_ms(
            {name: (lambda _, x=x: gated_forward(model, x)) for name, x in layouts.items()},
            [images], repeats=args.rounds, warmup=5)
        nchw, nhwc = (medians[name] * 1e3 for name in layouts)
        print(f"{batch} | {nchw:.0f} | {nhwc:.0f} | {nhwc / nchw:.3f}")  # noqa: T201


if __name__ == "__main__":
    main()
