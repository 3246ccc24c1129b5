"""The adaptive benchmark: every attack at every L-inf budget on the same images, judged by
the real pipeline, as JSON rows and a Markdown table (``python benchmarks/adaptive.py``).

Attacks, all L-inf with budget eps, on correctly classified images that the bundle's detector
was not fitted on:

- ``pgd`` (non-adaptive): PGD (cross-entropy, random start; :func:`detector.perturb.pgd`, step
  for step torchattacks') with the same eps, steps and step size as the adaptive attack; the
  detector is ignored and its last iterate is judged.
- ``adaptive``: detector-aware PGD (:class:`evaluation.adaptive.pgd.DetectorAwarePGD`), BPDA
  through the gates and the shipped detector score or a fitted surrogate of it, every iterate
  judged.
- ``square`` (black-box, plain): torchattacks Square (``square`` of :mod:`evaluation.attacks`),
  margin loss; ``square-aware``: detector-aware Square
  (:class:`evaluation.adaptive.square.DetectorAwareSquare`).

The rate reported is the share of the evaluated images that end misclassified and not flagged
(``evaded_up_to_eps``: by the attack at this or any smaller eps of the sweep); ``8-bit`` repeats
that after rounding the perturbation towards zero to the 1/255 grid. If a black-box attack beats
the white-box adaptive one, gradients are probably masked: a warning is returned. Where both
white-box attacks ran, ``white_box_union`` is the share that the adaptive or the plain PGD gets
through (an attacker runs both; the plain one sometimes finds images the adaptive one misses).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from detector import perturb
from detector.bundle import Bundle
from evaluation.adaptive.judge import judge
from evaluation.adaptive.pgd import DetectorAwarePGD, DetectorStandIn, PGDConfig
from evaluation.attacks import AttackSpec, Defence, craft
from evaluation.protocol import split_by_image

log = logging.getLogger(__name__)

ATTACKS = ("pgd", "adaptive", "square", "square-aware")
TITLES = {"pgd": "PGD (non-adaptive)", "adaptive": "adaptive PGD (BPDA + surrogate)",
          "square": "Square (black-box)", "square-aware": "Square, detector-aware (black-box)"}


def attack_title(name: str, content: dict[str, Any]) -> str:
    """The display name of attack ``name`` in the benchmark's JSON ``content`` (its optional
    ``config``): the adaptive PGD's title names the detector term it descended on, none (every
    lambda 0), the shipped score itself (``--surrogate shipped``; older files recorded that as
    ``auto``) or a distilled surrogate."""
    config = content.get("config", {})
    if name != "adaptive":
        return TITLES[name]
    if not any(lam > 0 for lam in config.get("lambdas", [1.0])):
        return "adaptive PGD (BPDA, detector as stopping rule)"
    if config.get("surrogate") in ("shipped", "auto"):
        return "adaptive PGD (BPDA + shipped score)"
    return TITLES[name]


def select_images(bundle: Bundle, x_test: torch.Tensor, y_test: torch.Tensor, n: int, *,
                  side: str, split_seed: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """n correctly classified images of a test split x_test (N, C, H, W) in [0, 1], y_test (N,):
    x (n, C, H, W), y (n,) and their indices into the split (fewer, with a warning, if the
    half has fewer).

    ``side``: "eval" draws from the half of the test split that ``training.fit_detector
    --seed split_seed`` evaluates on (never fitted), "fit" from the half it fits on
    (:func:`evaluation.protocol.split_by_image`). The order within the half is a permutation
    seeded by ``seed``.
    """
    if side not in ("fit", "eval"):
        raise ValueError(f"side must be 'fit' or 'eval', got {side!r}")
    fit_half, eval_half = split_by_image(len(y_test), split_seed)
    pool = (eval_half if side == "eval" else fit_half).numpy()
    pool = pool[np.random.default_rng(seed).permutation(len(pool))]
    chosen: list[np.ndarray] = []
    taken = 0
    for start in range(0, len(pool), 1000):
        ids = pool[start:start + 1000]
        preds = bundle.analyze(x_test[torch.from_numpy(ids)]).predictions
        good = ids[preds == y_test[torch.from_numpy(ids)].numpy()]
        chosen.append(good[:n - taken])
        taken += len(chosen[-1])
        if taken >= n:
            break
    ids = np.concatenate(chosen)
    if len(ids) < n:
        log.warning("only %d correctly classified images on the %s side (asked for %d)",
                    len(ids), side, n)
    t = torch.from_numpy(ids)
    return x_test[t], y_test[t], ids


def sweep(bundle: Bundle, x: torch.Tensor, y: torch.Tensor, ids: np.ndarray,
          configs: Sequence[PGDConfig], *, attacks: Sequence[str], lambdas: Sequence[float],
          restarts: int = 1, surrogate: DetectorStandIn | None, n_blackbox: int,
          square_queries: int, batch_size: int, seed: int
          ) -> tuple[list[dict[str, Any]], list[str]]:
    """Every attack at every config (in the given order) on x (N, C, H, W) in [0, 1] with
    labels y (N,) and image ids (N,); the black-box attacks on the first ``n_blackbox``; the
    adaptive one with ``restarts`` runs per lambda (:class:`DetectorAwarePGD`).

    Returns one row per config (eps, per-attack verdicts of :func:`judge` with the ids evaded,
    the cumulative rate, seconds; the adaptive attack's successes by lambda; the share either
    white-box attack gets through, ``white_box_union``, where both ran) and the
    gradient-masking warnings.
    """
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    cumulative: dict[str, np.ndarray] = {}
    for cfg in configs:
        row: dict[str, Any] = {"eps": cfg.eps, "attacks": {}}
        successes: dict[str, np.ndarray] = {}
        for name in attacks:
            t0 = time.perf_counter()
            xs, ys = (x, y) if name in ("pgd", "adaptive") else (x[:n_blackbox], y[:n_blackbox])
            extra: dict[str, Any] = {}
            if name == "pgd":
                xa = plain_pgd(bundle, xs, ys, cfg, seed, batch_size)
            elif name == "adaptive":
                attack = DetectorAwarePGD(bundle, surrogate, cfg, lambdas=lambdas,
                                          restarts=restarts, batch_size=batch_size, seed=seed)
                res = attack.run(xs, ys)
                xa = res.x_adv
                extra["by_lambda"] = {f"{lam:g}": int((res.lam_index == i).sum())
                                      for i, lam in enumerate(lambdas)}
            else:
                spec = AttackSpec(name, cfg.eps, f"{cfg.eps:g}")  # black-box, by name
                xa = craft(spec, bundle.model, xs, ys, batch_size=batch_size, seed=seed,
                           square_queries=square_queries, progress=False,
                           defence=Defence(bundle))
            verdict = judge(bundle, xs, xa, ys)
            successes[name] = verdict.pop("success")
            verdict["evaded_ids"] = ids[:len(ys)][successes[name]].tolist()
            # an attacker with budget eps may also use the attack of any smaller budget
            cumulative[name] = cumulative.get(name, np.zeros(len(ys), dtype=bool)) | successes[
                name]
            verdict["evaded_up_to_eps"] = float(cumulative[name].mean())
            verdict["seconds"] = time.perf_counter() - t0
            if name == "adaptive":
                verdict.update(extra)
                agree = successes[name] == res.success
                verdict["loop_vs_analyze_disagreements"] = int((~agree).sum())
                if not agree.all():
                    log.warning("eps %g: %d inputs judged differently in the loop and by "
                                "Bundle.analyze", cfg.eps, int((~agree).sum()))
            row["attacks"][name] = verdict
            log.info("eps %g %s: misclassified %.3f, evaded %.3f (%.0fs)", cfg.eps, name,
                     verdict["misclassified"], verdict["evaded"], verdict["seconds"])
        if "pgd" in successes and "adaptive" in successes:
            row["white_box_union"] = float((successes["pgd"] | successes["adaptive"]).mean())
            row["white_box_union_up_to_eps"] = float(
                (cumulative["pgd"] | cumulative["adaptive"]).mean())
        if successes and n_blackbox:
            common = np.zeros(n_blackbox, dtype=bool)
            for s in successes.values():
                common |= s[:n_blackbox]
            row["any_on_blackbox_subset"] = float(common.mean())
            if "adaptive" in successes:
                row["adaptive_on_blackbox_subset"] = float(
                    successes["adaptive"][:n_blackbox].mean())
        warnings += masking_warnings(cfg.eps, successes, n_blackbox)
        rows.append(row)
    return rows, warnings


def plain_pgd(bundle: Bundle, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig, seed: int,
              batch_size: int = 300) -> torch.Tensor:
    """PGD on the network alone (cross-entropy, random start; the detector ignored) with the
    budget, step and steps of ``cfg``: x (N, C, H, W) in [0, 1], y (N,) -> same shape/range."""
    bundle.model.eval()
    torch.manual_seed(seed)
    return torch.cat([perturb.pgd(bundle.model, x[i:i + batch_size], y[i:i + batch_size],
                                  cfg.eps, steps=cfg.steps, alpha=cfg.alpha)
                      for i in range(0, len(y), batch_size)])


def masking_warnings(eps: float, successes: dict[str, np.ndarray], n_bb: int) -> list[str]:
    """Warnings where a black-box attack breaks more of the black-box subset than the adaptive
    white-box attack does on the same images (a sign of masked gradients); successes: per
    attack (N,) bool, the black-box ones (n_bb,)."""
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


def plot_curves(content: dict[str, Any], path: Path, title: str) -> None:
    """The attacker's success against eps (x-axis, in /255), one line per attack (the
    cumulative rate ``evaded_up_to_eps``: an attacker with budget eps also has the smaller
    ones), and dashed the share either white-box attack gets through where both ran, from the
    benchmark's JSON content; the clean images' flag rate in the legend's title. Writes a PNG
    to ``path``."""
    fig = Figure(figsize=(5.5, 4.0))  # no pyplot: no global figure state
    ax = fig.subplots()
    rows = content["results"]
    eps = [row["eps"] * 255 for row in rows]
    for name in ATTACKS:
        rates = [row["attacks"][name]["evaded_up_to_eps"] for row in rows
                 if name in row["attacks"]]
        if len(rates) == len(rows):
            ax.plot(eps, rates, "o-", lw=1.2, ms=3, label=attack_title(name, content))
    union = [row["white_box_union_up_to_eps"] for row in rows if "white_box_union_up_to_eps" in row]
    if union and len(union) == len(rows):
        ax.plot(eps, union, "k--", lw=1.0, label="adaptive or plain PGD")
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_ylim(-0.02, 1.02)
    ax.axhline(0.5, color="k", ls=":", lw=0.8)
    ax.set_xlabel("L-inf budget eps (x 1/255)")
    ax.set_ylabel("misclassified and not flagged\n(at some budget <= eps)")
    ax.set_title(title, fontsize=8, wrap=True)
    ax.legend(fontsize=7, loc="upper left",
              title=f"n = {content['n']}; clean flagged {content['clean_flagged']:.3f}",
              title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown_table(content: dict[str, Any]) -> str:
    """Share of the evaluated images misclassified and not flagged, per eps and attack, from
    the benchmark's JSON content (``results``, ``n``, ``n_blackbox``, ``clean_flagged``,
    ``threshold``; ``config`` names the adaptive attack: :func:`attack_title`)."""
    names = [a for a in ATTACKS if a in content["results"][0]["attacks"]] if content[
        "results"] else []
    union = any("white_box_union" in row for row in content["results"])
    head = ("| eps | " + " | ".join(attack_title(a, content) for a in names)
            + (" | adaptive or plain PGD" if union else "")
            + " | any attack, black-box subset (adaptive alone) |")
    lines = [head, "|---" * (len(names) + 2 + union) + "|"]
    for row in content["results"]:
        cells = []
        for a in names:
            r = row["attacks"][a]
            cells.append(f"{r['evaded']:.3f} ({r['misclassified']:.3f}; 8-bit "
                         f"{r['evaded_8bit']:.3f})")
        anyone = row.get("any_on_blackbox_subset", float("nan"))
        alone = row.get("adaptive_on_blackbox_subset", float("nan"))
        if union:
            cells.append(f"{row.get('white_box_union', float('nan')):.3f}")
        lines.append(f"| {row['eps']:g} | " + " | ".join(cells)
                     + f" | {anyone:.3f} ({alone:.3f}) |")
    lines.append("")
    lines.append(f"Cells: misclassified and not flagged (misclassified at all; the first after "
                 f"rounding to 8 bits). n = {content['n']} correctly classified images "
                 f"(black-box attacks: the first {content['n_blackbox']}); clean images "
                 f"flagged: {content['clean_flagged']:.3f}; threshold "
                 f"{content['threshold']:.4g}.")
    return "\n".join(lines)
