"""Adaptive attacks named in an evaluation (``--eval-attacks pgd-aware:0.1 square-aware:0.1``).

An adaptive attack needs the fitted detector, so it cannot be crafted with the other
evaluation attacks before fitting: ``training.fit_detector`` crafts it afterwards, against the
bundle it has just written (as served), on the same clean evaluation images and with the same
seed as the other evaluation attacks, and measures the bundled detector on its successful
examples exactly as on every other attack (:func:`evaluation.metrics.attack_metrics`). The
detector variants that are only compared are not attacked adaptively.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from detector.bundle import Bundle
from detector.features import PathBatch
from evaluation.attacks import AttackSpec, Defence
from evaluation.crafting import craft_set
from evaluation.metrics import attack_metrics
from evaluation.sets import Sets, paths_with_companions


def evaluate_adaptive(bundle: Bundle, evaluation: Sets, specs: Sequence[AttackSpec], *,
                      x_fit: torch.Tensor, y_fit: torch.Tensor, seed: int, metrics_seed: int,
                      square_queries: int) -> tuple[dict[str, dict[str, Any]],
                                                    dict[str, np.ndarray]]:
    """Craft each adaptive attack of ``specs`` against ``bundle`` on the clean images of
    ``evaluation`` (all, or the first share of them: :meth:`AttackSpec.images`; seeded by
    ``seed``), and measure the bundle's detector on them.

    x_fit (M, C, H, W) in [0, 1], y_fit (M,): fitting-side images on which ``pgd-aware`` fits
    its surrogate (never the evaluated ones). Returns per attack label the metrics of
    :func:`evaluation.metrics.attack_metrics` (bootstrap seeded by ``metrics_seed``; never
    fitted, ``"adaptive": True``) and the detector's scores of its successful examples (Na,).
    """
    if not all(s.adaptive for s in specs):
        raise ValueError(f"not adaptive attacks: {[s.label for s in specs if not s.adaptive]}")
    defence = Defence(bundle, x_fit, y_fit)
    n = len(evaluation.y_clean)
    sets = {s.label: craft_set(bundle.model, evaluation.x_clean, evaluation.y_clean, s,
                               np.arange(s.images(n)), seed=seed,
                               square_queries=square_queries, defence=defence)
            for s in specs}

    for s in sets.values():  # the paths the bundle's features read (stability companions)
        if s.paths is not None:
            s.paths = paths_with_companions(bundle.model, s.x, s.paths, bundle.profile.stability)

    def scores(paths: PathBatch) -> np.ndarray:
        return bundle.score_paths(paths).scores.numpy()

    advs = {label: scores(s.paths) if s.paths is not None else np.empty(0)
            for label, s in sets.items()}
    attacks = attack_metrics(scores(evaluation.clean_paths), advs,
                             float(bundle.detector.threshold_),
                             attempts={label: s.attempts for label, s in sets.items()},
                             fitted=(), seed=metrics_seed)
    for m in attacks.values():
        m["adaptive"] = True
    return attacks, advs
