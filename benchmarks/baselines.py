"""Baseline adversarial-example detectors measured against the computation-path detector.

Everything is measured on one ``python -m training.fit_detector`` run: the same decoupled
classifier, the same adversarial sets (``<run>/adversarial.npz``), the same split into fitting
and evaluation images, the same seed and target false-positive rate. Each method is fitted on
the fitting side (clean images vs all fitting attacks) and evaluated on the evaluation side per
attack with :func:`evaluation.protocol.evaluate_scorer`; thresholds are set at the run's target
FPR on clean fitting images held out from fitting (grouped by image) by
:class:`detector.threshold.FPRThresholdClassifier`, as for :class:`detector.estimator.PathDetector`.
The methods are library code, one module each in :mod:`evaluation.baselines`.

Methods:

- ``ours``: :class:`~detector.estimator.PathDetector` (the run's inner model and features) on
  :class:`~detector.features.PathProfile` path statistics, through
  :func:`evaluation.protocol.evaluate_variant`, so its numbers reproduce the run's.
- ``pooled``: the same kind of detector on the concatenated global-average-pooled outputs of every
  gated layer with all gates forced open (``compute_path(..., force_open=True)``), i.e. the dense
  network's own activations: what computation paths add over plain activations.
- ``mahalanobis``: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
  Samples and Adversarial Attacks" (NeurIPS 2018): per-layer Mahalanobis confidence scores under
  class-conditional Gaussians with a tied covariance, on the features after the stem and after
  each stage, input pre-processing step chosen among the reference code's magnitudes by grouped
  cross-validation on the fitting side, logistic regression on the scores fitted on every
  fitting attack together (:mod:`evaluation.baselines.mahalanobis`).
- ``lid``: Ma et al., "Characterizing Adversarial Subspaces Using Local Intrinsic
  Dimensionality" (ICLR 2018): per-layer LID estimates (k = 20 neighbours in minibatches of 100
  clean reference activations), logistic regression (:mod:`evaluation.baselines.lid`).
- ``dknn``: Papernot and McDaniel, "Deep k-Nearest Neighbors" (2018): per layer the k = 75
  nearest of ``--dknn-train`` clean training images, nonconformity = neighbours over all layers
  whose label differs from a class, calibrated on clean fitting images; score 1 - credibility
  (:mod:`evaluation.baselines.deep_knn`). Fitted on no adversarial example.

As in both papers, Mahalanobis and LID are fitted with noisy negatives, labelled clean: each
fitting adversarial example's clean source image plus Gaussian noise, for LID of the same L2
norm (Ma et al.), for Mahalanobis of the reference code's fixed size (``--mahalanobis-noise``).
Baselines read the network with every gate open (``--gates open``, default) or with its gates
as trained (``--gates model``).

Usage::

    python benchmarks/baselines.py --run runs/digits/detector --threads 1

writes ``<run>/baselines.md`` and ``<run>/baselines.json`` and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from evaluation.baselines import deep_knn, lid, mahalanobis, path_detector, pooled
from evaluation.baselines.activations import select_inputs, select_layers
from evaluation.baselines.report import comparison_markdown
from evaluation.detector_run import DetectorRun, load_run, resolve_path
from evaluation.protocol import profile_ids
from evaluation.sets import correct_subset
from training.data import load_dataset, to_float

log = logging.getLogger("benchmarks.baselines")

METHODS = ("ours", "pooled", "mahalanobis", "lid", "dknn")


def profile_images(run: DetectorRun, data_dir: Path, max_profile: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean, correctly classified training images as fit_detector draws them for its profile:
    x (N, C, H, W) in [0, 1], y (N,)."""
    data = load_dataset(resolve_path(run.config["dataset"]), data_dir)
    ids = profile_ids(len(data.y_train), run.seed, max_profile)
    return correct_subset(run.model, to_float(data.x_train[ids]), data.y_train[ids])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/baselines.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True,
                   help="output directory of python -m training.fit_detector (metrics.json, "
                        "adversarial.npz)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to run (default: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and BLAS threads (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="root of torchvision datasets, if the run used one (default: "
                        "%(default)s)")
    p.add_argument("--max-profile", type=int, default=None,
                   help="clean training images for the path profile and the Mahalanobis "
                        "Gaussians (default: the run's own --max-profile); Deep k-NN takes the "
                        "first --dknn-train of them")
    p.add_argument("--gates", choices=("open", "model"), default="open",
                   help="baselines read the network with every gate forced open (the dense "
                        "network) or with its trained gates (default: %(default)s)")
    p.add_argument("--max-layers", type=int, default=6,
                   help="LID reads every gated layer if there are at most this many, else the "
                        "last one at each spatial resolution; Mahalanobis and Deep k-NN read "
                        "what the gated convs read, all if at most this many, else the stem's "
                        "output and the last at each resolution (default: %(default)s)")
    p.add_argument("--mahalanobis-eps", type=float, nargs="+",
                   default=list(mahalanobis.LEE_EPSILONS),
                   help="input pre-processing steps (pixel units) to choose from by "
                        "cross-validation on the fitting side (default: %(default)s)")
    p.add_argument("--mahalanobis-select", type=int, default=300,
                   help="fitting images (with their noisy and adversarial versions) on which "
                        "the step is chosen, at most (default: %(default)s)")
    p.add_argument("--mahalanobis-noise", choices=mahalanobis.NOISES, default="lee",
                   help="noisy negatives: Gaussian of the reference code's pixel std "
                        f"{mahalanobis.LEE_NOISE_STD} (lee), of each adversarial example's L2 "
                        "norm (same-l2, as LID and as this script did before), or none "
                        "(default: %(default)s)")
    p.add_argument("--lid-k", type=int, default=20, help="LID neighbours (default: %(default)s)")
    p.add_argument("--lid-batch", type=int, default=100,
                   help="LID reference minibatch size (default: %(default)s)")
    p.add_argument("--lid-reference", type=int, default=1000,
                   help="clean fitting images used as LID references at most (default: "
                        "%(default)s)")
    p.add_argument("--dknn-k", type=int, default=75,
                   help="Deep k-NN neighbours per layer (default: %(default)s)")
    p.add_argument("--dknn-train", type=int, default=5000,
                   help="clean training images Deep k-NN searches, at most (default: "
                        "%(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Load the run, run the methods, write baselines.md/.json; returns the JSON content."""
    start = time.perf_counter()
    run = load_run(args.run)
    force_open = args.gates == "open"
    n_adv = {k: len(s.y) for k, s in run.evaluation.adversarial.items()}
    log.info("run %s: %d fitting clean / %d adversarial, %d evaluation clean, attacks %s",
             run.directory, len(run.fit.y_clean),
             sum(len(s.y) for s in run.fit.adversarial.values()), len(run.evaluation.y_clean),
             n_adv)
    needs_profile = {"ours", "mahalanobis", "dknn"} & set(args.methods)
    max_profile = args.max_profile or int(run.config.get("max_profile", 10000))
    x_prof, y_prof = (profile_images(run, args.data_dir, max_profile) if needs_profile
                      else (torch.empty(0), torch.empty(0)))
    layers = select_layers(run.model, run.spec.input_shape, args.max_layers)
    inputs = select_inputs(run.model, run.spec.input_shape, args.max_layers)
    results: dict[str, dict[str, Any]] = {}
    for method in (m for m in METHODS if m in args.methods):
        t0 = time.perf_counter()
        if method == "ours":
            res = path_detector.fit_and_evaluate(run, x_prof, y_prof)
        elif method == "pooled":
            res = pooled.fit_and_evaluate(run, force_open)
        elif method == "mahalanobis":
            res = mahalanobis.fit_and_evaluate(run, x_prof, y_prof, inputs, args.mahalanobis_eps,
                                               force_open, args.mahalanobis_select,
                                               args.mahalanobis_noise)
        elif method == "lid":
            res = lid.fit_and_evaluate(run, layers, args.lid_k, args.lid_batch,
                                       args.lid_reference, force_open)
        else:
            res = deep_knn.fit_and_evaluate(run, x_prof[:args.dknn_train],
                                            y_prof[:args.dknn_train], inputs, args.dknn_k,
                                            force_open)
        res["seconds"] = time.perf_counter() - t0
        log.info("%s: worst AUROC %.3f (%s), %.1fs", method, res["worst"]["auroc"],
                 res["worst"]["auroc_attack"], res["seconds"])
        results[method] = res
    report = comparison_markdown(run, results, force_open)
    content = {
        "run": str(run.directory), "config": run.config, "gates": args.gates,
        "n_fit_clean": len(run.fit.y_clean),
        "n_fit_adv": {k: len(s.y) for k, s in run.fit.adversarial.items()},
        "n_eval_clean": len(run.evaluation.y_clean), "n_eval_adv": n_adv,
        "methods": results, "seconds": time.perf_counter() - start,
    }
    (run.directory / "baselines.md").write_text(report)
    (run.directory / "baselines.json").write_text(json.dumps(content, indent=2) + "\n")
    print(report)  # noqa: T201
    return content


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits

    try:
        with threadpool_limits(args.threads):
            run_all(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)  # noqa: T201
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
