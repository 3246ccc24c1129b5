"""``python -m training.interpret``: a path-level report of a decoupled model over a data set.

Written to ``--out``: ``report.html`` (the figures with what each shows), ``report.json`` (the
numbers behind them) and the PNG figures (matplotlib):

- ``filter_states.png``: per gated layer, the share of filters open for every image
  (high-energy), never open (silent), or input-dependent (dynamic) (the paper's Fig. 4;
  :func:`detector.filter_states.filter_states`, as ``training.decouple`` writes it);
- ``prototypes.png``: class path prototypes: per class and filter, the share of the class's
  images that open the filter, every gated layer side by side;
- ``similarity.png``: per layer, how alike two classes' prototypes are (1 - the mean absolute
  difference of their open rates: 1 = the same filters at the same rates), and the mean over
  class pairs by depth: where the classes still share computation and where they split;
- ``dynamic_filters.png``: the most input-dependent filters (open rate nearest 1/2 over the
  images): how often each class opens them, and the images that open them most strongly
  (largest gate logit);
- ``drift.png``: how the path of an adversarial example moves from its source class to the
  class it is taken for, layer by layer: per layer, the position of its bits between the two
  prototypes (0 = on the source's, 1 = on the target's: d_s / (d_s + d_t), d = mean absolute
  difference between the bits and a prototype), averaged over the attacked images, beside the
  clean originals' positions for the same pairs.

Prototypes are computed on the images given (the first ``--images`` of the test split), by
true class. The attack (``--attack``, default PGD at the data set's usual strength) runs on the
first ``--attacked`` correctly classified ones; only successful attacks enter the drift.

Example (the committed MNIST model, written into docs/)::

    python -m training.interpret --dataset ../shared/data/mnist.npz \\
        --checkpoint models/mnist/decoupled --out docs/interpret/mnist --threads 1
"""

from __future__ import annotations

import argparse
import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LinearSegmentedColormap

from detector.checkpoint import load_checkpoint
from detector.filter_states import filter_states
from evaluation.attacks import AttackSpec, craft
from evaluation.sets import extract_paths, predict
from training.cli import add_data_args, add_runtime_args, load_data, positive, run_command
from training.data import ImageData, to_float
from training.report import plot_filter_states, write_json

log = logging.getLogger("training.interpret")

#: Default attack by image channels: MNIST-like grey images, CIFAR-like colour ones.
DEFAULT_ATTACK = {1: "pgd:0.3", 3: "pgd:8/255"}
BLUES = LinearSegmentedColormap.from_list("open_rate", ["#f8fafc", "#1d4ed8"])
DPI = 110


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.interpret", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="decoupled run directory (training.decouple), e.g. "
                        "models/mnist/decoupled")
    add_data_args(p)
    g = p.add_argument_group("report")
    g.add_argument("--images", type=positive(int), default=500,
                   help="test images the report covers (default: %(default)s)")
    g.add_argument("--attack", default=None,
                   help="attack for the drift figure, as in fit_detector (default: pgd:0.3 "
                        "for grey images, pgd:8/255 for colour)")
    g.add_argument("--attacked", type=int, default=48,
                   help="correctly classified images to attack; 0 leaves the drift out "
                        "(default: %(default)s)")
    g.add_argument("--top-filters", type=positive(int), default=6,
                   help="dynamic filters shown with their images (default: %(default)s)")
    g.add_argument("--grid", type=positive(int), default=8,
                   help="images shown per dynamic filter (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: runs/<dataset>/interpret)")
    add_runtime_args(p, device=False)
    return p


# --- the numbers ----------------------------------------------------------------------------


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def prototypes(bits: dict[str, np.ndarray], labels: np.ndarray,
               num_classes: int) -> dict[str, np.ndarray]:
    """Per layer: (K, C) share of each class's images that open each filter (NaN rows for
    classes without images)."""
    out = {}
    for name, b in bits.items():
        rows = [b[labels == k].mean(0) if (labels == k).any() else np.full(b.shape[1], np.nan)
                for k in range(num_classes)]
        out[name] = np.stack(rows)
    return out


