"""A bundle's false alarms under benign changes, at the evaluated strengths and past them.

``fit_detector`` judges false alarms on the changes of :func:`evaluation.shifts.benign_shifts`
(its report, "within 2 points"), and its benign negatives are drawn around those strengths.
This asks what happens further out: on held-out test images (the evaluation half of
``fit_detector``'s split, past the images it evaluated on, so neither fitted nor evaluated) it
measures, per bundle, the share flagged at the bundle's threshold under every evaluated change
and under each of :func:`evaluation.shifts.beyond_shifts` (stronger noise, brightness,
contrast and rotation; a Gaussian blur; gamma), among the images the classifier gets right
before and after the change, next to the accuracy drop. A detector that only learnt the
evaluated strengths shows it here.

Usage::

    python benchmarks/false_alarms.py --bundle models/mnist/bundle \
        --dataset ../shared/data/mnist.npz --threads 2 [--json false_alarms.json]

prints a Markdown table (rows: changes, columns: bundles) and the worst change within 2 points
of accuracy per bundle and group; exits 2 naming a missing bundle, an unknown data set or one
whose images do not fit a bundle, or a held-out range with no images.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detector.bundle import Bundle, BundleError, load_bundle
from evaluation.metrics import benign_change_metrics, worst_benign
from evaluation.protocol import split_by_image
from evaluation.shifts import benign_shifts, beyond_shifts
from training.cli import positive
from training.data import load_dataset, to_float


def false_alarms(bundle: Bundle, images: dict[str, dict[str, torch.Tensor]],
                 y: torch.Tensor) -> dict[str, dict[str, Any]]:
    """False alarms of ``bundle`` on ``images`` (group -> change -> (N, C, H, W) float in
    [0, 1], changed copies of the same N clean images ``images["clean"]["clean"]``), labels
    y: (N,). Returns group -> {"changes": change -> :func:`evaluation.metrics
    .benign_change_metrics`, "worst": :func:`evaluation.metrics.worst_benign` of them}."""
    x_clean, y_true = images["clean"]["clean"], y.numpy()
    with torch.inference_mode():
        clean = bundle.analyze(x_clean)  # once: it is both the reference and the clean row
        analyses = {group: {change: clean if x is x_clean else bundle.analyze(x)
                            for change, x in changes.items()}
                    for group, changes in images.items()}
    correct = clean.predictions == y_true
    out: dict[str, dict[str, Any]] = {}
    for group, changes in analyses.items():
        metrics = {change: benign_change_metrics(a.flagged, correct, a.predictions == y_true)
                   for change, a in changes.items()}
        out[group] = {"changes": metrics, "worst": worst_benign(metrics)}
    return out


def held_out(n_test: int, seed: int, skip: int, n: int) -> np.ndarray:
    """Indices of ``n`` test images (of ``n_test``) from the evaluation half of
    :func:`evaluation.protocol.split_by_image` with ``seed``, past its first ``skip`` (those
    ``fit_detector --max-eval skip`` evaluated on); fewer if the half runs out."""
    _, evaluation = split_by_image(n_test, seed)
    return evaluation[skip:skip + n].numpy()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", required=True,
                   help="bundle directory, repeatable")
    p.add_argument("--dataset", default="digits",
                   help="'digits' or a .npz file; its test split is used (default: digits)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="--seed of the fit_detector runs that made the bundles: its split "
                        "decides which test images are held out (default: %(default)s)")
    p.add_argument("--skip", type=int, default=1000,
                   help="images of the evaluation half to leave out first: those fit_detector "
                        "evaluated on (its --max-eval; default: %(default)s)")
    p.add_argument("--n", type=positive(int), default=2000,
                   help="held-out images at most (default: %(default)s)")
    p.add_argument("--threads", type=positive(int), default=1,
                   help="torch threads (default: %(default)s)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    if args.skip < 0:
        p.error(f"--skip must be >= 0, got {args.skip}")
    torch.set_num_threads(args.threads)
    bundles = {}
    for d in args.bundle:
        try:
            bundles[str(d)] = load_bundle(d)
        except (BundleError, FileNotFoundError) as e:
            p.error(f"--bundle {d}: {e}")
    try:
        data = load_dataset(args.dataset)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    ids = held_out(len(data.y_test), args.split_seed, args.skip, args.n)
    if len(ids) == 0:
        p.error(f"no held-out images: the evaluation half of {args.dataset}'s "
                f"{len(data.y_test)} test images has none past --skip {args.skip}")
    x, y = to_float(data.x_test[ids]), torch.as_tensor(data.y_test[ids])
    for name, b in bundles.items():
        if tuple(b.spec.input_shape) != tuple(x.shape[1:]):
            p.error(f"{name} takes {tuple(b.spec.input_shape)} images, {args.dataset} has "
                    f"{tuple(x.shape[1:])}")
    images = {"clean": {"clean": x}, "evaluated": benign_shifts(x, seed=args.split_seed),
              "beyond": beyond_shifts(x, seed=args.split_seed + 1)}
    results = {name: false_alarms(b, images, y) for name, b in bundles.items()}

    w = sys.stdout.write
    w(f"{len(y)} held-out test images of {args.dataset}; share flagged at the threshold of "
      "those right before and after (accuracy points against clean)\n\n")
    w("| change | group | " + " | ".join(results) + " |\n|---|---|" + "---|" * len(results)
      + "\n")
    for group, changes in images.items():
        for change in changes:
            cells = []
            for r in results.values():
                m = r[group]["changes"][change]
                flagged = "-" if m["flagged"] is None else f"{m['flagged']:.1%}"
                drop = "" if group == "clean" else f" ({-100 * m['accuracy_drop']:+.1f})"
                cells.append(flagged + drop)
            w(f"| {change} | {group} | " + " | ".join(cells) + " |\n")
    for name, r in results.items():
        for group in ("evaluated", "beyond"):
            worst = r[group]["worst"]
            w(f"\n{name}, {group}: " + ("no change within 2 points" if worst is None else
                                       f"most flagged {worst['flagged']:.1%} "
                                       f"({worst['change']})"))
    w("\n")
    out = {"dataset": args.dataset, "images": len(y), "image_ids": ids.tolist(),
           "bundles": results}
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
