"""Baseline adversarial-example detectors measured against the computation-path detector.

Everything is measured on one ``python -m training.fit_detector`` run: the same decoupled
classifier, the same adversarial sets (``<run>/adversarial.npz``), the same split into fitting
and evaluation images, the same seed and target false-positive rate. Each method is fitted on
the fitting side (clean images vs all fitting attacks) and evaluated on the evaluation side per
attack with :func:`training.evaluation.detection_metrics`; thresholds are set at the run's target
FPR on clean fitting images held out from fitting (grouped by image, as
:class:`detector.estimator.PathDetector` does).

Methods:

- ``ours``: :class:`~detector.estimator.PathDetector` (the run's inner model and features) on
  :class:`~detector.features.PathProfile` path statistics, through
  :func:`training.experiment.evaluate_variant`, so its numbers reproduce the run's.
- ``pooled``: the same kind of detector on the concatenated global-average-pooled outputs of every
  gated layer with all gates forced open (``compute_path(..., force_open=True)``), i.e. the dense
  network's own activations: what computation paths add over plain activations.
- ``mahalanobis``: Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
  Samples and Adversarial Attacks" (NeurIPS 2018): per-layer Mahalanobis scores under
  class-conditional Gaussians with a shared covariance (pytorch-ood), input pre-processing step
  chosen among the reference code's magnitudes by grouped cross-validation on the fitting side,
  logistic regression on the scores (see ``benchmarks/mahalanobis.py``).
- ``lid``: Ma et al., "Characterizing Adversarial Subspaces Using Local Intrinsic
  Dimensionality" (ICLR 2018): per-layer LID estimates (k = 20 neighbours in minibatches of 100
  clean reference activations), logistic regression (see ``benchmarks/lid.py``).

As in both papers, the two baselines from the literature are fitted with noisy negatives: each
fitting adversarial example's clean source image plus Gaussian noise of the same L2 norm,
labelled clean. Baselines read the network with every gate open (``--gates open``, default) or
with its gates as trained (``--gates model``).

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python benchmarks/baselines.py`` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.activations import (  # noqa: E402
    LOGITS,
    PENULTIMATE,
    collect,
    encoder,
    select_layers,
)
from benchmarks.lid import LIDFeatures, noisy_like  # noqa: E402
from benchmarks.mahalanobis import LEE_EPSILONS, LayerMahalanobis  # noqa: E402
from detector.checkpoint import ModelSpec, load_checkpoint  # noqa: E402
from detector.estimator import PathDetector, make_inner  # noqa: E402
from detector.features import PathProfile  # noqa: E402
from detector.paths import compute_path  # noqa: E402
from detector.threshold import threshold_at_fpr  # noqa: E402
from training.data import load_dataset, to_float  # noqa: E402
from training.evaluation import detection_metrics  # noqa: E402
from training.experiment import (  # noqa: E402
    Sets,
    correct_subset,
    evaluate_variant,
    extract_paths,
    sets_from_arrays,
)

log = logging.getLogger("benchmarks.baselines")

METHODS = ("ours", "pooled", "mahalanobis", "lid")
TITLES = {
    "ours": "computation paths (ours)",
    "pooled": "pooled activations, gates open",
    "mahalanobis": "Mahalanobis (Lee et al. 2018)",
    "lid": "LID (Ma et al. 2018)",
}
THRESHOLD_FRACTION = 0.25  # share of clean fitting images held out for the threshold


@dataclass
class Run:
    """One fit_detector output directory, loaded.

    config: the run's ``metrics.json`` config; metrics: the whole file; fit / evaluation: clean
    images (correctly classified) and successful adversarial sets with their paths; fitted:
    labels of the fitting attacks.
    """

    directory: Path
    config: dict[str, Any]
    metrics: dict[str, Any]
    model: nn.Module
    spec: ModelSpec
    fit: Sets
    evaluation: Sets
    fitted: set[str]

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def target_fpr(self) -> float:
        return float(self.config["target_fpr"])


def source_images(x_adv: torch.Tensor, y_adv: torch.Tensor, x_clean: torch.Tensor,
                  y_clean: torch.Tensor) -> np.ndarray:
    """(M,) index of the clean image each adversarial example was made from.

    x_adv: (M, C, H, W), x_clean: (N, C, H, W) in [0, 1]; the source is the L2-nearest clean
    image of the same true class (attacks keep it within a small distance).
    """
    if len(x_adv) == 0:
        return np.zeros(0, dtype=np.int64)
    dist = torch.cdist(x_adv.flatten(1).double(), x_clean.flatten(1).double())  # (M, N)
    dist[y_adv[:, None] != y_clean[None, :]] = torch.inf
    return dist.argmin(dim=1).numpy()


def _load_sets(arrays: Any, prefix: str, model: nn.Module) -> Sets:
    """Sets of one side of ``adversarial.npz`` (:func:`training.experiment.sets_from_arrays`);
    fitting-side source images missing from older files are recovered with
    :func:`source_images`."""
    sets = sets_from_arrays(arrays, prefix, model)
    if prefix == "fit":
        for label, adv in sets.adversarial.items():
            if len(adv.image) and (adv.image < 0).all():
                adv.image = source_images(adv.x, adv.y, sets.x_clean, sets.y_clean)
                log.info("%s (fitting): source images recovered as the nearest clean image of "
                         "the same class", label)
    return sets


def load_run(directory: Path) -> Run:
    """Read ``metrics.json``, the checkpoint it names and ``adversarial.npz`` of a run."""
    for name in ("metrics.json", "adversarial.npz"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; --run must be an output "
                                    "directory of python -m training.fit_detector")
    metrics = json.loads((directory / "metrics.json").read_text())
    config = metrics["config"]
    model, spec = load_checkpoint(Path(_resolve(config["checkpoint"])))
    model.requires_grad_(False)  # gradients are only ever taken with respect to inputs
    with np.load(directory / "adversarial.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    fit, evaluation = _load_sets(arrays, "fit", model), _load_sets(arrays, "eval", model)
    return Run(directory, config, metrics, model, spec, fit, evaluation,
               set(config["fit_attacks"]))


def _resolve(path: str) -> str:
    """A relative path from the run's config: as given if it exists from here, else relative to
    the repository root if it exists there, else unchanged (e.g. a dataset name)."""
    if Path(path).exists() or Path(path).is_absolute() or not (ROOT / path).exists():
        return path
    return str(ROOT / path)


def profile_images(run: Run, data_dir: Path, max_profile: int) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Clean, correctly classified training images as fit_detector draws them for its profile:
    x (N, C, H, W) in [0, 1], y (N,)."""
    data = load_dataset(_resolve(run.config["dataset"]), data_dir)
    ids = torch.randperm(len(data.y_train),
                         generator=torch.Generator().manual_seed(run.seed))[:max_profile]
    return correct_subset(run.model, to_float(data.x_train[ids]), data.y_train[ids])


