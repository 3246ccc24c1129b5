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
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_report(metrics: dict[str, Any]) -> str:
    """The human-readable report of one fit_detector run from its ``metrics.json`` content."""
    cfg, ev = metrics["config"], metrics["evaluation"]
    lines = [
        f"# Detector report: {metrics['name']}",
        "",
        f"Model: decoupled `{cfg['arch']}` from `{cfg['checkpoint']}` "
        f"(clean test accuracy {metrics['clean_accuracy']:.4f}). Detector: `{cfg['detector']}` "
        f"on {'path statistics + raw gates' if cfg['raw_features'] else 'path statistics'}, "
        f"threshold {metrics['threshold']:.4f} set at {cfg['target_fpr']:.0%} FPR on held-out "
        f"clean fitting images (realised there: {metrics['threshold_clean_fpr']:.3f}).",
        "",
        f"Fitted on: {', '.join(cfg['fit_attacks'])}. Images are split by image: "
        f"{metrics['n_fit_images']} fitting images, {metrics['n_eval_images']} evaluation "
        "images, none on both sides. Only successful attacks on correctly classified clean "
        "images are evaluated; `n_adv` counts them, `success` is their share of the attempts.",
        "",
        f"Clean evaluation images flagged at the threshold: {ev['clean_fpr']:.3f}.",
        "",
        "| attack | fitted | success | n_adv | AUROC | TPR@5%FPR | TPR@1%FPR | "
        "TPR@threshold | balanced acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, m in ev["attacks"].items():
        if m.get("n_adv", 0) == 0:
            lines.append(f"| {label} | {m['fitted']} | {m['success']:.3f} | 0 |"
                         + " - |" * 5)
            continue
        lines.append("| " + " | ".join([label, str(m["fitted"]), _fmt(m["success"]),
                                          str(m["n_adv"])] + [_fmt(m[k]) for k in (
            "auroc", "tpr_at_5", "tpr_at_1", "tpr_at_threshold", "balanced_accuracy")]) + " |")
    worst = ev["worst"]
    lines += ["", f"Worst case over attacks: AUROC {worst['auroc']:.3f} ({worst['auroc_attack']}), "
              f"TPR@5%FPR {worst['tpr_at_5']:.3f} ({worst['tpr_at_5_attack']}).", "",
              "False alarms on benign shifts of clean evaluation images (at the threshold):", "",
              "| shift | flagged | accuracy |", "|---|---|---|"]
    for label, m in ev["benign"].items():
        lines.append(f"| {label} | {m['flagged']:.3f} | {m['accuracy']:.3f} |")
    if metrics.get("variants"):
        lines += ["", "Detector variants on the same adversarial sets (AUROC; worst case last):",
                  ""]
        attacks = list(ev["attacks"])
        lines.append("| variant | " + " | ".join(attacks) + " | worst |")
        lines.append("|---" * (len(attacks) + 2) + "|")
        for name, v in metrics["variants"].items():
            lines.append(f"| {name} | " + " | ".join(
                _fmt(v["auroc"].get(a, float("nan"))) for a in attacks)
                + f" | {_fmt(v['worst_auroc'])} |")
    lines += ["", "![ROC curves](roc.png)", ""]
    return "\n".join(lines)
