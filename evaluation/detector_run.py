"""One ``python -m training.fit_detector`` output directory, loaded: its config and metrics,
its decoupled classifier, and its fitting and evaluation sets (``adversarial.npz``), so that
other detectors can be fitted and measured on exactly the run's split, sets, seed and target
false-positive rate (:mod:`evaluation.baselines`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from detector.checkpoint import ModelSpec, load_checkpoint
from evaluation.sets import Sets, sets_from_arrays, source_images

log = logging.getLogger(__name__)

#: The repository root, against which relative paths in a run's config are also tried.
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DetectorRun:
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

    @property
    def fpr_confidence(self) -> float | None:
        """The run's ``--fpr-confidence`` (None: the threshold flags ``target_fpr`` of the
        held-out clean images; older runs did not record it)."""
        value = self.config.get("fpr_confidence")
        return None if value is None else float(value)

    @property
    def threshold_rule(self) -> dict[str, float | None]:
        """The baselines' threshold rule as keyword arguments of
        :class:`~detector.threshold.FPRThresholdClassifier` (and so of every detector built on
        it): the run's target FPR, and its confidence bound where the baselines have the clean
        images the run's detector read it off. A run's ``--threshold-images`` are not kept in
        ``adversarial.npz``, and a bound read off the held-out quarter alone (some 150 images
        against 2,600) would flag far fewer than the run's, so with them the baselines take
        the plain quantile, which favours them if anything."""
        further = int(self.metrics.get("n_threshold_images", 0))
        return {"target_fpr": self.target_fpr,
                "fpr_confidence": None if further else self.fpr_confidence}


def load_run(directory: Path) -> DetectorRun:
    """Read ``metrics.json``, the checkpoint it names and ``adversarial.npz`` of a run;
    FileNotFoundError naming a missing file."""
    for name in ("metrics.json", "adversarial.npz"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; --run must be an output "
                                    "directory of python -m training.fit_detector")
    metrics = json.loads((directory / "metrics.json").read_text())
    config = metrics["config"]
    model, spec = load_checkpoint(Path(resolve_path(config["checkpoint"])))
    model.requires_grad_(False)  # gradients are only ever taken with respect to inputs
    with np.load(directory / "adversarial.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    fit, evaluation = _load_sets(arrays, "fit", model), _load_sets(arrays, "eval", model)
    return DetectorRun(directory, config, metrics, model, spec, fit, evaluation,
                       set(config["fit_attacks"]))


def resolve_path(path: str) -> str:
    """A relative path from a run's config: as given if it exists from here, else relative to
    the repository root if it exists there, else unchanged (e.g. a dataset name)."""
    if Path(path).exists() or Path(path).is_absolute() or not (ROOT / path).exists():
        return path
    return str(ROOT / path)


def _load_sets(arrays: dict[str, np.ndarray], prefix: str, model: nn.Module) -> Sets:
    """Sets of one side of ``adversarial.npz`` (:func:`evaluation.sets.sets_from_arrays`);
    fitting-side source images missing from older files are recovered with
    :func:`evaluation.sets.source_images`."""
    sets = sets_from_arrays(arrays, prefix, model)
    if prefix == "fit":
        for label, adv in sets.adversarial.items():
            if len(adv.image) and (adv.image < 0).all():
                adv.image = source_images(adv.x, adv.y, sets.x_clean, sets.y_clean)
                log.info("%s (fitting): source images recovered as the nearest clean image of "
                         "the same class", label)
    return sets
