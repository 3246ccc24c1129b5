"""The Markdown report of a baseline comparison (``baselines.md``): AUROC and TPR@5%FPR
tables, methods x attacks with the worst case last, and each method's operating point."""

from __future__ import annotations

from typing import Any

from evaluation.detector_run import DetectorRun

TITLES = {
    "ours": "computation paths (ours)",
    "pooled": "pooled activations, gates open",
    "mahalanobis": "Mahalanobis (Lee et al. 2018)",
    "lid": "LID (Ma et al. 2018)",
    "dknn": "Deep k-NN (Papernot & McDaniel 2018)",
}


def _confidence_note(run: DetectorRun) -> str:
    """How the report's thresholds use the run's --fpr-confidence (empty if it had none)."""
    if run.fpr_confidence is None:
        return ""
    if run.threshold_rule["fpr_confidence"] is not None:
        return f" (bounded with confidence {run.fpr_confidence:g})"
    return (f"; the run's detector bounded its threshold with confidence "
            f"{run.fpr_confidence:g} on further clean images the baselines do not have, so "
            "they take the plain quantile")


def _cell(m: dict[str, Any], key: str) -> str:
    return f"{m[key]:.3f}" if m.get("n_adv", 0) else "-"


def comparison_markdown(run: DetectorRun, results: dict[str, dict[str, Any]],
                        force_open: bool) -> str:
    """The report of ``results`` (method -> :func:`evaluation.protocol.evaluate_scorer` output
    with ``seconds`` and ``details``) on ``run``; ``force_open``: the baselines read the network
    with every gate open."""
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
        f"{run.target_fpr:.0%} FPR on held-out clean fitting images"
        + _confidence_note(run)
        + ". Baselines read the "
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
    keep = ("detector", "features", "eps", "noise", "layers", "k", "batch", "reference_images",
            "train_images", "calibration_images")
    parts = []
    for key in keep:
        if key in details:
            value = details[key]
            parts.append(f"{key}={','.join(value) if isinstance(value, list) else value}")
    return " ".join(parts)