# --------------------------------------------------------------------------- fitting side

@dataclass
class FitSide:
    """The fitting samples of the score-based baselines.

    x: (N, C, H, W) clean, noisy and adversarial images; y: (N,) 1 = adversarial; groups: (N,)
    source image ids; noisy: (N,) True for noisy negatives.
    """

    x: torch.Tensor
    y: np.ndarray
    groups: np.ndarray
    noisy: np.ndarray


def fit_side(run: Run, with_noisy: bool) -> FitSide:
    """Clean fitting images, (optionally) their noisy versions, then every fitting attack."""
    fit = run.fit
    n = len(fit.y_clean)
    advs = [s for s in fit.adversarial.values() if len(s.y)]
    x_adv = torch.cat([s.x for s in advs])
    src = np.concatenate([s.image for s in advs])
    xs, ys, gs, ns = [fit.x_clean], [np.zeros(n)], [np.arange(n)], [np.zeros(n, bool)]
    if with_noisy:
        xs.append(noisy_like(fit.x_clean[src], x_adv, run.seed))
        ys.append(np.zeros(len(src)))
        gs.append(src)
        ns.append(np.ones(len(src), bool))
    xs.append(x_adv)
    ys.append(np.ones(len(src)))
    gs.append(src)
    ns.append(np.zeros(len(src), bool))
    return FitSide(torch.cat(xs), np.concatenate(ys), np.concatenate(gs), np.concatenate(ns))


