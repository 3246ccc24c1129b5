"""What a bundle's detector costs next to its network, at batch 1, side by side in one run.

For a bundle this times, interleaved on one thread (the server's default), the bare
network's forward pass and the path -> features -> score step on the same test images
(:func:`evaluation.cost.detector_costs`), and prints the ratio: the detection issue's budget
for the whole path -> score step is 0.25x the network. The stability transforms' extra forward
pass (network work, not the detector's) is printed apart. ``--runs`` repeats the measurement,
since the ratio moves with what else the machine does.

Usage::

    python benchmarks/detector_cost.py --bundle models/cifar10/bundle \\
        --dataset ../shared/data/cifar10.npz --images 50 --rounds 300 --runs 3
    python benchmarks/detector_cost.py --bundle models/mnist/bundle \\
        --dataset ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import sys

from evaluation.cost import detector_costs
from training.bundle_options import add_bundle_options, bundle_and_data
from training.cli import positive
from training.data import to_float


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bundle_options(parser)
    parser.add_argument("--images", type=positive(int), default=50,
                        help="test images cycled through the rounds (default: %(default)s)")
    parser.add_argument("--rounds", type=positive(int), default=300,
                        help="interleaved timed rounds per run (default: %(default)s)")
    parser.add_argument("--runs", type=positive(int), default=3,
                        help="measurements (default: %(default)s)")
    args = parser.parse_args(argv)
    bundle, data = bundle_and_data(parser, args.bundle, args.dataset)
    images = to_float(data.x_test[:args.images])
    print(f"{args.bundle}: {len(images)} test images, {args.rounds} interleaved rounds, "  # noqa: T201
          "1 thread\nrun | path -> score us | network us | ratio | stability pass us")
    for run in range(1, args.runs + 1):
        cost = detector_costs(bundle.model, images, {"bundle": (bundle.profile, bundle.detector)},
                              repeats=args.rounds)["bundle"]
        row = (f"{run} | {cost.score_us:.0f} | {cost.network_us:.0f} | {cost.score_ratio:.3f} | "
               f"{cost.stability_us:.0f}")
        print(row, flush=True)  # noqa: T201


if __name__ == "__main__":
    try:  # detector_costs pins one thread while it times
        main()
    except KeyboardInterrupt:
        sys.exit(130)
