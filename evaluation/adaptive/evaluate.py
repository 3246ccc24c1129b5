"""Adaptive attacks named in an evaluation (``--eval-attacks pgd-aware:0.1 square-aware:0.1``).

An adaptive attack needs the fitted detector, so it cannot be crafted with the other
evaluation attacks before fitting: ``training.fit_detector`` crafts it afterwards, against the
bundle it has just written (as served), on the same clean evaluation images and with the same
seed as the other evaluation attacks, and measures the bundled detector on its successful
examples exactly as on every other attack (:func:`evaluation.metrics.attack_metrics`). The
detector variants that are only compared are not attacked adaptively.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from detector.bundle import Bundle
from detector.features import PathBatch
from evaluation.attacks import AttackSpec, Defence
from evaluation.crafting import craft_set
from evaluation.metrics import attack_metrics
from evaluation.sets import AdvSet, Sets, paths_with_companions

#: Suffix of the fitting sets that :func:`adaptive_positives` adds.
AGAINST_FIRST_FIT = " vs first fit"


def craft_adaptive(bundle: Bundle, sets: Sets, specs: Sequence[AttackSpec], *,
                   x_fit: torch.Tensor | None, y_fit: torch.Tensor | None, seed: int,
                   square_queries: int) -> dict[str, AdvSet]:
    """Each adaptive attack of ``specs`` against ``bundle`` on the clean images of ``sets`` (all,
    or the first share: :meth:`AttackSpec.images`; seeded by ``seed``): its misclassified
    examples with the paths the bundle's features read (stability companions included), by
    attack label. x_fit (M, C, H, W) in [0, 1], y_fit (M,): images on which ``pgd-aware`` fits
    its surrogate when the detector has no exact torch export."""
    if not all(s.adaptive for s in specs):
        raise ValueError(f"not adaptive attacks: {[s.label for s in specs if not s.adaptive]}")
    defence = Defence(bundle, x_fit, y_fit)
    n = len(sets.y_clean)
    crafted = {s.label: craft_set(bundle.model, sets.x_clean, sets.y_clean, s,
                                  np.arange(s.images(n)), seed=seed,
                                  square_queries=square_queries, defence=defence)
               for s in specs}
    for c in crafted.values():
        if c.paths is not None:
            c.paths = paths_with_companions(bundle.model, c.x, c.paths, bundle.profile.stability)
    return crafted


def adaptive_positives(bundle: Bundle, fit: Sets, specs: Sequence[AttackSpec], *, seed: int,
                       square_queries: int) -> dict[str, AdvSet]:
    """Fitting positives from adaptive attacks: each attack of ``specs`` against ``bundle`` (a
    first fit of the detector) on the fitting images of ``fit``, labelled ``"<attack> vs first
    fit"``, to be added to ``fit.adversarial`` before the detector is fitted again. The
    evaluation's adaptive attacks then attack the refitted detector (Tramer et al. 2020: a
    defence must be evaluated against an attack on its final form)."""
    crafted = craft_adaptive(bundle, fit, specs, x_fit=fit.x_clean, y_fit=fit.y_clean,
                             seed=seed, square_queries=square_queries)
    return {label + AGAINST_FIRST_FIT: s for label, s in crafted.items()}


def evaluate_adaptive(bundle: Bundle, evaluation: Sets, specs: Sequence[AttackSpec], *,
                      x_fit: torch.Tensor, y_fit: torch.Tensor, seed: int, metrics_seed: int,
                      square_queries: int, fitted: Iterable[str] = ()
                      ) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """Craft each adaptive attack of ``specs`` against ``bundle`` on the clean images of
    ``evaluation`` (all, or the first share of them: :meth:`AttackSpec.images`; seeded by
    ``seed``), and measure the bundle's detector on them.

    x_fit (M, C, H, W) in [0, 1], y_fit (M,): fitting-side images on which ``pgd-aware`` fits
    its surrogate (never the evaluated ones). Returns per attack label the metrics of
    :func:`evaluation.metrics.attack_metrics` (bootstrap seeded by ``metrics_seed``; fitted
    and family-fitted as judged from the detector's fitting labels ``fitted``, which include
    any adaptive positives; ``"adaptive": True``) and the detector's scores of its successful
    examples (Na,).
    """
    sets = craft_adaptive(bundle, evaluation, specs, x_fit=x_fit, y_fit=y_fit, seed=seed,
                          square_queries=square_queries)

    def scores(paths: PathBatch) -> np.ndarray:
        return bundle.score_paths(paths).scores.numpy()

    advs = {label: scores(s.paths) if s.paths is not None else np.empty(0)
            for label, s in sets.items()}
    attacks = attack_metrics(scores(evaluation.clean_paths), advs,
                             float(bundle.detector.threshold_),
                             attempts={label: s.attempts for label, s in sets.items()},
                             fitted=fitted, seed=metrics_seed)
    for m in attacks.values():
        m["adaptive"] = True
    return attacks, advs
