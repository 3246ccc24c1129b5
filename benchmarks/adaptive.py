"""Adaptive attacks on the path detector: the attacker knows the model, the gates and the
detector, and wants an input that is misclassified *and* not flagged.

Attacks, all L-inf with budget eps, on correctly classified test images that the bundle's
detector was not fitted on (the evaluation half of the test split as
``python -m training.fit_detector --seed <split-seed>`` splits it):

- ``pgd`` (non-adaptive): torchattacks PGD (cross-entropy, random start) with the same eps, steps
  and step size as the adaptive attack; the detector is ignored and its last iterate is judged.
- ``adaptive``: PGD on ``relu(CW margin + kappa) + lambda * clamp(surrogate, -det_margin)``:
  straight-through (BPDA) gradients through the hard gates
  (:func:`detector.straight_through.straight_through_gates`), the shipped path statistics
  (:class:`detector.features.PathProfile`, torch, straight-through bits) against the class the
  input is pushed into (the best wrong class), and a differentiable surrogate of the
  detector's verdict (:class:`benchmarks.surrogate.Surrogate`; default an MLP distilled from
  the real detector's flags). Every lambda in ``--lambdas`` is tried in order on the inputs
  not yet broken; every iterate is judged by the real pipeline and the first one that is
  misclassified and not flagged is kept. lambda 0 is PGD on the margin alone with the real
  detector as a stopping oracle (what selection alone buys).
- ``square`` (black-box, plain): torchattacks Square (:mod:`training.attacks`), margin loss;
  ``square-aware``: Square on a detector-aware margin computed from the real pipeline's scores
  (the score is part of every API response): the class margin while not flagged, else
  ``max(margin, 0) + logit(score) - logit(threshold)``; it stops on an input as soon as it is
  misclassified and not flagged.

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

Usage::

    python benchmarks/adaptive.py --bundle models/mnist/bundle \\
        --dataset ../shared/data/mnist.npz --n 300 --eps 0.05 0.1 0.2 0.3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchattacks

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python benchmarks/adaptive.py`` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.surrogate import (  # noqa: E402
    SURROGATES,
    Surrogate,
    SurrogateFit,
    fit_surrogate,
)
from detector.analysis import score_paths  # noqa: E402
from detector.bundle import Bundle, load_bundle  # noqa: E402
from detector.features import PathBatch  # noqa: E402
from detector.paths import compute_path  # noqa: E402
from detector.straight_through import STE_KINDS, straight_through_gates  # noqa: E402
from evaluation.attacks import AttackSpec, craft  # noqa: E402
from evaluation.protocol import split_by_image  # noqa: E402
from training.data import ImageData, load_dataset, to_float  # noqa: E402

log = logging.getLogger("benchmarks.adaptive")

ATTACKS = ("pgd", "adaptive", "square", "square-aware")
TITLES = {"pgd": "PGD (non-adaptive)", "adaptive": "adaptive PGD (BPDA + surrogate)",
          "square": "Square (black-box)", "square-aware": "Square, detector-aware (black-box)"}


@dataclass(frozen=True)
class PGDConfig:
    """One PGD run: L-inf budget ``eps`` and step ``alpha`` (pixel units, images in [0, 1]),
    ``steps`` sign-gradient steps, CW margin target ``kappa`` (logits), surrogate floor
    ``det_margin`` (the detector term stops pushing below ``-det_margin``), straight-through
    kind ``ste``, whether to start from a uniformly random point of the ball, and whether to
    keep every iterate on the 1/255 grid (:func:`quantize_towards`; what a PNG can carry)."""

    eps: float
    alpha: float
    steps: int
    kappa: float = 3.0
    det_margin: float = 3.0
    ste: str = "semhash"
    random_start: bool = False
    grid: bool = False


@dataclass
class Collected:
    """Fitting points for the surrogate: features (N, F) against the real predicted class,
    the real detector's flags (N,) and which points are unmodified clean images (N,)."""

    features: list[torch.Tensor]
    flagged: list[torch.Tensor]
    clean: list[torch.Tensor]

    @classmethod
    def empty(cls) -> Collected:
        return cls([], [], [])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.cat(self.features), torch.cat(self.flagged), torch.cat(self.clean)


