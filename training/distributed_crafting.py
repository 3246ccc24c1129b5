"""Adversarial sets crafted across torchrun ranks: whole attacks per rank, gathered on rank 0.

``torchrun --nproc_per_node N -m training.fit_detector ...`` splits the slow part of the job,
crafting each attack and extracting the paths of its successful examples, over N ranks. The
unit of work is one attack on one side (fitting or evaluation), a :class:`Job`:

- every rank draws the per-image attack assignment of each side itself
  (:func:`evaluation.crafting.assign_attacks`, one generator per side, as a single process);
- each job is crafted by :func:`evaluation.crafting.craft_set` with the side's seed, which
  reseeds torch before the attack, so a job's result does not depend on the rank that runs it
  or on what that rank ran before: the gathered sets are the single process's, image for image
  (given the same torch threads: a convolution's summation order can depend on them);
- the jobs are shared out longest first by a rough cost (:func:`job_cost`) to the least loaded
  rank, a deterministic plan that every rank computes alike;
- rank 0 extracts the clean paths of each side, gathers the other ranks' sets
  (:func:`training.distributed.gather_to_main`) and assembles them in the single process's
  order; the other ranks get None and have nothing more to do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from evaluation.attacks import AttackSpec
from evaluation.crafting import assign_attacks, craft_set
from evaluation.sets import AdvSet, Sets, extract_paths
from training.distributed import Rank, gather_to_main

log = logging.getLogger(__name__)

#: Rough cost of one Square query, in gradient evaluations (a forward pass ~ 1/3); the other
#: attacks' costs per image are :attr:`evaluation.catalogue.AttackKind.cost`.
SQUARE_COST_PER_QUERY = 1 / 3


@dataclass(frozen=True)
class Side:
    """What one side of the job asks for: clean images x (N, C, H, W) in [0, 1] with labels
    y (N,), the attacks, their seed, and ``per_image`` as in
    :func:`evaluation.crafting.craft_sets`."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    specs: list[AttackSpec]
    seed: int
    per_image: int | None


@dataclass(frozen=True)
class Job:
    """One attack of one side on the images ``idx`` (indices into the side's x)."""

    side: int  # index into the sides
    spec: AttackSpec
    idx: np.ndarray


def plan(sides: list[Side]) -> list[Job]:
    """Every non-empty attack of every side, in the single process's order."""
    jobs = []
    for i, side in enumerate(sides):
        assigned = assign_attacks(len(side.y), side.specs, seed=side.seed,
                                  per_image=side.per_image)
        jobs += [Job(i, spec, assigned[spec.label]) for spec in side.specs
                 if len(assigned[spec.label])]
    return jobs


def job_cost(job: Job, square_queries: int) -> float:
    """Estimated cost of ``job``: images x gradient evaluations per image (>= 0)."""
    per_image = (square_queries * SQUARE_COST_PER_QUERY if job.spec.name == "square"
                 else job.spec.kind.cost)
    return len(job.idx) * per_image


def share(costs: list[float], world: int) -> list[list[int]]:
    """Job indices per rank: longest first, each to the rank with the least work so far (ties
    to the lowest rank); every index in exactly one list."""
    loads = [0.0] * world
    shares: list[list[int]] = [[] for _ in range(world)]
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shares[r].append(j)
        loads[r] += costs[j]
    return shares


def craft_across_ranks(model: nn.Module, sides: list[Side], rank: Rank, *,
                       square_queries: int) -> list[Sets] | None:
    """The sets :func:`evaluation.crafting.craft_sets` makes for each side, crafted across the
    ranks; on rank 0 (in ``sides``' order), None elsewhere. Every rank must call it with the
    same arguments."""
    jobs = plan(sides)
    mine = share([job_cost(j, square_queries) for j in jobs], rank.world)[rank.rank]
    clean = [extract_paths(model, s.x) for s in sides] if rank.main else []
    done: dict[int, AdvSet] = {}
    for j in sorted(mine):
        side, job = sides[jobs[j].side], jobs[j]
        done[j] = craft_set(model, side.x, side.y, job.spec, job.idx, seed=side.seed,
                            square_queries=square_queries)
    gathered = gather_to_main(done, rank)
    if gathered is None:
        return None
    results = {j: (r, s) for r, part in enumerate(gathered) for j, s in part.items()}
    out = [Sets(s.x, s.y, paths) for s, paths in zip(sides, clean, strict=True)]
    for j, job in enumerate(jobs):
        r, out[job.side].adversarial[job.spec.label] = results[j]
        log.info("%s %s: crafted on rank %d", sides[job.side].name, job.spec.label, r)
    return out
