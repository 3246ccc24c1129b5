"""Run-directory outputs: metrics, configs and charts (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, parent directories created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def plot_filter_states(states: dict[str, dict[str, int | float]], path: Path, title: str) -> None:
    """Stacked bars per gated layer: share of high-energy, dynamic and silent filters."""
    names = list(states)
    n = [states[k]["filters"] for k in names]
    shares = {kind: [states[k][kind] / c for k, c in zip(names, n, strict=True)]
              for kind in ("high_energy", "dynamic", "silent")}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names)), 4.0))
    bottom = [0.0] * len(names)
    colours = {"high_energy": "#d62728", "dynamic": "#1f77b4", "silent": "#7f7f7f"}
    for kind, vals in shares.items():
        ax.bar(range(len(names)), vals, bottom=bottom, label=kind.replace("_", "-"),
               color=colours[kind])
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(names)), names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("share of filters")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
