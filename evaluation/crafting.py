"""Adversarial sets: which images each attack runs on, and crafting them (keeping the
successful attacks with their source image and paths).

One process; :mod:`training.distributed_crafting` makes the same sets across torchrun ranks
from :func:`assign_attacks` and :func:`craft_set`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from evaluation.attacks import AttackSpec, Defence, craft
from evaluation.sets import AdvSet, Sets, extract_paths, predict


def assign_attacks(n: int, specs: list[AttackSpec], *, seed: int,
                   per_image: int | None) -> dict[str, np.ndarray]:
    """Indices into n images that each attack runs on, by attack label: all n for
    ``per_image=None``, else each image gets ``per_image`` distinct attacks drawn with one
    generator seeded by ``seed`` (so the draw does not depend on who crafts the attacks). An
    attack with an image share below 1 keeps the first :meth:`AttackSpec.images` of those."""
    if per_image is None:
        return {s.label: np.arange(s.images(n)) for s in specs}
    rng = np.random.default_rng(seed)
    k = min(per_image, len(specs))
    choice = np.stack([rng.choice(len(specs), k, replace=False) for _ in range(n)])
    drawn = [np.flatnonzero((choice == i).any(1)) for i in range(len(specs))]
    return {s.label: idx[:s.images(len(idx))] for s, idx in zip(specs, drawn, strict=True)}


def craft_set(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
              idx: np.ndarray, *, seed: int, square_queries: int,
              defence: Defence | None = None) -> AdvSet:
    """Attack the images ``x[idx]`` (x: (N, C, H, W) in [0, 1], y: (N,), idx non-empty) with
    ``spec`` seeded by ``seed``; keep the successful ones with their paths. The result depends
    only on the arguments, not on what was crafted before (each attack reseeds torch).
    ``defence``: the fitted pipeline an adaptive attack attacks (:func:`evaluation.attacks
    .craft`)."""
    adv = craft(spec, model, x[idx], y[idx], seed=seed, square_queries=square_queries,
                defence=defence)
    ok = (predict(model, adv) != y[idx]).numpy()
    s = AdvSet(adv[ok], y[idx][ok], idx[ok], len(idx))
    s.paths = extract_paths(model, s.x) if ok.any() else None
    return s


def craft_sets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: list[AttackSpec], *,
               seed: int, per_image: int | None, square_queries: int) -> Sets:
    """Attack the images; ``per_image=None`` runs every attack on every image, else each image
    gets ``per_image`` distinct attacks drawn at random. Failed attacks are dropped."""
    assigned = assign_attacks(len(y), specs, seed=seed, per_image=per_image)
    sets = Sets(x, y, extract_paths(model, x))
    for spec in specs:
        idx = assigned[spec.label]
        if len(idx) == 0:
            continue
        sets.adversarial[spec.label] = craft_set(model, x, y, spec, idx, seed=seed,
                                                 square_queries=square_queries)
    return sets