def similarity(proto: np.ndarray) -> np.ndarray:
    """(K, C) prototypes -> (K, K): 1 - mean absolute difference of two classes' open rates."""
    return 1.0 - np.abs(proto[:, None, :] - proto[None, :, :]).mean(-1)


@dataclass
class DynamicFilter:
    layer: str
    index: int
    open_rate: float
    class_rates: list[float]
    top_images: list[int]  # indices into the report's images, strongest gate logit first


def dynamic_filters(bits: dict[str, np.ndarray], gate_logits: dict[str, np.ndarray],
                    labels: np.ndarray, num_classes: int, top: int,
                    grid: int) -> list[DynamicFilter]:
    """The ``top`` filters whose open rate is nearest 1/2 (most input-dependent), with each
    class's open rate and the ``grid`` images with the largest gate logits."""
    candidates = []
    for name, b in bits.items():
        rate = b.mean(0)
        for i, r in enumerate(rate):
            candidates.append((r * (1 - r), name, i, r))
    candidates.sort(key=lambda c: -c[0])
    out = []
    for _, name, i, r in candidates[:top]:
        b = bits[name][:, i]
        rates = [float(b[labels == k].mean()) if (labels == k).any() else float("nan")
                 for k in range(num_classes)]
        strongest = np.argsort(-gate_logits[name][:, i], kind="stable")[:grid]
        out.append(DynamicFilter(name, int(i), float(r), rates, [int(j) for j in strongest]))
    return out


