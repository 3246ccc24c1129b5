"""``python -m training.fit_detector``: the main job.

From a decoupled classifier (trained on the fly for the data set if none is given or found):
craft adversarial examples, fit a detector on computation-path features, evaluate it on held-out
images against fitted and unseen attacks, and write a bundle the server loads.

Output (default ``runs/<dataset>/detector``): ``bundle/`` (for ``python -m service``),
``metrics.json``, ``report.md``, ``roc.png`` and ``adversarial.npz`` (the evaluated sets, for
``benchmarks/baselines.py``).

``torchrun --nproc_per_node N -m training.fit_detector ...`` crafts the attacks (and extracts
their paths) across N ranks, whole attacks per rank, with the same sets as one process
(:mod:`training.distributed_crafting`); rank 0 alone fits, evaluates and writes.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from detector.bundle import load_bundle, save_bundle
from detector.checkpoint import load_checkpoint
from detector.estimator import INNER_MODELS, PathDetector
from detector.features import FEATURE_GROUPS, PathProfile
from detector.paths import network_macs
from detector.stability import LUMA, TRANSFORMS, check_transforms, default_transforms
from detector.threshold import min_clean_scores
from evaluation.adaptive.evaluate import adaptive_positives, evaluate_adaptive
from evaluation.attacks import AttackSpec
from evaluation.cost import detector_costs
from evaluation.crafting import craft_sets
from evaluation.metrics import worst_case, worst_case_unseen_family
from evaluation.protocol import (
    CLASS_HEADS,
    class_heads,
    evaluate_variant,
    fit_on_sets,
    profile_ids,
    split_by_image,
)
from evaluation.report import markdown_report, plot_rocs
from evaluation.sets import (
    Sets,
    attach_stability,
    correct_subset,
    extract_paths,
    predict,
    sets_from_arrays,
    sets_to_arrays,
)
from evaluation.shifts import MAX_REACH, add_benign_negatives, add_noise_negatives, benign_shifts
from evaluation.suites import SUITES, eval_suite
from training import decouple as decouple_cmd
from training import train as train_cmd
from training.cli import (
    add_data_args,
    add_runtime_args,
    load_data,
    nonnegative,
    positive,
    probability,
    run_command,
)
from training.data import ImageData, to_float
from training.distributed import Rank, process_group
from training.distributed_crafting import Side, craft_across_ranks
from training.presets import preset_for
from training.report import write_json

log = logging.getLogger("training.fit_detector")

ADVERSARIAL = "adversarial.npz"
FIRST_FIT = "first_fit_bundle"  # the detector the --adaptive-positives attacks were crafted on

GREY_FIT = ("fgsm:0.1", "fgsm:0.2", "fgsm:0.3", "pgd:0.1", "pgd:0.2", "pgd:0.3")
COLOUR_FIT = ("fgsm:2/255", "fgsm:4/255", "fgsm:8/255", "fgsm:16/255", "pgd:2/255", "pgd:4/255",
              "pgd:8/255", "pgd:16/255")
VARIANTS = ("logistic", "hist_gb", "random_forest", "extra_trees", "logistic+raw", "hist_gb+raw")
#: How long a rank waits for the others under torchrun: rank 0 gathers the sets when the
#: slowest rank is done, and one attack can take an hour on CIFAR-10.
RANK_TIMEOUT = timedelta(hours=24)


def _reach(text: str) -> float:
    """argparse type of ``--negative-reach``: a number in (0, MAX_REACH]."""
    value = float(positive(float)(text))
    if value > MAX_REACH:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_REACH:g}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.fit_detector", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="decoupled run directory (default: runs/<dataset>/decoupled, trained "
                        "with the default settings if missing)")
    add_data_args(p)
    g = p.add_argument_group("attacks (name or name:eps, eps absolute or a fraction like 8/255)")
    g.add_argument("--fit-attacks", nargs="+", default=None,
                   help="attacks to fit on (default: FGSM and PGD at 0.1/0.2/0.3 for grey "
                        "images, 2/4/8/16 /255 for colour)")
    g.add_argument("--eval-attacks", nargs="+", default=None,
                   help="attacks to evaluate on, fitted and unseen (default: those of "
                        "--eval-suite); name:eps@share runs one on that share of the images; "
                        "the adaptive ones (pgd-aware:eps, square-aware:eps) attack the bundled "
                        "detector and are crafted after fitting, never reused")
    g.add_argument("--eval-suite", choices=SUITES, default="default",
                   help="evaluation attacks when --eval-attacks is not given: 'default' (fast: "
                        "FGSM, PGD at the main strength and two unseen ones, BIM, CW, "
                        "DeepFool, Square), 'full' (every torchattacks attack of the L-inf / L2 "
                        "threat model by family, each family at 1-16/255 for colour images, "
                        "0.02-0.3 for grey; slow ones on 1/4 of the images; "
                        "evaluation/suites.py) (default: %(default)s)")
    g.add_argument("--adaptive-positives", nargs="+", default=[], metavar="ATTACK",
                   help="adaptive attacks (pgd-aware:eps, square-aware:eps) to fit on as well: "
                        "the bundled detector is fitted once, these attack it on the fitting "
                        "images, their examples join the positives and the detector is fitted "
                        "again (the first fit is kept in <out>/first_fit_bundle); adaptive "
                        "--eval-attacks then attack the refitted detector (default: none)")
    g.add_argument("--attacks-per-image", type=positive(int), default=1,
                   help="fitting attacks applied to each fitting image, drawn at random; 1 keeps "
                        "clean and adversarial classes balanced (default: %(default)s)")
    g.add_argument("--square-queries", type=positive(int), default=1000,
                   help="query budget of the Square attack (default: %(default)s)")
    s = p.add_argument_group("images (the test split is split by image into fitting and "
                             "evaluation halves)")
    s.add_argument("--max-fit", type=positive(int), default=2000,
                   help="fitting images at most (default: %(default)s)")
    s.add_argument("--max-eval", type=positive(int), default=1000,
                   help="evaluation images at most (default: %(default)s)")
    s.add_argument("--threshold-images", type=nonnegative(int), default=0,
                   help="further fitting-half images after the --max-fit ones whose clean "
                        "scores (of those classified correctly) only set the threshold, with "
                        "the held-out quarter of the clean fitting images; never fitted on. A "
                        "threshold read off more clean images lands closer to --target-fpr on "
                        "new ones (default: %(default)s)")
    s.add_argument("--max-profile", type=positive(int), default=10000,
                   help="clean training images for the class path profile (default: %(default)s)")
    d = p.add_argument_group("detector")
    d.add_argument("--detector", default="random_forest", choices=INNER_MODELS,
                   help="inner model of the bundled detector (default: %(default)s)")
    d.add_argument("--raw-features", action="store_true",
                   help="append raw gate bits and logits to the path statistics")
    d.add_argument("--noise-negatives", action="store_true",
                   help="also fit on Gaussian-noise copies of the clean fitting images as "
                        "negatives (per-image sigma; the threshold stays on clean images)")
    d.add_argument("--benign-negatives", nargs="?", type=positive(int), const=1, default=0,
                   metavar="COPIES",
                   help="also fit on COPIES (default 1) randomly changed copies of each clean "
                        "fitting image (noise, JPEG, brightness, contrast, shift or rotation, "
                        "at strengths around the evaluated ones; those still classified "
                        "correctly) as negatives; the threshold stays on clean images")
    d.add_argument("--negative-reach", type=_reach, default=1.0,
                   help="upper ends of the continuous strengths of the noise and benign "
                        "negatives (noise sigma, brightness, contrast, rotation) times this, "
                        f"in (0, {MAX_REACH:g}]; above 1 the evaluated strengths lie inside the "
                        "fitted range rather than at its edge (default: %(default)s)")
    d.add_argument("--target-fpr", type=float, default=0.05,
                   help="false-positive rate on held-out clean images that sets the threshold "
                        "(default: %(default)s)")
    d.add_argument("--fpr-confidence", type=probability, default=None, metavar="C",
                   help="set the threshold so that new clean images are flagged at most at "
                        "--target-fpr with probability >= C (a one-sided Clopper-Pearson "
                        "bound on the held-out clean scores: it flags fewer of them; needs "
                        "enough of them, see --threshold-images). Default: flag --target-fpr "
                        "of the held-out clean images")
    d.add_argument("--class-heads", choices=CLASS_HEADS, default="auto",
                   help="class evidence features from per-layer class heads q(y | z^l): "
                        "'checkpoint' (the decoupling's MI heads), 'fit' (logistic regressions "
                        "fitted on the clean profile paths), 'auto' (the checkpoint's if it "
                        "kept them, else fitted), 'none' (default: %(default)s)")
    d.add_argument("--stability", nargs="*", default=None, metavar="TRANSFORM",
                   help="path stability features: compare each input's path with those of "
                        f"slightly changed copies ({', '.join(TRANSFORMS)}; one more forward "
                        "pass each when serving); the flag alone turns them off (default: "
                        f"{' '.join(default_transforms(False, False))}; on colour images "
                        "also greyscale, and mirror and mirror_shift where the data set's "
                        "classifier trains with flips by default)")
    d.add_argument("--compare", nargs="*", default=list(VARIANTS),
                   help="detector variants to compare in the report: inner model with optional "
                        "'+raw' and any '-GROUP' to leave a feature group out (groups: "
                        f"{', '.join(FEATURE_GROUPS)}), e.g. random_forest-class_evidence "
                        "(default: %(default)s); give the flag alone to compare none")
    d.add_argument("--ablation", action="store_true",
                   help="also compare the bundled detector with each feature group left out")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: runs/<dataset>/detector)")
    p.add_argument("--name", default=None,
                   help="the bundle's name, which the server reports (default: "
                        "<arch>-<dataset>, e.g. airbench-cifar10)")
    p.add_argument("--reuse-attacks", action="store_true",
                   help="take the fitting and evaluation sets from <out>/adversarial.npz of an "
                        "earlier run with the same checkpoint, images and attacks instead of "
                        "crafting them again (to compare detectors quickly)")
    add_runtime_args(p, device=False)
    return p


def ensure_checkpoint(args: argparse.Namespace, data: ImageData, rank: Rank | None = None
                      ) -> Path:
    """The decoupled checkpoint to use; trains base + decoupled runs if the default is absent
    (under torchrun on all ranks, each step finished by rank 0's writing before the next)."""
    if args.checkpoint is not None:
        return args.checkpoint
    root = Path("runs") / data.name
    if (root / "decoupled" / "model.json").is_file():
        return root / "decoupled"
    log.info("no decoupled model under %s: training one with the default settings", root)
    common = ["--dataset", args.dataset, "--data-dir", str(args.data_dir),
              "--image-size", str(args.image_size), "--seed", str(args.seed),
              "--precision", args.precision]
    if args.download:
        common.append("--download")
    train_cmd.main(train_cmd.build_parser().parse_args([*common, "--out", str(root / "base")]))
    if rank is not None:
        dist.barrier()
    decouple_cmd.main(decouple_cmd.build_parser().parse_args(
        [*common, "--base", str(root / "base"), "--out", str(root / "decoupled")]))
    if rank is not None:
        dist.barrier()
    return root / "decoupled"


def main(args: argparse.Namespace) -> None:
    """Run the command; under torchrun every rank crafts its share of the attacks and rank 0
    alone does the rest."""
    with process_group("cpu", timeout=RANK_TIMEOUT) as (rank, _):
        _fit(args, rank)


def _fit(args: argparse.Namespace, rank: Rank | None) -> None:
    if not 0.0 < args.target_fpr < 0.5:
        raise ValueError(f"--target-fpr must be in (0, 0.5), got {args.target_fpr}")
    variants = [_parse_variant(v) for v in args.compare]
    chosen = None if args.stability is None else check_transforms(args.stability)
    data = load_data(args)
    channels = data.input_shape[0]
    colour = channels == len(LUMA)
    # mirror where the preset trains with flips: the classes of such images survive a mirror
    stability = (default_transforms(preset_for(data).augment, colour) if chosen is None
                 else chosen)
    if "greyscale" in stability and not colour:  # fail before crafting
        raise ValueError(f"--stability greyscale needs colour images; {data.name} has "
                         f"{channels} channel(s)")
    checkpoint = ensure_checkpoint(args, data, rank)
    model, spec = load_checkpoint(checkpoint)
    if not spec.decoupled:
        raise ValueError(f"--checkpoint {checkpoint} is not decoupled; run training.decouple")
    if spec.input_shape != data.input_shape:
        raise ValueError(f"--checkpoint {checkpoint} expects images {spec.input_shape}, dataset "
                         f"{args.dataset!r} has {data.input_shape}")
    grey = channels == 1
    fit_specs = [AttackSpec.parse(a)
                 for a in args.fit_attacks or (GREY_FIT if grey else COLOUR_FIT)]
    eval_specs = [AttackSpec.parse(a)
                  for a in args.eval_attacks or eval_suite(args.eval_suite, grey)]
    if any(s.adaptive for s in fit_specs):
        raise ValueError("--fit-attacks: adaptive attacks (pgd-aware, square-aware) attack the "
                         "fitted detector, so they can only be evaluated: name them in "
                         "--eval-attacks")
    positive_specs = [AttackSpec.parse(a) for a in args.adaptive_positives]
    if not all(s.adaptive for s in positive_specs):
        raise ValueError("--adaptive-positives takes adaptive attacks only (pgd-aware, "
                         "square-aware), got "
                         f"{[s.label for s in positive_specs if not s.adaptive]}")
    # adaptive attacks need the fitted detector: crafted after fitting, against the bundle
    adaptive_specs = [s for s in eval_specs if s.adaptive]
    crafted_specs = [s for s in eval_specs if not s.adaptive]
    out = args.out or Path("runs") / data.name / "detector"
    start = time.perf_counter()

    # Split the test split by image: fitting and evaluation sides share no image.
    fit_half, eval_half = split_by_image(len(data.y_test), args.seed)
    fit_ids, eval_ids = fit_half[:args.max_fit], eval_half[:args.max_eval]
    threshold_ids = fit_half[len(fit_ids):len(fit_ids) + args.threshold_images]
    if len(threshold_ids) < args.threshold_images:
        raise ValueError(f"--threshold-images {args.threshold_images}: the fitting half has "
                         f"{len(threshold_ids)} images after the {len(fit_ids)} fitting ones")
    x_test = to_float(data.x_test)
    correct = predict(model, x_test) == data.y_test  # (N,) over the whole test split

    def correct_images(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = ids[correct[ids]]
        return x_test[keep], data.y_test[keep]

    x_fit, y_fit = correct_images(fit_ids)
    x_eval, y_eval = correct_images(eval_ids)
    if args.fpr_confidence is not None:  # fail before crafting, not after
        _check_threshold_images(args, len(y_fit), int(correct[threshold_ids].sum()))
    clean_acc = float(correct.float().mean())  # as training.train and training.decouple report it
    reused = args.reuse_attacks
    if reused and not (out / ADVERSARIAL).is_file():
        raise FileNotFoundError(f"--reuse-attacks: {out / ADVERSARIAL} not found; run once "
                                "without it to craft the sets")
    helper = rank is not None and not rank.main  # crafts its share of the attacks, no more
    if helper and reused:
        return

    # Class-conditional path profile from clean, correctly classified training images.
    if not helper:
        prof_ids = profile_ids(len(data.y_train), args.seed, args.max_profile)
        x_prof, y_prof = correct_subset(model, to_float(data.x_train[prof_ids]),
                                        data.y_train[prof_ids])
        prof_paths = extract_paths(model, x_prof)
        heads = class_heads(args.class_heads, checkpoint, prof_paths, y_prof, spec.num_classes)
        profile = PathProfile.fit(prof_paths, y_prof.numpy(), spec.num_classes, heads=heads)

    if reused:
        fit_sets, eval_sets = _reuse(out / ADVERSARIAL, model, fit_specs, crafted_specs,
                                     x_fit, x_eval)
    elif rank is not None:
        crafted = craft_across_ranks(
            model, [Side("fit", x_fit, y_fit, fit_specs, args.seed, args.attacks_per_image),
                    Side("eval", x_eval, y_eval, crafted_specs, args.seed + 1, None)],
            rank, square_queries=args.square_queries)
        if crafted is None:
            return
        fit_sets, eval_sets = crafted
    else:
        fit_sets = craft_sets(model, x_fit, y_fit, fit_specs, seed=args.seed,
                              per_image=args.attacks_per_image,
                              square_queries=args.square_queries)
        eval_sets = craft_sets(model, x_eval, y_eval, crafted_specs, seed=args.seed + 1,
                               per_image=None, square_queries=args.square_queries)
    if args.noise_negatives:
        add_noise_negatives(model, fit_sets, seed=args.seed + 2, reach=args.negative_reach)
    if args.benign_negatives:
        add_benign_negatives(model, fit_sets, seed=args.seed + 3, reach=args.negative_reach,
                             copies=args.benign_negatives)
    if len(threshold_ids):
        x_thr, y_thr = correct_images(threshold_ids)
        fit_sets.threshold = Sets(x_thr, y_thr, extract_paths(model, x_thr))
        log.info("%d further clean images set the threshold", len(y_thr))
    if stability:
        for sets in (fit_sets, eval_sets):
            attach_stability(model, sets, stability)
        profile = profile.with_stability(stability)
    bundle_name = args.name or f"{spec.arch}-{data.name}"
    macs = network_macs(model, spec.input_shape)
    fitting = fit_sets  # what the detectors are fitted on; adversarial.npz keeps fit_sets
    if positive_specs:  # fit once, attack that detector adaptively, fit on its examples too
        served = profile.with_features(include_raw=args.raw_features)
        first = fit_on_sets(PathDetector(model=args.detector, target_fpr=args.target_fpr,
                                         fpr_confidence=args.fpr_confidence,
                                         random_state=args.seed), served, fit_sets)
        save_bundle(out / FIRST_FIT, name=bundle_name, model=model, spec=spec, profile=served,
                    detector=first, network_macs=macs, metrics={"clean_accuracy": clean_acc})
        extra = adaptive_positives(load_bundle(out / FIRST_FIT), fit_sets, positive_specs,
                                   seed=args.seed + 4, square_queries=args.square_queries)
        for label, s in extra.items():
            log.info("%s: %d fitting positives", label, len(s.y))
        fitting = replace(fit_sets, adversarial={**fit_sets.adversarial, **extra})
    fitted = {s.label for s in fit_specs} | set(fitting.adversarial)  # adaptive positives too
    # benign changes of every evaluation image, right or wrong, for the classifier's accuracy
    x_all, y_all = x_test[eval_ids], data.y_test[eval_ids]
    shift_correct = correct[eval_ids].numpy()
    shifts = benign_shifts(x_all, seed=args.seed)
    shift_paths = {k: extract_paths(model, v, stability=stability) for k, v in shifts.items()}

    main_variant = (args.detector, args.raw_features, ())
    if args.ablation:
        variants += [(args.detector, args.raw_features, (g,)) for g in profile.groups]
    results: dict[str, dict[str, Any]] = {}
    bundled = None
    fitted_variants: dict[str, tuple[PathProfile, PathDetector]] = {}
    for name, raw, without in dict.fromkeys([main_variant, *variants]):
        missing = sorted(set(without) - set(profile.groups))
        if missing:
            raise ValueError(f"variant {_variant_name(name, raw, without)!r} leaves out feature "
                             f"groups {missing} that this profile does not have "
                             f"({', '.join(profile.groups)})")
        groups = tuple(g for g in profile.groups if g not in without)
        if not groups and not raw:
            raise ValueError(f"variant {_variant_name(name, raw, without)!r} leaves no features")
        detector = PathDetector(model=name, target_fpr=args.target_fpr,
                                fpr_confidence=args.fpr_confidence, random_state=args.seed)
        res = evaluate_variant(detector, profile.with_features(groups), raw, fitting,
                               eval_sets, shift_paths, y_all.numpy(), fitted, seed=args.seed,
                               clean_correct=shift_correct)
        results[_variant_name(name, raw, without)] = res
        fitted_variants[_variant_name(name, raw, without)] = (
            profile.with_features(groups, include_raw=raw), detector)
        if (name, raw, without) == main_variant:
            bundled = (detector, res)
    assert bundled is not None
    detector, evaluation = bundled
    costs = detector_costs(model, x_eval[:16], fitted_variants)
    evaluation = {k: v for k, v in evaluation.items() if k != "scores"}
    profile = profile.with_features(include_raw=args.raw_features)

    def write_bundle() -> None:
        summary = {k: evaluation["attacks"][k].get("auroc") for k in evaluation["attacks"]}
        save_bundle(out / "bundle", name=bundle_name, model=model, spec=spec, profile=profile,
                    detector=detector, network_macs=macs,
                    metrics={"clean_accuracy": clean_acc, "auroc": summary,
                             "worst_auroc": evaluation["worst"]["auroc"]})

    write_bundle()
    if adaptive_specs:  # against the bundle as served; the compared variants are not attacked
        main_result = results[_variant_name(*main_variant)]
        attacks, scores = evaluate_adaptive(
            load_bundle(out / "bundle"), eval_sets, adaptive_specs, x_fit=x_fit, y_fit=y_fit,
            seed=args.seed + 1, metrics_seed=args.seed, square_queries=args.square_queries,
            fitted=fitted)
        main_result["attacks"].update(attacks)  # the same dict as evaluation["attacks"]
        main_result["scores"]["attacks"].update(scores)
        main_result["worst"] = evaluation["worst"] = worst_case(main_result["attacks"])
        main_result["worst_unseen_family"] = evaluation["worst_unseen_family"] = \
            worst_case_unseen_family(main_result["attacks"])
        write_bundle()  # the manifest's summary with the adaptive attacks

    metrics: dict[str, Any] = {
        "name": bundle_name,
        "config": {
            "dataset": args.dataset, "checkpoint": str(checkpoint), "arch": spec.arch,
            "detector": args.detector, "raw_features": args.raw_features,
            "target_fpr": args.target_fpr, "fpr_confidence": args.fpr_confidence,
            "fit_attacks": [s.label for s in fit_specs],
            "eval_attacks": [s.label for s in eval_specs], "seed": args.seed,
            "adaptive_positives": [s.label for s in positive_specs],
            "attacks_per_image": args.attacks_per_image, "square_queries": args.square_queries,
            "reused_attacks": reused, "noise_negatives": args.noise_negatives,
            "benign_negatives": args.benign_negatives, "negative_reach": args.negative_reach,
            "eval_suite": None if args.eval_attacks else args.eval_suite,
            "class_heads": args.class_heads, "stability": list(stability),
            "max_fit": args.max_fit, "max_eval": args.max_eval,
            "threshold_images": args.threshold_images,
            "max_profile": args.max_profile, "processes": 1 if rank is None else rank.world,
        },
        "clean_accuracy": clean_acc,
        "n_fit_images": len(y_fit), "n_eval_images": len(y_eval),
        "n_threshold_images": 0 if fit_sets.threshold is None else len(fit_sets.threshold.y_clean),
        "n_fit_positives": {label: len(a.y) for label, a in fitting.adversarial.items()},
        "threshold": detector.threshold_, "threshold_clean_fpr": detector.clean_fpr_,
        "evaluation": evaluation,
        "variants": {k: {"auroc": {a: m.get("auroc", float("nan")) for a, m in
                                   v["attacks"].items()}, "worst_auroc": v["worst"]["auroc"],
                         "worst_unseen_family_auroc": (v["worst_unseen_family"] or {}).get(
                             "auroc"),
                         "worst_tpr_at_threshold": v["worst"].get("tpr_at_threshold"),
                         **asdict(costs[k]), "score_ratio": costs[k].score_ratio}
                     for k, v in results.items()},
    }
    metrics["seconds"] = time.perf_counter() - start
    write_json(out / "metrics.json", metrics)
    plot_rocs(results[_variant_name(*main_variant)]["scores"]["clean"],
              results[_variant_name(*main_variant)]["scores"]["attacks"], out / "roc.png",
              f"{metrics['name']}: detector ROC on held-out images")
    (out / "report.md").write_text(markdown_report(metrics))
    if not reused:  # without the adaptive positives: crafted again each run, like adaptive attacks
        np.savez_compressed(out / ADVERSARIAL, **sets_to_arrays(fit_sets, "fit"),
                            **sets_to_arrays(eval_sets, "eval"))
    print(_summary(metrics, out))  # noqa: T201


def _check_threshold_images(args: argparse.Namespace, n_fit: int, n_further: int) -> None:
    """ValueError unless the clean images that will set the threshold (the detector's held-out
    share of the ``n_fit`` correctly classified fitting images, and the ``n_further``
    correctly classified --threshold-images) are enough to bound the FPR at
    --fpr-confidence."""
    needed = min_clean_scores(args.target_fpr, args.fpr_confidence)
    fraction = PathDetector().threshold_fraction
    held = math.ceil(n_fit * fraction) + n_further
    if held < needed:
        raise ValueError(f"--fpr-confidence {args.fpr_confidence:g} at --target-fpr "
                         f"{args.target_fpr:g} needs at least {needed} held-out clean images; "
                         f"{fraction:.0%} of the {n_fit} correctly classified fitting images "
                         f"and the {n_further} correctly classified --threshold-images give "
                         f"{held}: raise --threshold-images")


def _reuse(path: Path, model: torch.nn.Module, fit_specs: list[AttackSpec],
           eval_specs: list[AttackSpec], x_fit: torch.Tensor, x_eval: torch.Tensor
           ) -> tuple[Sets, Sets]:
    """The sets of an earlier run, refused if they hold other attacks than asked for, or other
    clean images than this run's x_fit, x_eval (N, C, H, W) in [0, 1] (another checkpoint,
    --seed, --max-fit or --max-eval: the threshold or evaluation images could then overlap
    the fitted ones)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    fit_sets = sets_from_arrays(arrays, "fit", model)
    eval_sets = sets_from_arrays(arrays, "eval", model)
    for side, sets, specs in (("fit", fit_sets, fit_specs), ("eval", eval_sets, eval_specs)):
        if set(sets.adversarial) != {s.label for s in specs}:
            raise ValueError(f"--reuse-attacks: {path} holds {side} attacks "
                             f"{sorted(sets.adversarial)}, not {[s.label for s in specs]}")
    for side, sets, x in (("fitting", fit_sets, x_fit), ("evaluation", eval_sets, x_eval)):
        if not torch.equal(sets.x_clean, x):
            raise ValueError(f"--reuse-attacks: the {side} images of {path} are not this run's "
                             "(another checkpoint, --seed, --max-fit or --max-eval?); run "
                             "without --reuse-attacks to craft the sets again")
    log.info("reusing the adversarial sets of %s", path)
    return fit_sets, eval_sets


def _parse_variant(text: str) -> tuple[str, bool, tuple[str, ...]]:
    """``model[+raw][-group...]`` -> (inner model, raw features, feature groups left out)."""
    head, *without = text.split("-")
    name, plus, rest = head.partition("+")
    if (name not in INNER_MODELS or (plus and rest != "raw")
            or not set(without) <= set(FEATURE_GROUPS)):
        raise ValueError(f"bad --compare variant {text!r}: use one of {', '.join(INNER_MODELS)} "
                         "with optional '+raw' and '-GROUP' for groups "
                         f"{', '.join(FEATURE_GROUPS)}")
    return name, bool(plus), tuple(without)


def _variant_name(name: str, raw: bool, without: tuple[str, ...] = ()) -> str:
    return name + ("+raw" if raw else "") + "".join(f"-{g}" for g in without)


def _summary(metrics: dict[str, Any], out: Path) -> str:
    ev = metrics["evaluation"]
    rows = [f"{label:<22} AUROC {m['auroc']:.3f}  TPR@5%FPR {m['tpr_at_5']:.3f}  "
            f"n={m['n_adv']}" if m.get("n_adv") else f"{label:<22} (no successful attack)"
            for label, m in ev["attacks"].items()]
    return "\n".join([
        f"{metrics['name']}: clean accuracy {metrics['clean_accuracy']:.4f}, threshold "
        f"{metrics['threshold']:.3f} (clean eval FPR {ev['clean_fpr']:.3f})", *rows,
        f"worst AUROC {ev['worst']['auroc']:.3f} ({ev['worst']['auroc_attack']})",
        f"bundle: {out / 'bundle'}   report: {out / 'report.md'}   "
        f"({metrics['seconds']:.0f}s)"])


def cli(argv: list[str] | None = None) -> None:
    run_command(build_parser(), main, argv)


if __name__ == "__main__":
    cli()