def attack_loss(logits: torch.Tensor, y: torch.Tensor, kappa: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Untargeted CW margin loss. logits (B, K), y (B,) true classes ->
    (B,) ``relu(logit_y - max_{j != y} logit_j + kappa)`` and (B,) the best wrong class."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(),
                               -math.inf)
    best, cls = other.max(1)
    return torch.relu(true - best + kappa), cls


def _pgd_run(bundle: Bundle, surrogate: Surrogate | None,
             x0: torch.Tensor, y: torch.Tensor, lam: float, cfg: PGDConfig, *,
             stop_on_success: bool, collect: Collected | None = None, seed: int = 0
             ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """One adaptive PGD run with one lambda on x0 (B, C, H, W) in [0, 1], labels y (B,).

    Every iterate (the start included) is judged by the real pipeline. Returns the first
    iterate that is misclassified and not flagged (else the last iterate) (B, C, H, W), success
    (B,) bool and the step of success (B,) (-1 if none). With ``stop_on_success`` broken inputs
    leave the run; ``collect`` receives every iterate's real features and flags.
    """
    n = len(y)
    out = x0.clone()
    success = np.zeros(n, dtype=bool)
    step = np.full(n, -1)
    idx = np.arange(n)
    xa = x0.clone()
    if cfg.random_start:
        g = torch.Generator().manual_seed(seed)
        noise = (torch.rand(x0.shape, generator=g) * 2 - 1) * cfg.eps
        xa = (x0 + noise).clamp(0.0, 1.0)
        if cfg.grid:
            xa = quantize_towards(x0, xa)
    for t in range(cfg.steps + 1):
        xa = xa.detach().requires_grad_(True)
        with straight_through_gates(cfg.ste):
            result = compute_path(bundle.model, xa)
        paths = PathBatch.from_result(result, ste=cfg.ste)
        scored = score_paths(bundle.profile, bundle.detector, paths)  # the real verdict
        ok = (scored.predictions != y[idx]).numpy() & ~scored.flagged.numpy()
        if collect is not None:
            collect.features.append(scored.features.detach())
            collect.flagged.append(scored.flagged)
            collect.clean.append(torch.full((len(idx),), t == 0 and not cfg.random_start))
        new = ok & ~success[idx]
        out[idx[new]] = xa.detach()[torch.from_numpy(new)]
        success[idx[new]] = True
        step[idx[new]] = t
        keep = ~ok if stop_on_success else np.ones(len(idx), dtype=bool)
        if t == cfg.steps or not keep.any():
            break
        cls_loss, wrong = attack_loss(result.logits, y[idx], cfg.kappa)
        loss = cls_loss
        if lam > 0 and surrogate is not None:
            stats = bundle.profile.layer_stats(paths, wrong.detach())
            score = surrogate(bundle.profile.transform(paths, stats))
            loss = loss + lam * score.clamp_min(-cfg.det_margin)
        keep_t = torch.from_numpy(keep)
        (grad,) = torch.autograd.grad(loss[keep_t].sum(), xa)
        idx = idx[keep]
        x0k = x0[torch.from_numpy(idx)]
        xa = xa.detach()[keep_t] - cfg.alpha * grad[keep_t].sign()
        xa = torch.min(torch.max(xa, x0k - cfg.eps), x0k + cfg.eps).clamp(0.0, 1.0)
        if cfg.grid:
            xa = quantize_towards(x0k, xa)
    rest = ~success[idx]
    out[idx[rest]] = xa.detach()[torch.from_numpy(rest)]
    return out, success, step


@dataclass
class AdaptiveResult:
    """x_adv (N, C, H, W): per input the first successful iterate, else the last iterate of the
    last lambda tried; success (N,) bool as judged in the loop; lam_index (N,) index of the
    lambda that succeeded (-1: none); step (N,) its step."""

    x_adv: torch.Tensor
    success: np.ndarray
    lam_index: np.ndarray
    step: np.ndarray


def adaptive_pgd(bundle: Bundle, surrogate: Surrogate | None,
                 x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig, lambdas: Sequence[float],
                 batch_size: int = 300, seed: int = 0) -> AdaptiveResult:
    """The adaptive attack on x (N, C, H, W) in [0, 1] with true labels y (N,): each lambda in
    turn on the inputs no earlier lambda broke (see the module doc)."""
    n = len(y)
    res = AdaptiveResult(x.clone(), np.zeros(n, dtype=bool), np.full(n, -1), np.full(n, -1))
    for li, lam in enumerate(lambdas):
        todo = np.flatnonzero(~res.success)
        for start in range(0, len(todo), batch_size):
            b = todo[start:start + batch_size]
            bt = torch.from_numpy(b)
            xb, ok, step = _pgd_run(bundle, surrogate, x[bt], y[bt], lam, cfg,
                                    stop_on_success=True, seed=seed + li)
            res.x_adv[bt] = xb
            res.success[b[ok]] = True
            res.lam_index[b[ok]] = li
            res.step[b[ok]] = step[ok]
    return res


def fit_attack_surrogate(bundle: Bundle, x: torch.Tensor,
                         y: torch.Tensor, configs: Sequence[PGDConfig], lambdas: Sequence[float],
                         *, kind: str, rounds: int, seed: int, batch_size: int = 300
                         ) -> tuple[Surrogate, list[dict[str, Any]]]:
    """Fit the surrogate on images x (N, C, H, W), labels y (N,) of the fitting side.

    Round 0: clean images and every iterate of margin-only PGD (lambda 0) at each config;
    each further round adds every iterate of the adaptive attack with the current surrogate at
    each positive lambda and config. Returns the surrogate and per-round diagnostics.
    """
    data = Collected.empty()
    history: list[dict[str, Any]] = []
    surrogate: Surrogate | None = None
    for r in range(rounds + 1):
        t0 = time.perf_counter()
        lams = [0.0] if r == 0 else [lam for lam in lambdas if lam > 0]
        for cfg in configs:
            for lam in lams:
                for start in range(0, len(y), batch_size):
                    sl = slice(start, start + batch_size)
                    _pgd_run(bundle, surrogate, x[sl], y[sl], lam, cfg,
                             stop_on_success=False, collect=data, seed=seed + r)
        X, flagged, clean = data.tensors()
        fit = fit_surrogate(X, flagged, clean, kind=kind, seed=seed)
        surrogate = fit.surrogate
        history.append(_fit_summary(r, fit, time.perf_counter() - t0))
        log.info("surrogate round %d: %d points (%d flagged), held-out agreement %.3f "
                 "(balanced %.3f), %.0fs", r, fit.n_points, fit.n_flagged,
                 fit.holdout_accuracy, fit.holdout_balanced, history[-1]["seconds"])
    assert surrogate is not None
    return surrogate, history


def _fit_summary(r: int, fit: SurrogateFit, seconds: float) -> dict[str, Any]:
    return {"round": r, "points": fit.n_points, "flagged": fit.n_flagged,
            "holdout_accuracy": fit.holdout_accuracy,
            "holdout_balanced_accuracy": fit.holdout_balanced, "seconds": seconds}


def detector_aware_margin(logits: torch.Tensor, y: torch.Tensor, scores: torch.Tensor,
                          threshold: float) -> torch.Tensor:
    """(B,) objective for a score-based black-box attacker, <= 0 exactly when the input is
    misclassified and not flagged. logits (B, K), y (B,), scores (B,) in [0, 1].

    Not flagged: the class margin ``logit_y - max_{j != y} logit_j``; flagged:
    ``max(margin, 0) + logit(score) - logit(threshold)`` (> 0), continuous at both borders.
    """
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(),
                               -math.inf)
    margin = true - other.max(1).values
    s = scores.to(logits.dtype).clamp(1e-7, 1 - 1e-7)
    t = min(max(threshold, 1e-7), 1 - 1e-7)
    gap = (torch.log(s) - torch.log1p(-s)) - (math.log(t) - math.log1p(-t))
    flagged = scores > threshold
    return torch.where(flagged, margin.clamp_min(0) + gap.clamp_min(1e-6), margin)