def held_out_split(side: FitSide, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit mask (N,), held-out clean indices): the grouped split of PathDetector.

    A share :data:`THRESHOLD_FRACTION` of the clean (not noisy) images' groups is held out;
    every sample of a held-out group (its noisy and adversarial versions too) is left out of
    fitting, and the held-out clean images alone set the threshold.
    """
    from sklearn.model_selection import GroupShuffleSplit

    clean = np.flatnonzero((side.y == 0) & ~side.noisy)
    split = GroupShuffleSplit(1, test_size=THRESHOLD_FRACTION, random_state=seed)
    _, hold = next(split.split(clean, groups=side.groups[clean]))
    fit_mask = ~np.isin(side.groups, np.unique(side.groups[clean[hold]]))
    return fit_mask, clean[hold]


def fit_logistic(X: np.ndarray, side: FitSide, target_fpr: float, seed: int
                 ) -> tuple[Callable[[np.ndarray], np.ndarray], float, float]:
    """Scaler + logistic regression on features X: (N, F) of ``side``.

    Returns (scores: (M, F) -> (M,) adversarial probability in [0, 1], threshold at
    ``target_fpr`` on the held-out clean images, the FPR realised there).
    """
    fit_mask, hold = held_out_split(side, seed)
    model = make_inner("logistic", seed).fit(X[fit_mask], side.y[fit_mask].astype(int))

    def scores(features: np.ndarray) -> np.ndarray:
        return model.predict_proba(features)[:, 1]

    return scores, *threshold_at_fpr(scores(X[hold]), target_fpr)


def grouped_cv_auroc(X: np.ndarray, side: FitSide, folds: int = 3) -> float:
    """Mean AUROC of scaler + logistic regression over grouped folds of the fitting side."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    aucs = []
    for train, test in GroupKFold(n_splits=folds).split(X, side.y, side.groups):
        model = make_inner("logistic", 0).fit(X[train], side.y[train].astype(int))
        aucs.append(roc_auc_score(side.y[test], model.predict_proba(X[test])[:, 1]))
    return float(np.mean(aucs))


# --------------------------------------------------------------------------- evaluation

def summarise(run: Run, clean: np.ndarray, advs: dict[str, np.ndarray], threshold: float
              ) -> dict[str, Any]:
    """Per-attack detection metrics from evaluation-side scores (higher = adversarial)."""
    attacks = {}
    for label, a in advs.items():
        attempts = run.evaluation.adversarial[label].attempts
        attacks[label] = {"fitted": label in run.fitted, "success": len(a) / max(attempts, 1),
                          **detection_metrics(clean, a, threshold, run.seed)}
    return {"clean_fpr": float((clean > threshold).mean()), "threshold": threshold,
            "attacks": attacks, "worst": worst_case(attacks)}


