"""Command-line options of the benchmarks that time a bundle on test images: ``--bundle`` and
``--dataset``, loaded and checked against each other with errors that name the bad value."""

from __future__ import annotations

import argparse
from pathlib import Path

from detector.bundle import Bundle, BundleError, load_bundle
from training.data import ImageData, load_dataset


def add_bundle_options(parser: argparse.ArgumentParser) -> None:
    """``--bundle`` (default: the accurate CIFAR-10 bundle) and ``--dataset`` (default: the
    shared CIFAR-10 copy), as the benchmarks that time a bundle on test images take them."""
    parser.add_argument("--bundle", type=Path, default=Path("models/cifar10/bundle"),
                        help="bundle directory (default: %(default)s)")
    parser.add_argument("--dataset", default="../shared/data/cifar10.npz",
                        help="test images: a dataset spec of training.data (default: %(default)s)")


def bundle_and_data(parser: argparse.ArgumentParser, bundle_dir: Path,
                    dataset: str) -> tuple[Bundle, ImageData]:
    """The bundle at ``bundle_dir`` and the data set ``dataset`` (a spec of
    :func:`training.data.load_dataset`) whose images it takes; ``parser.error`` (exit status 2)
    names a bad ``--bundle`` or ``--dataset``, or a data set of another image shape."""
    try:
        bundle = load_bundle(bundle_dir)
    except (BundleError, FileNotFoundError) as e:
        parser.error(f"--bundle {bundle_dir}: {e}")
    try:
        data = load_dataset(dataset)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--dataset {dataset}: {e}")
    if data.input_shape != tuple(bundle.spec.input_shape):
        parser.error(f"--dataset {dataset} has images of shape {data.input_shape}, the "
                     f"bundle takes {tuple(bundle.spec.input_shape)}")
    return bundle, data