def drift(bits: dict[str, np.ndarray], proto: dict[str, np.ndarray], source: np.ndarray,
          target: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer, for each image: d_s, d_t (mean |bits - prototype| of the source and target
    classes) and position d_s / (d_s + d_t) (0 = source's prototype, 1 = target's; NaN where
    the bits match both prototypes, as in a layer whose filters are all static)."""
    d_s, d_t = [], []
    for name, b in bits.items():
        d_s.append(np.abs(b - proto[name][source]).mean(1))
        d_t.append(np.abs(b - proto[name][target]).mean(1))
    ds, dt = np.stack(d_s, 1), np.stack(d_t, 1)  # (M, L)
    total = ds + dt
    with np.errstate(invalid="ignore", divide="ignore"):
        position = np.where(total > 1e-9, ds / total, np.nan)
    return {"d_source": ds, "d_target": dt, "position": position}


def _layer_means(values: np.ndarray) -> list[float | None]:
    """(M, L) -> per-layer means (4 decimals), None for a layer with no defined value."""
    with np.errstate(invalid="ignore"):
        means = np.nanmean(np.where(np.isnan(values).all(0), 0.0, values), 0)
    return [None if np.isnan(values[:, j]).all() else round(float(m), 4)
            for j, m in enumerate(means)]


# --- the figures ----------------------------------------------------------------------------


def _chunks(names: list[str], widths: list[int], limit: int) -> list[list[int]]:
    """Layer indices grouped into panels of at most ``limit`` filters (at least one layer)."""
    groups: list[list[int]] = [[]]
    total = 0
    for j, w in enumerate(widths):
        if groups[-1] and total + w > limit:
            groups.append([])
            total = 0
        groups[-1].append(j)
        total += w
    return groups


def plot_prototypes(proto: dict[str, np.ndarray], classes: tuple[str, ...], path: Path,
                    title: str) -> None:
    names = list(proto)
    widths = [proto[n].shape[1] for n in names]
    panels = _chunks(names, widths, 256)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(13, 0.9 + (0.25 * len(classes) + 0.9) * len(panels)))
    for ax, group in zip(axes[:, 0], panels, strict=True):
        matrix = np.concatenate([proto[names[j]] for j in group], axis=1)
        im = ax.imshow(matrix, aspect="auto", cmap=BLUES, vmin=0, vmax=1,
                       interpolation="nearest")
        edges = np.cumsum([widths[j] for j in group])
        for e in edges[:-1]:
            ax.axvline(e - 0.5, color="#0f172a", lw=0.8)
        starts = np.r_[0, edges[:-1]]
        ax.set_xticks((starts + edges) / 2 - 0.5, [names[j] for j in group], fontsize=7,
                      rotation=20 if len(group) > 6 else 0)
        ax.xaxis.tick_top()
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    fig.colorbar(im, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01,
                 label="share of the class's images that open the filter")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_similarity(sims: dict[str, np.ndarray], classes: tuple[str, ...], path: Path,
                    title: str) -> None:
    names = list(sims)
    n = len(names)
    cols = min(n, 5)
    rows = -(-n // cols)
    fig = plt.figure(figsize=(2.5 * cols, 2.5 * rows + 2.6))
    grid = fig.add_gridspec(rows + 1, cols, height_ratios=[1] * rows + [1.1], hspace=0.5)
    short = [c[:4] for c in classes]
    low = min(float(np.nanmin(s)) for s in sims.values())
    for j, name in enumerate(names):
        ax = fig.add_subplot(grid[j // cols, j % cols])
        ax.imshow(sims[name], cmap="viridis", vmin=low, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=7)
        ax.set_xticks(range(len(classes)), short, fontsize=5, rotation=90)
        ax.set_yticks(range(len(classes)), short, fontsize=5)
    ax = fig.add_subplot(grid[rows, :])
    k = len(classes)
    off = ~np.eye(k, dtype=bool)
    mean = [float(np.nanmean(sims[nm][off])) for nm in names]
    lowest = [float(np.nanmin(sims[nm][off])) for nm in names]
    ax.plot(range(n), mean, marker="o", label="mean over class pairs")
    ax.plot(range(n), lowest, marker=".", ls="--", label="most different pair")
    ax.set_xticks(range(n), names, fontsize=6, rotation=40, ha="right")
    ax.set_ylabel("prototype similarity", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{title} (colour scale {low:.2f} to 1)", fontsize=10)
    _save(fig, path)


def plot_dynamic(filters: list[DynamicFilter], images: torch.Tensor, classes: tuple[str, ...],
                 path: Path, title: str) -> None:
    grid = len(filters[0].top_images) if filters else 0
    fig = plt.figure(figsize=(3.2 + 0.95 * grid, 1.3 * len(filters) + 0.6))
    spec = fig.add_gridspec(len(filters), grid + 3, wspace=0.08, hspace=0.75)
    for r, f in enumerate(filters):
        ax = fig.add_subplot(spec[r, :3])
        ax.bar(range(len(classes)), f.class_rates, color="#1d4ed8")
        ax.set_ylim(0, 1)
        ax.set_xticks(range(len(classes)), [c[:4] for c in classes], fontsize=6, rotation=90)
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(f"{f.layer} #{f.index}: open for {f.open_rate:.0%}", fontsize=7)
        for c, j in enumerate(f.top_images):
            a = fig.add_subplot(spec[r, 3 + c])
            img = images[j].permute(1, 2, 0).numpy()
            a.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray",
                     interpolation="nearest")
            a.set_axis_off()
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_drift(names: list[str], adv: dict[str, np.ndarray], clean: dict[str, np.ndarray],
               path: Path, title: str) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2))
    x = np.arange(len(names))
    for data, label, colour in ((clean, "clean originals", "#15803d"),
                                (adv, "adversarial versions", "#b91c1c")):
        pos = data["position"]
        mean = np.array(_layer_means(pos), dtype=float)  # NaN (a gap) for static layers
        defined = ~np.isnan(pos).all(0)
        lo, hi = np.full(len(names), np.nan), np.full(len(names), np.nan)
        if defined.any():
            lo[defined], hi[defined] = np.nanpercentile(pos[:, defined], [25, 75], axis=0)
        ax.plot(x, mean, marker="o", color=colour, label=label)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.15)
    ax.axhline(0.5, color="#64748b", ls=":", lw=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("position between prototypes\n0 = source class, 1 = target class", fontsize=8)
    ax.set_xticks(x, names, fontsize=6, rotation=40, ha="right")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("where the path is, layer by layer (mean, 25-75 %)", fontsize=9)
    ax.grid(alpha=0.3)
    for key, style, label in (("d_source", "-", "to the source prototype"),
                              ("d_target", "--", "to the target prototype")):
        bx.plot(x, adv[key].mean(0), ls=style, marker="o", color="#b91c1c",
                label=f"adversarial, {label}")
        bx.plot(x, clean[key].mean(0), ls=style, marker=".", color="#15803d",
                label=f"clean, {label}")
    bx.set_ylabel("mean |bits - prototype|", fontsize=8)
    bx.set_xticks(x, names, fontsize=6, rotation=40, ha="right")
    bx.legend(fontsize=7)
    bx.set_title("distance to each prototype", fontsize=9)
    bx.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


# --- the report -----------------------------------------------------------------------------

FIGURES = {
    "filter_states.png": (
        "Filter states",
        "Per gated layer, the share of filters that are open for every image (high-energy), "
        "never open (silent) or open for some images only (dynamic). Dynamic filters are "
        "what makes the path depend on the input; the detector reads them."),
    "prototypes.png": (
        "Class path prototypes",
        "Per class (rows) and filter (columns, every gated layer in execution order), the "
        "share of the class's images that open the filter. Columns of one colour are filters "
        "all classes use (or none does); columns that change colour from row to row are "
        "filters that tell classes apart."),
    "similarity.png": (
        "Path similarity of classes, layer by layer",
        "Per layer, 1 minus the mean absolute difference between two classes' prototypes "
        "(1: the same filters at the same rates). The line below follows the mean and the "
        "lowest over class pairs with depth: high means the classes still share computation, "
        "a drop marks where their paths split."),
    "dynamic_filters.png": (
        "The most dynamic filters",
        "The filters whose open rate over the images is nearest one half: how often each "
        "class opens them (bars) and the images that open them most strongly (largest gate "
        "logit), which shows what the filter's gate responds to."),
    "drift.png": (
        "Drift of adversarial paths",
        "For successful attacks, where each layer's path lies between the prototype of the "
        "image's true (source) class and the class it is now taken for (target): 0 on the "
        "source's, 1 on the target's. The clean originals, measured against the same pairs, "
        "stay near 0; the adversarial paths leave the source class in the layers where the "
        "red line rises."),
}


def write_html(out: Path, title: str, summary: list[str], figures: list[str]) -> None:
    parts = [f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}"
             "</title><style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;"
             "padding:1rem;line-height:1.45}img{max-width:100%;border:1px solid #cbd5e1}"
             "</style>",
             f"<h1>{html.escape(title)}</h1><ul>",
             *(f"<li>{html.escape(s)}</li>" for s in summary), "</ul>"]
    for name in figures:
        heading, text = FIGURES[name]
        parts += [f"<h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p>",
                  f"<img src='{name}' alt='{html.escape(heading)}'>"]
    parts.append("<p>The numbers behind every figure: <a href='report.json'>report.json"
                 "</a>.</p></html>")
    (out / "report.html").write_text("\n".join(parts) + "\n")


def main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    data: ImageData = load_data(args)
    model, spec = load_checkpoint(args.checkpoint)
    if not spec.decoupled:
        raise ValueError(f"--checkpoint {args.checkpoint} is not decoupled; give a "
                         "training.decouple run")
    if spec.input_shape != data.input_shape:
        raise ValueError(f"--checkpoint {args.checkpoint} expects images {spec.input_shape}, "
                         f"dataset {args.dataset!r} has {data.input_shape}")
    out = args.out or Path("runs") / data.name / "interpret"
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    n = min(args.images, len(data.y_test))
    x, y = to_float(data.x_test[:n]), data.y_test[:n]
    labels = y.numpy()
    k = len(data.classes)
    paths = extract_paths(model, x)
    bits = {name: _np(b).astype(np.float64) for name, b in paths.bits.items()}
    gate_logits = {name: _np(g) for name, g in paths.gate_logits.items()}
    predicted = _np(paths.logits).argmax(1)
    names = list(bits)
    label = f"decoupled {spec.arch} on {data.name}"

    states = filter_states({name: b > 0.5 for name, b in bits.items()})
    plot_filter_states(states, out / "filter_states.png",
                       f"Filter states: {label} ({n} test images)")
    proto = prototypes(bits, labels, k)
    plot_prototypes(proto, data.classes, out / "prototypes.png",
                    f"Class path prototypes: {label} ({n} test images, by true class)")
    sims = {name: similarity(p) for name, p in proto.items()}
    plot_similarity(sims, data.classes, out / "similarity.png",
                    f"Prototype similarity of classes per layer: {label}")
    dyn = dynamic_filters(bits, gate_logits, labels, k, args.top_filters, args.grid)
    plot_dynamic(dyn, x, data.classes, out / "dynamic_filters.png",
                 f"The {len(dyn)} most dynamic filters of {label} and the images that open "
                 "them most strongly")
    figures = ["filter_states.png", "prototypes.png", "similarity.png", "dynamic_filters.png"]
    off = ~np.eye(k, dtype=bool)
    report: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "dataset": args.dataset, "arch": spec.arch,
        "classes": list(data.classes), "images": n,
        "accuracy": float((predicted == labels).mean()),
        "layers": names, "filter_states": states,
        "prototypes": {name: np.round(p, 4).tolist() for name, p in proto.items()},
        "similarity": {name: np.round(s, 4).tolist() for name, s in sims.items()},
        "similarity_mean_off_diagonal": {name: float(np.nanmean(s[off]))
                                         for name, s in sims.items()},
        "dynamic_filters": [vars(f) for f in dyn],
    }
    if args.attacked > 0:
        spec_text = args.attack or DEFAULT_ATTACK.get(data.input_shape[0], "pgd:0.1")
        attack = AttackSpec.parse(spec_text)
        correct = np.flatnonzero(predicted == labels)[:args.attacked]
        xa, ya = x[correct], y[correct]
        adv = craft(attack, model, xa, ya, seed=args.seed, progress=not args.quiet)
        target = predict(model, adv).numpy()
        ok = target != ya.numpy()
        if ok.sum() < 2:
            log.warning("only %d of %d attacks succeeded: no drift figure", ok.sum(), len(ok))
        else:
            adv_paths = extract_paths(model, adv[ok])
            adv_bits = {name: _np(b).astype(np.float64) for name, b in adv_paths.bits.items()}
            clean_bits = {name: b[correct[ok]] for name, b in bits.items()}
            src, tgt = ya.numpy()[ok], target[ok]
            adv_drift = drift(adv_bits, proto, src, tgt)
            clean_drift = drift(clean_bits, proto, src, tgt)
            plot_drift(names, adv_drift, clean_drift, out / "drift.png",
                       f"Drift of {attack.label} paths from source to target class: {label} "
                       f"({int(ok.sum())} successful of {len(ok)} attacked)")
            figures.append("drift.png")
            report["drift"] = {
                "attack": attack.label, "attacked": len(ok), "successful": int(ok.sum()),
                **{f"{kind}_{key}": _layer_means(d[key])
                   for kind, d in (("adversarial", adv_drift), ("clean", clean_drift))
                   for key in ("position", "d_source", "d_target")},
            }
    dynamic_total = sum(s["dynamic"] for s in states.values())
    filters_total = sum(s["filters"] for s in states.values())
    summary = [f"{label}: {n} test images, accuracy {report['accuracy']:.1%}",
               f"{dynamic_total} of {filters_total} gated filters are dynamic over these "
               f"images, {sum(s['silent'] for s in states.values())} silent, "
               f"{sum(s['high_energy'] for s in states.values())} always open"]
    if "drift" in report:
        d = report["drift"]
        adv = [v for v in d["adversarial_position"] if v is not None] or [float("nan")]
        clean = [v for v in d["clean_position"] if v is not None] or [float("nan")]
        summary.append(f"{d['attack']}: {d['successful']} of {d['attacked']} attacks succeeded; "
                       f"mean position of the adversarial path between source (0) and target "
                       f"(1) prototypes: {adv[0]:.2f} in the first dynamic gated layer, "
                       f"{adv[-1]:.2f} in the last (clean: {clean[0]:.2f}, {clean[-1]:.2f})")
    report["summary"] = summary
    report["seconds"] = time.perf_counter() - start
    write_json(out / "report.json", report)
    write_html(out, f"Path report: {label}", summary, figures)
    for line in summary:
        print(line)  # noqa: T201
    print(f"report in {out / 'report.html'} ({report['seconds']:.0f} s)")  # noqa: T201


def cli(argv: list[str] | None = None) -> None:
    run_command(build_parser(), main, argv)


if __name__ == "__main__":
    cli()