def worst_case(attacks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Smallest AUROC and TPR@5%FPR over the attacks with at least one adversarial example."""
    measured = {k: v for k, v in attacks.items() if v.get("n_adv", 0) > 0}
    auc = min(measured, key=lambda k: measured[k]["auroc"])
    tpr = min(measured, key=lambda k: measured[k]["tpr_at_5"])
    return {"auroc": measured[auc]["auroc"], "auroc_attack": auc,
            "tpr_at_5": measured[tpr]["tpr_at_5"], "tpr_at_5_attack": tpr}


def evaluate_scores(run: Run, score_images: Callable[[torch.Tensor], np.ndarray],
                    threshold: float) -> dict[str, Any]:
    """Score every evaluation set with ``score_images``: x (N, C, H, W) -> (N,) and summarise."""
    ev = run.evaluation
    clean = score_images(ev.x_clean)
    advs = {label: score_images(s.x) if len(s.y) else np.empty(0)
            for label, s in ev.adversarial.items()}
    return summarise(run, clean, advs, threshold)


# --------------------------------------------------------------------------- methods

def method_ours(run: Run, x_prof: torch.Tensor, y_prof: torch.Tensor) -> dict[str, Any]:
    """The run's own detector, refitted exactly as fit_detector fits it."""
    profile = PathProfile.fit(extract_paths(run.model, x_prof), y_prof.numpy(),
                              run.spec.num_classes)
    detector = PathDetector(model=run.config["detector"], target_fpr=run.target_fpr,
                            random_state=run.seed)
    res = evaluate_variant(detector, profile, bool(run.config["raw_features"]), run.fit,
                           run.evaluation, {}, run.evaluation.y_clean.numpy(), run.fitted,
                           seed=run.seed)
    out = {k: v for k, v in res.items() if k not in ("scores", "benign")}
    out["threshold"] = detector.threshold_
    out["details"] = {"detector": run.config["detector"],
                      "raw_features": bool(run.config["raw_features"]),
                      "profile_images": len(y_prof)}
    name = run.config["detector"] + ("+raw" if run.config["raw_features"] else "")
    reference = run.metrics.get("variants", {}).get(name, {}).get("auroc")
    if reference:
        diff = max(abs(out["attacks"][k].get("auroc", np.nan) - v) for k, v in reference.items()
                   if out["attacks"][k].get("n_adv", 0))
        out["details"]["max_auroc_difference_to_run"] = diff
        (log.info if diff < 1e-9 else log.warning)(
            "ours vs the run's %s variant: largest AUROC difference %.2g", name, diff)
    return out


def pooled_features(model: nn.Module, x: torch.Tensor, force_open: bool,
                    batch_size: int = 256) -> np.ndarray:
    """(N, sum C) concatenated LayerPath.pooled of every gated layer for x: (N, C, H, W)."""
    model.eval()
    with torch.inference_mode():
        parts = [torch.cat([p.pooled for p in compute_path(
            model, x[i:i + batch_size], force_open=force_open).layers.values()], dim=1)
            for i in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy()


def method_pooled(run: Run, force_open: bool) -> dict[str, Any]:
    """PathDetector (the run's inner model) on pooled gated-layer activations."""
    fit = run.fit
    advs = [s for s in fit.adversarial.values() if len(s.y)]
    X = np.concatenate([pooled_features(run.model, x, force_open)
                        for x in (fit.x_clean, *(s.x for s in advs))])
    y = np.r_[np.zeros(len(fit.y_clean)), *(np.ones(len(s.y)) for s in advs)]
    groups = np.r_[np.arange(len(fit.y_clean)), *(s.image for s in advs)]
    detector = PathDetector(model=run.config["detector"], target_fpr=run.target_fpr,
                            random_state=run.seed).fit(X, y, groups=groups)
    out = evaluate_scores(run, lambda x: detector.predict_proba(
        pooled_features(run.model, x, force_open))[:, 1], detector.threshold_)
    out["details"] = {"detector": run.config["detector"], "features": X.shape[1]}
    return out


def method_mahalanobis(run: Run, x_prof: torch.Tensor, y_prof: torch.Tensor,
                       layers: list[str], epsilons: list[float], force_open: bool,
                       max_select: int) -> dict[str, Any]:
    """Lee et al.: per-layer Mahalanobis scores, pre-processing step chosen by grouped 3-fold
    cross-validated AUROC on the fitting samples of at most ``max_select`` source images,
    logistic regression on the scores (fitted on the whole fitting side)."""
    names = [*layers, PENULTIMATE]
    encode = encoder(run.model, names, pooled=True, force_open=force_open)
    run.model.eval()
    train_features = collect(encode, x_prof)
    side = fit_side(run, with_noisy=True)
    detectors = {eps: LayerMahalanobis(encode, names, eps=eps).fit(train_features, y_prof)
                 for eps in epsilons}
    # Choose the step on a grouped subsample: every pre-processed score costs one forward and
    # one backward pass per layer.
    groups = np.unique(side.groups)
    chosen = np.random.default_rng(run.seed).permutation(groups)[:max_select]
    sub = np.isin(side.groups, chosen)
    sub_side = FitSide(side.x[torch.from_numpy(sub)], side.y[sub], side.groups[sub],
                       side.noisy[sub])
    cv: dict[float, float] = {}
    sub_scores: dict[float, np.ndarray] = {}
    if len(epsilons) > 1:
        for eps, maha in detectors.items():
            sub_scores[eps] = maha.score(sub_side.x)
            cv[eps] = grouped_cv_auroc(sub_scores[eps], sub_side)
            log.info("mahalanobis eps=%g: CV AUROC %.4f on %d fitting samples", eps, cv[eps],
                     len(sub_side.y))
    eps = max(cv, key=lambda e: cv[e]) if cv else epsilons[0]  # first of equals: smallest
    maha = detectors[eps]
    X = sub_scores[eps] if sub.all() and eps in sub_scores else maha.score(side.x)
    scores, threshold, _ = fit_logistic(X, side, run.target_fpr, run.seed)
    out = evaluate_scores(run, lambda x: scores(maha.score(x)), threshold)
    out["details"] = {"layers": names, "eps": eps, "cv_auroc": {str(k): v for k, v in cv.items()},
                      "cv_samples": len(sub_side.y), "gaussian_images": len(y_prof),
                      "noisy_negatives": int(side.noisy.sum())}
    return out


def method_lid(run: Run, layers: list[str], k: int, batch: int, max_reference: int,
               force_open: bool, chunk: int = 256) -> dict[str, Any]:
    """Ma et al.: per-layer LID against clean fitting minibatches, logistic regression."""
    names = [*layers, PENULTIMATE, LOGITS]
    encode = encoder(run.model, names, pooled=False, force_open=force_open)
    run.model.eval()
    fit = run.fit
    ref_ids = np.random.default_rng(run.seed).permutation(len(fit.y_clean))[:max_reference]
    lid = LIDFeatures(k=k, batch_size=batch, seed=run.seed).fit(
        collect(encode, fit.x_clean[ref_ids]), ref_ids)

    def features(x: torch.Tensor, groups: np.ndarray | None) -> np.ndarray:
        parts = []
        for i in range(0, len(x), chunk):
            with torch.no_grad():
                acts = encode(x[i:i + chunk])
            parts.append(lid.transform(acts, None if groups is None else groups[i:i + chunk]))
        return np.concatenate(parts)

    side = fit_side(run, with_noisy=True)
    X = features(side.x, side.groups)
    scores, threshold, _ = fit_logistic(X, side, run.target_fpr, run.seed)
    out = evaluate_scores(run, lambda x: scores(features(x, None)), threshold)
    out["details"] = {"layers": names, "k": k, "batch": batch,
                      "reference_images": len(lid.batches_) * len(lid.batches_[0]),
                      "noisy_negatives": int(side.noisy.sum())}
    return out


# --------------------------------------------------------------------------- report

def _cell(m: dict[str, Any], key: str) -> str:
    return f"{m[key]:.3f}" if m.get("n_adv", 0) else "-"


def markdown(run: Run, results: dict[str, dict[str, Any]], force_open: bool) -> str:
    """The report: AUROC and TPR@5%FPR tables (methods x attacks, worst case last)."""
    ev, fit = run.evaluation, run.fit
    labels = list(ev.adversarial)
    n_fit_adv = sum(len(s.y) for s in fit.adversarial.values())
    head = "| method | " + " | ".join(
        label + ("" if label in run.fitted else " †") for label in labels) + " | worst |"
    rule = "|---" * (len(labels) + 2) + "|"
    n_row = "| *n_adv* | " + " | ".join(str(len(s.y)) for s in ev.adversarial.values()) + " | |"
    cfg = run.config
    lines = [
        f"# Baselines: {run.metrics.get('name', run.directory.name)}",
        "",
        f"Run `{run.directory}`: decoupled `{cfg.get('arch', run.spec.arch)}` from "
        f"`{cfg['checkpoint']}`, data `{cfg['dataset']}`, seed {run.seed}. All methods use the "
        f"run's adversarial sets. Fitting side: {len(fit.y_clean)} clean images and "
        f"{n_fit_adv} adversarial ones ({', '.join(cfg['fit_attacks'])}; one attack per image). "
        f"Evaluation side: {len(ev.y_clean)} clean images, none shared with the fitting side, "
        "and the successful attacks on them (*n_adv*); † = attack not fitted. Thresholds at "
        f"{run.target_fpr:.0%} FPR on held-out clean fitting images. Baselines read the "
        f"network with {'every gate forced open' if force_open else 'its gates as trained'}.",
        "",
        "Methods: " + "; ".join(f"**{m}** = {_title(m, force_open)}" for m in results) + ".",
        "",
    ]
    for title, key in (("AUROC", "auroc"), ("TPR at 5% FPR", "tpr_at_5")):
        lines += [f"## {title}", "", head, rule, n_row]
        for method, r in results.items():
            cells = [_cell(r["attacks"][label], key) for label in labels]
            lines.append(f"| {method} | " + " | ".join(cells)
                         + f" | **{r['worst'][key]:.3f}** |")
        lines.append("")
    lines += ["## Worst cases and settings", "",
              "Clean FPR and TPR at each method's threshold on the evaluation side; worst = "
              "smallest over the attacks.", "",
              "| method | clean FPR at threshold | worst TPR at threshold | worst TPR@1%FPR | "
              "seconds | settings |", "|---|---|---|---|---|---|"]
    for method, r in results.items():
        measured = [m for m in r["attacks"].values() if m.get("n_adv", 0)]
        lines.append(f"| {method} | {r['clean_fpr']:.3f} | "
                     f"{min(m['tpr_at_threshold'] for m in measured):.3f} | "
                     f"{min(m['tpr_at_1'] for m in measured):.3f} | {r['seconds']:.1f} | "
                     f"{_details(r.get('details', {}))} |")
    lines.append("")
    return "\n".join(lines)


def _title(method: str, force_open: bool) -> str:
    title = TITLES[method]
    return title if force_open else title.replace("gates open", "trained gates")


def _details(details: dict[str, Any]) -> str:
    keep = ("detector", "features", "eps", "layers", "k", "batch", "reference_images")
    parts = []
    for key in keep:
        if key in details:
            value = details[key]
            parts.append(f"{key}={','.join(value) if isinstance(value, list) else value}")
    return " ".join(parts)


# --------------------------------------------------------------------------- command line

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
                        "Gaussians (default: the run's own --max-profile)")
    p.add_argument("--gates", choices=("open", "model"), default="open",
                   help="baselines read the network with every gate forced open (the dense "
                        "network) or with its trained gates (default: %(default)s)")
    p.add_argument("--max-layers", type=int, default=6,
                   help="Mahalanobis/LID read every gated layer if there are at most this many, "
                        "else the last one at each spatial resolution (default: %(default)s)")
    p.add_argument("--mahalanobis-eps", type=float, nargs="+", default=list(LEE_EPSILONS),
                   help="input pre-processing steps (pixel units) to choose from by "
                        "cross-validation on the fitting side (default: %(default)s)")
    p.add_argument("--mahalanobis-select", type=int, default=300,
                   help="fitting images (with their noisy and adversarial versions) on which "
                        "the step is chosen, at most (default: %(default)s)")
    p.add_argument("--lid-k", type=int, default=20, help="LID neighbours (default: %(default)s)")
    p.add_argument("--lid-batch", type=int, default=100,
                   help="LID reference minibatch size (default: %(default)s)")
    p.add_argument("--lid-reference", type=int, default=1000,
                   help="clean fitting images used as LID references at most (default: "
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
    needs_profile = {"ours", "mahalanobis"} & set(args.methods)
    max_profile = args.max_profile or int(run.config.get("max_profile", 10000))
    x_prof, y_prof = (profile_images(run, args.data_dir, max_profile) if needs_profile
                      else (torch.empty(0), torch.empty(0)))
    layers = select_layers(run.model, run.spec.input_shape, args.max_layers)
    results: dict[str, dict[str, Any]] = {}
    for method in (m for m in METHODS if m in args.methods):
        t0 = time.perf_counter()
        if method == "ours":
            res = method_ours(run, x_prof, y_prof)
        elif method == "pooled":
            res = method_pooled(run, force_open)
        elif method == "mahalanobis":
            res = method_mahalanobis(run, x_prof, y_prof, layers, args.mahalanobis_eps,
                                     force_open, args.mahalanobis_select)
        else:
            res = method_lid(run, layers, args.lid_k, args.lid_batch, args.lid_reference,
                             force_open)
        res["seconds"] = time.perf_counter() - t0
        log.info("%s: worst AUROC %.3f (%s), %.1fs", method, res["worst"]["auroc"],
                 res["worst"]["auroc_attack"], res["seconds"])
        results[method] = res
    report = markdown(run, results, force_open)
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