class DetectorAwareSquare(torchattacks.Square):
    """torchattacks Square (L-inf, margin loss) on :func:`detector_aware_margin`, each query
    answered by the real pipeline (network, path features, scikit-learn detector)."""

    def __init__(self, bundle: Bundle, *, eps: float, n_queries: int, seed: int = 0) -> None:
        super().__init__(bundle.model, norm="Linf", eps=eps, n_queries=n_queries,
                         loss="margin", seed=seed, verbose=False)
        self.bundle = bundle

    def margin_and_loss(self, x: torch.Tensor, y: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1], y (B,) true labels -> margin and loss, both (B,)."""
        with torch.inference_mode():
            result = compute_path(self.bundle.model, x)
        scored = score_paths(self.bundle.profile, self.bundle.detector,
                             PathBatch.from_result(result))
        m = detector_aware_margin(result.logits, y, scored.scores,
                                  float(self.bundle.detector.threshold_))
        return m.clone(), m.clone()


def square_aware(bundle: Bundle, x: torch.Tensor, y: torch.Tensor, eps: float, queries: int,
                 seed: int, batch_size: int = 300) -> torch.Tensor:
    """Detector-aware Square on x (N, C, H, W) in [0, 1], y (N,); same shape and range."""
    bundle.model.eval()
    torch.manual_seed(seed)
    attack = DetectorAwareSquare(bundle, eps=eps, n_queries=queries, seed=seed)
    out = [attack(x[i:i + batch_size], y[i:i + batch_size]).detach()
           for i in range(0, len(y), batch_size)]
    return torch.cat(out).clamp_(0.0, 1.0)


def plain_pgd(bundle: Bundle, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig, seed: int,
              batch_size: int = 300) -> torch.Tensor:
    """torchattacks PGD (cross-entropy, random start), the detector ignored."""
    bundle.model.eval()
    torch.manual_seed(seed)
    attack = torchattacks.PGD(bundle.model, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps,
                              random_start=True)
    return torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size]).detach()
                      for i in range(0, len(y), batch_size)])


def quantize_towards(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """x_adv with its perturbation rounded towards zero onto the 1/255 grid (x on the grid):
    still inside the same L-inf ball; (N, C, H, W) in [0, 1]."""
    delta = torch.trunc((x_adv - x) * 255.0 + 1e-4 * torch.sign(x_adv - x)) / 255.0
    return (x + delta).clamp(0.0, 1.0)


def judge(bundle: Bundle, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
          batch_size: int = 500) -> dict[str, Any]:
    """Real-pipeline verdicts on x_adv (N, C, H, W) made from x with labels y (N,).

    Returns the per-input success mask (misclassified and not flagged), and rates over the N
    inputs: misclassified, evaded (= success), evaded_8bit (success after
    :func:`quantize_towards`), and the largest L-inf perturbation.
    """
    def verdicts(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        preds, flags = [], []
        for i in range(0, len(images), batch_size):
            a = bundle.analyze(images[i:i + batch_size])
            preds.append(a.predictions)
            flags.append(a.flagged)
        return np.concatenate(preds), np.concatenate(flags)

    preds, flagged = verdicts(x_adv)
    wrong = preds != y.numpy()
    ok = wrong & ~flagged
    qp, qf = verdicts(quantize_towards(x, x_adv))
    return {"success": ok, "n": len(y), "misclassified": float(wrong.mean()),
            "evaded": float(ok.mean()), "evaded_8bit": float(((qp != y.numpy()) & ~qf).mean()),
            "linf": float((x_adv - x).abs().amax().item()) if len(y) else 0.0}


def select_images(data: ImageData, bundle: Bundle, n: int, *, side: str, split_seed: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n correctly classified test images, x (n, C, H, W) in [0, 1], y (n,), and their indices
    into the loaded test split.

    ``side``: "eval" draws from the half of the test split that ``training.fit_detector
    --seed split_seed`` evaluates on (never fitted), "fit" from the half it fits on. The order
    within the half is a permutation seeded by ``seed``.
    """
    fit_half, eval_half = split_by_image(len(data.y_test), split_seed)
    pool = (eval_half if side == "eval" else fit_half).numpy()
    pool = pool[np.random.default_rng(seed).permutation(len(pool))]
    chosen: list[np.ndarray] = []
    taken = 0
    for start in range(0, len(pool), 1000):
        ids = pool[start:start + 1000]
        preds = bundle.analyze(to_float(data.x_test[torch.from_numpy(ids)])).predictions
        good = ids[preds == data.y_test[torch.from_numpy(ids)].numpy()]
        chosen.append(good[:n - taken])
        taken += len(chosen[-1])
        if taken >= n:
            break
    ids = np.concatenate(chosen)
    if len(ids) < n:
        log.warning("only %d correctly classified images on the %s side (asked for %d)",
                    len(ids), side, n)
    t = torch.from_numpy(ids)
    return to_float(data.x_test[t]), data.y_test[t], ids


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON content (also printed as a Markdown table)."""
    t_start = time.perf_counter()
    bundle = load_bundle(args.bundle)
    bundle.model.requires_grad_(False)  # gradients only ever with respect to inputs
    data = load_dataset(args.dataset, args.data_dir)
    if data.input_shape != tuple(bundle.spec.input_shape):
        raise ValueError(f"--dataset {args.dataset!r} has images {data.input_shape}, the bundle "
                         f"expects {tuple(bundle.spec.input_shape)}")
    x, y, ids = select_images(data, bundle, args.n, side="eval", split_seed=args.split_seed,
                              seed=args.seed)
    configs = [PGDConfig(eps=e, alpha=args.alpha_factor * e / args.steps, steps=args.steps,
                         kappa=args.kappa, det_margin=args.det_margin, ste=args.ste,
                         random_start=args.random_start, grid=args.grid) for e in sorted(args.eps)]
    seconds: dict[str, float] = {}
    surrogate: Surrogate | None = None
    history: list[dict[str, Any]] = []
    sur_ids = np.zeros(0, dtype=np.int64)
    if any(lam > 0 for lam in args.lambdas):
        t0 = time.perf_counter()
        xs, ys, sur_ids = select_images(data, bundle, args.surrogate_images, side="fit",
                                        split_seed=args.split_seed, seed=args.seed + 1)
        surrogate, history = fit_attack_surrogate(
            bundle, xs, ys, configs, args.lambdas, kind=args.surrogate,
            rounds=args.refit_rounds, seed=args.seed, batch_size=args.batch_size)
        seconds["surrogate"] = time.perf_counter() - t0

    clean = bundle.analyze(x) if len(y) else None
    n_bb = len(y) if args.n_blackbox is None else min(args.n_blackbox, len(y))
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    cumulative: dict[str, np.ndarray] = {}
    for cfg in configs:
        row: dict[str, Any] = {"eps": cfg.eps, "attacks": {}}
        successes: dict[str, np.ndarray] = {}
        for name in args.attacks:
            t0 = time.perf_counter()
            if name == "pgd":
                xa = plain_pgd(bundle, x, y, cfg, args.seed, args.batch_size)
                xs_, ys_ = x, y
            elif name == "adaptive":
                res = adaptive_pgd(bundle, surrogate, x, y, cfg, args.lambdas,
                                   args.batch_size, args.seed)
                xa, xs_, ys_ = res.x_adv, x, y
            else:
                xs_, ys_ = x[:n_bb], y[:n_bb]
                if name == "square":
                    spec = AttackSpec("square", cfg.eps, f"{cfg.eps:g}")
                    xa = craft(spec, bundle.model, xs_, ys_, batch_size=args.batch_size,
                               seed=args.seed, square_queries=args.square_queries,
                               progress=False)
                else:
                    xa = square_aware(bundle, xs_, ys_, cfg.eps, args.square_queries,
                                      args.seed, args.batch_size)
            verdict = judge(bundle, xs_, xa, ys_)
            successes[name] = verdict.pop("success")
            verdict["evaded_ids"] = ids[:len(ys_)][successes[name]].tolist()
            # an attacker with budget eps may also use the attack of any smaller budget
            cumulative[name] = cumulative.get(name, np.zeros(len(ys_), dtype=bool)) | successes[
                name]
            verdict["evaded_up_to_eps"] = float(cumulative[name].mean())
            verdict["seconds"] = time.perf_counter() - t0
            if name == "adaptive":
                verdict["by_lambda"] = {
                    f"{lam:g}": int((res.lam_index == i).sum())
                    for i, lam in enumerate(args.lambdas)}
                agree = successes[name] == res.success
                verdict["loop_vs_analyze_disagreements"] = int((~agree).sum())
                if not agree.all():
                    log.warning("eps %g: %d inputs judged differently in the loop and by "
                                "Bundle.analyze", cfg.eps, int((~agree).sum()))
            row["attacks"][name] = verdict
            log.info("eps %g %s: misclassified %.3f, evaded %.3f (%.0fs)", cfg.eps, name,
                     verdict["misclassified"], verdict["evaded"], verdict["seconds"])
        if successes and n_bb:
            common = np.zeros(n_bb, dtype=bool)
            for s in successes.values():
                common |= s[:n_bb]
            row["any_on_blackbox_subset"] = float(common.mean())
            if "adaptive" in successes:
                row["adaptive_on_blackbox_subset"] = float(successes["adaptive"][:n_bb].mean())
        warnings += _masking_check(cfg.eps, successes, n_bb)
        rows.append(row)
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
    return content


def _masking_check(eps: float, successes: dict[str, np.ndarray], n_bb: int) -> list[str]:
    """Warnings where a black-box attack breaks more of the black-box subset than the adaptive
    white-box attack does on the same images (a sign of masked gradients)."""
    if "adaptive" not in successes:
        return []
    white = float(successes["adaptive"][:n_bb].mean()) if n_bb else 0.0
    out = []
    for name in ("square", "square-aware"):
        if name in successes and n_bb and float(successes[name].mean()) > white:
            msg = (f"eps {eps:g}: black-box {name} evades on {successes[name].mean():.3f} of "
                   f"the images, more than the white-box adaptive attack ({white:.3f}) on the "
                   "same images: gradients may be masked, the adaptive attack is not the "
                   "strongest here")
            log.warning(msg)
            out.append(msg)
    return out


def markdown_table(content: dict[str, Any]) -> str:
    """Share of the evaluated images misclassified and not flagged, per eps and attack."""
    names = [a for a in ATTACKS if a in content["results"][0]["attacks"]] if content[
        "results"] else []
    head = ("| eps | " + " | ".join(TITLES[a] for a in names)
            + " | any attack, black-box subset (adaptive alone) |")
    lines = [head, "|---" * (len(names) + 2) + "|"]
    for row in content["results"]:
        cells = []
        for a in names:
            r = row["attacks"][a]
            cells.append(f"{r['evaded']:.3f} ({r['misclassified']:.3f}; 8-bit "
                         f"{r['evaded_8bit']:.3f})")
        anyone = row.get("any_on_blackbox_subset", float("nan"))
        alone = row.get("adaptive_on_blackbox_subset", float("nan"))
        lines.append(f"| {row['eps']:g} | " + " | ".join(cells)
                     + f" | {anyone:.3f} ({alone:.3f}) |")
    lines.append("")
    lines.append(f"Cells: misclassified and not flagged (misclassified at all; the first after "
                 f"rounding to 8 bits). n = {content['n']} correctly classified images "
                 f"(black-box attacks: the first {content['n_blackbox']}); clean images "
                 f"flagged: {content['clean_flagged']:.3f}; threshold "
                 f"{content['threshold']:.4g}.")
    return "\n".join(lines)


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
    p.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3],
                   help="L-inf budgets, pixel units in [0, 1] (default: %(default)s)")
    p.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS),
                   help="attacks to run (default: all)")
    a = p.add_argument_group("PGD (both kinds)")
    a.add_argument("--steps", type=int, default=20,
                   help="sign-gradient steps per run (default: %(default)s)")
    a.add_argument("--alpha-factor", type=float, default=2.5,
                   help="step size = factor * eps / steps (default: %(default)s, i.e. eps/8 at "
                        "20 steps as in training.attacks)")
    g = p.add_argument_group("adaptive attack")
    g.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.3, 1.0, 3.0],
                   help="weights of the detector term, tried in order on the inputs not yet "
                        "broken (default: %(default)s)")
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
                        "zero (attacks through 8-bit uploads; default: float iterates, what the "
                        "exact FP32 tensor endpoint accepts)")
    g.add_argument("--surrogate", choices=SURROGATES, default="mlp",
                   help="differentiable stand-in of the detector (default: %(default)s)")
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
    if any(not 0.0 < e <= 1.0 for e in args.eps):
        parser.error(f"--eps values must be in (0, 1], got {args.eps}")
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
