"""The ROC plot and the Markdown report of one ``training.fit_detector`` run (its metrics from
:mod:`evaluation.metrics` and :func:`evaluation.protocol.evaluate_variant`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from evaluation.metrics import roc


def plot_rocs(clean: np.ndarray, advs: dict[str, np.ndarray], path: Path, title: str) -> None:
    """One ROC curve per attack label against the same clean scores (Nc,); attacks without
    adversarial examples are left out. Writes a PNG to ``path``."""
    fig = Figure(figsize=(5.5, 5.0))  # no pyplot: no global figure state, no backend switch
    ax = fig.subplots()
    for label, adv in advs.items():
        if len(adv) == 0:
            continue
        f, t = roc(clean, adv)
        ax.plot(f, t, lw=1.2, label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.set_xlabel("false-positive rate (clean flagged)")
    ax.set_ylabel("true-positive rate (adversarial flagged)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_report(metrics: dict[str, Any]) -> str:
    """The human-readable report of one fit_detector run from its ``metrics.json`` content."""
    cfg, ev = metrics["config"], metrics["evaluation"]
    lines = [
        f"# Detector report: {metrics['name']}",
        "",
        f"Model: decoupled `{cfg['arch']}` from `{cfg['checkpoint']}` (clean accuracy on the "
        f"whole test split {metrics['clean_accuracy']:.4f}). Detector: `{cfg['detector']}` "
        f"on {'path statistics + raw gates' if cfg['raw_features'] else 'path statistics'}, "
        f"threshold {metrics['threshold']:.4f} set at {cfg['target_fpr']:.0%} FPR"
        + ("" if (c := cfg.get("fpr_confidence")) is None else
           f" with confidence {c:g} (a one-sided Clopper-Pearson bound)")
        + " on held-out clean fitting images"
        + (f" and {n} further clean images of the fitting half, never fitted on"
           if (n := metrics.get("n_threshold_images", 0)) else "")
        + f" (realised there: {metrics['threshold_clean_fpr']:.3f}).",
        "",
        f"Fitted on: {', '.join(cfg['fit_attacks'])}. Evaluated on "
        + (f"the `{cfg['eval_suite']}` suite. " if cfg.get("eval_suite") else
           "the attacks named. ")
        + "Images are split by image: "
        f"{metrics['n_fit_images']} fitting images, {metrics['n_eval_images']} evaluation "
        "images, none on both sides. Only successful attacks on correctly classified clean "
        "images are evaluated; `n_adv` counts them, `success` is their share of the attempts.",
        "",
        f"Clean evaluation images flagged at the threshold: {ev['clean_fpr']:.3f}.",
        "",
        *_attack_table(ev["attacks"], metrics["n_eval_images"]),
        "",
        *_worst_lines(ev),
        "",
        *_benign_table(ev["benign"], ev.get("worst_benign")),
    ]
    if metrics.get("variants"):
        lines += ["", *_variant_table(metrics["variants"], list(ev["attacks"]))]
    lines += ["", "![ROC curves](roc.png)", ""]
    return "\n".join(lines)


def _attack_table(attacks: dict[str, dict[str, Any]], n_eval: int) -> list[str]:
    """Per attack: family, fitted (this attack and strength) and family fitted (any attack
    of its family), the images it ran on, success and detection metrics."""
    lines = ["Per attack: `fitted` = this attack at this strength was fitted on; `family "
             "fitted` = some attack of its family was. Slow attacks ran on a share of the "
             f"{n_eval} evaluation images (`images`).", "",
             "| attack | family | fitted | family fitted | images | success | n_adv | AUROC | "
             "TPR@5%FPR | TPR@1%FPR | TPR@threshold | balanced acc |",
             "|---" * 12 + "|"]
    for label, m in attacks.items():
        head = [label, m.get("family", "?"), _yes(m["fitted"]),
                _yes(m.get("family_fitted", m["fitted"])), str(m.get("images", "?")),
                _fmt(m["success"]), str(m.get("n_adv", 0))]
        tail = (["-"] * 5 if m.get("n_adv", 0) == 0 else [_fmt(m[k]) for k in (
            "auroc", "tpr_at_5", "tpr_at_1", "tpr_at_threshold", "balanced_accuracy")])
        lines.append("| " + " | ".join(head + tail) + " |")
    return lines


def _worst_lines(ev: dict[str, Any]) -> list[str]:
    """The worst case over every attack, and over the attacks of families not fitted on."""
    lines = [_worst("Worst case over attacks", ev["worst"])]
    unseen = ev.get("worst_unseen_family")
    if unseen is not None:
        lines += ["", _worst("Worst case over the attack families not fitted on "
                             f"({', '.join(unseen['families'])})", unseen)]
    elif "worst_unseen_family" in ev:
        lines += ["", "Every evaluated attack family was fitted on: no held-out family."]
    return lines


def _worst(title: str, w: dict[str, Any]) -> str:
    text = (f"{title}: AUROC {w['auroc']:.3f} ({w['auroc_attack']}), TPR@5%FPR "
            f"{w['tpr_at_5']:.3f} ({w['tpr_at_5_attack']})")
    if "tpr_at_threshold" in w:
        text += f", TPR@threshold {w['tpr_at_threshold']:.3f} ({w['tpr_at_threshold_attack']})"
    return text + "."


def _benign_table(benign: dict[str, dict[str, Any]], worst: dict[str, Any] | None
                  ) -> list[str]:
    """Per benign change: the classifier's accuracy before and after, whether it stayed within
    2 points, and the share flagged of the images it still gets right."""
    lines = ["False alarms on benign changes of the evaluation images, at the threshold: "
             "`flagged` is the share flagged among the images the classifier gets right both "
             "before and after the change (`n`); the accuracies are over every evaluation "
             "image, clean and changed. Criterion: at most 10 % flagged on each change that "
             "keeps the accuracy within 2 points.", "",
             "| change | accuracy clean | accuracy changed | within 2 points | n | flagged |",
             "|---|---|---|---|---|---|"]
    for label, m in benign.items():
        if "accuracy_clean" not in m:  # a run from before the benign-change metrics
            lines.append(f"| {label} | - | {_fmt(m['accuracy'])} | - | - | "
                         f"{_fmt(m['flagged'])} |")
            continue
        flagged = "-" if m["flagged"] is None else _fmt(m["flagged"])
        lines.append(f"| {label} | {_fmt(m['accuracy_clean'])} | {_fmt(m['accuracy'])} | "
                     f"{_yes(m['within_tolerance'])} | {m['n']} | {flagged} |")
    if worst is not None:
        lines += ["", f"Most false alarms on a change within 2 points: {worst['flagged']:.3f} "
                      f"({worst['change']})."]
    return lines


def _variant_table(variants: dict[str, dict[str, Any]], attacks: list[str]) -> list[str]:
    """AUROC of each compared detector variant (columns) per attack (rows), worst cases
    last."""
    names = list(variants)
    lines = ["Detector variants on the same adversarial sets (AUROC; worst cases last):", "",
             "| attack | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in attacks:
        lines.append(f"| {a} | " + " | ".join(
            _fmt(variants[n]["auroc"].get(a, float("nan"))) for n in names) + " |")
    lines.append("| **worst** | " + " | ".join(_fmt(variants[n]["worst_auroc"])
                                                for n in names) + " |")
    if any(variants[n].get("worst_unseen_family_auroc") is not None for n in names):
        lines.append("| **worst, unseen families** | " + " | ".join(
            _fmt(variants[n].get("worst_unseen_family_auroc")) for n in names) + " |")
    if any(variants[n].get("worst_tpr_at_threshold") is not None for n in names):
        lines.append("| **worst TPR at threshold** | " + " | ".join(
            _fmt(variants[n].get("worst_tpr_at_threshold")) for n in names) + " |")
    if all("score_us" in variants[n] for n in names):
        network = variants[names[0]]["network_us"]
        stability = max(variants[n]["stability_us"] for n in names)
        lines += ["", f"Cost at batch 1, one thread (the bare network's forward pass: "
                  f"{network:.0f} us; the stability transforms' extra passes: "
                  f"{stability:.0f} us):", "",
                  "| variant | path -> score (us) | / network | detector size (KB) | "
                  "torch export |", "|---" * 5 + "|"]
        for n in names:
            v = variants[n]
            lines.append(f"| {n} | {v['score_us']:.0f} | {v['score_ratio']:.2f} | "
                         f"{v['size_bytes'] / 1024:.0f} | {_yes(v['exported'])} |")
    return lines


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
