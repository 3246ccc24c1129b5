"""Data-parallel training under ``torchrun``: process group, sharded batches, global batch norm.

``torchrun --nproc_per_node N -m training.train ...`` (and ``training.decouple``) starts N
ranks; :func:`process_group` joins them (gloo on CPU, NCCL on GPU, one GPU per rank) and
:func:`training.engine.fit` then trains a ``DistributedDataParallel`` copy on each rank:

- ``--batch-size`` stays the *global* batch: each rank takes ``batch_size / N`` images of every
  step from a :class:`~torch.utils.data.DistributedSampler` (``set_epoch`` each epoch), whose
  permutation is the one a single process shuffles with, so step k of every rank together
  covers exactly the images of a single process's step k;
- batch norm uses the statistics of the global batch (:meth:`Replica.join`, a CPU-capable
  SyncBatchNorm) and DDP averages the gradients, so with the same global batch the weights
  equal a single-process run's up to floating-point summation order, provided the training set
  divides into global batches (otherwise ``DistributedSampler`` pads the last one with repeated
  images) and no randomness is drawn per image while training: augmentation crops and the
  gates' SemHash noise are drawn on each rank from its own generator, the same distribution as
  a single process but not the same draws;
- rank 0 alone shows progress and writes the run directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from training.data import batches_in_order
from training.recipe import Augmentation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rank:
    """This process's place in the group: rank in [0, world), world >= 2."""

    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that shows progress and writes files."""
        return self.rank == 0


def current_rank() -> Rank | None:
    """This process's rank if a process group of two or more is initialised, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Rank(dist.get_rank(), dist.get_world_size())


@contextmanager
def process_group(device: str, timeout: timedelta | None = None
                  ) -> Iterator[tuple[Rank | None, str]]:
    """Join torchrun's group (from ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``) for the block.

    Yields (rank, device): without torchrun or with one process, (None, ``device``) and no
    group; else gloo for a CPU ``device`` and NCCL for ``cuda`` (rank r trains on
    ``cuda:LOCAL_RANK``). Non-zero ranks log warnings only. An already initialised group is
    reused and left open. ``timeout``: how long a collective waits for the other ranks
    (torch's default, 30 minutes for gloo, if None).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        yield None, device
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    rank = current_rank()
    assert rank is not None
    if not rank.main:
        logging.getLogger().setLevel(logging.WARNING)
    log.info("rank %d of %d on %s (%s)", rank.rank, rank.world, device, dist.get_backend())
    try:
        yield rank, device
    finally:
        if owned:
            dist.destroy_process_group()


def gather_to_main(obj: Any, rank: Rank) -> list[Any] | None:
    """Every rank's picklable ``obj``, in rank order, on rank 0; None on the other ranks."""
    gathered: list[Any] | None = [None] * rank.world if rank.main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def local_batch_size(batch_size: int, rank: Rank) -> int:
    """The images of a global batch of ``batch_size`` one rank takes; ValueError unless it
    divides evenly."""
    if batch_size % rank.world:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the number of "
                         f"processes ({rank.world})")
    return batch_size // rank.world


def shard_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: Rank, *,
                  augment: Augmentation | None = None, seed: int = 0, epoch: int = 0
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of every global batch of an epoch, as (images (b, C, H, W) float32 in
    [0, 1], labels (b,)) with b = ``batch_size`` / world.

    x: (N, C, H, W) uint8, y: (N,). The order is :func:`training.data.batches`' shuffle (seed
    + epoch) through a ``DistributedSampler``; alternate flips follow the same per-image draw,
    crops come from a generator of this rank.
    """
    local = local_batch_size(batch_size, rank)
    sampler = DistributedSampler(range(len(y)), num_replicas=rank.world, rank=rank.rank,
                                 shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.int64)
    g = torch.Generator().manual_seed((seed + epoch) * 1_000_003 + rank.rank)
    yield from batches_in_order(x, y, order, local, augment, g, seed=seed, epoch=epoch)


@dataclass
class Replica:
    """One rank's side of :func:`training.engine.fit`: the model, the optimiser's parameters
    that DDP does not hold (``outside``), and the rank. Built by :meth:`join`."""

    model: nn.Module
    outside: list[nn.Parameter]
    rank: Rank

    @classmethod
    def join(cls, model: nn.Module, groups: list[dict[str, Any]], batch_size: int,
             rank: Rank) -> Replica:
        """Check the global batch divides, switch ``model``'s batch norm to global statistics
        (:meth:`leave` switches it back) and find the parameters outside it."""
        local_batch_size(batch_size, rank)
        in_model = {id(p) for p in model.parameters()}
        outside = [p for g in groups for p in g["params"] if id(p) not in in_model]
        for m in model.modules():
            if type(m) in _GLOBAL:
                m.__class__ = _GLOBAL[type(m)]
        return cls(model, outside, rank)

    def leave(self) -> None:
        """Plain batch norm again (the model is then an ordinary single-process model)."""
        for m in self.model.modules():
            if type(m) in _LOCAL:
                m.__class__ = _LOCAL[type(m)]

    def wrap(self) -> DistributedDataParallel:
        """The model in DDP, built again each epoch (trainable parameters may have changed)."""
        device = next(self.model.parameters()).device
        return DistributedDataParallel(
            self.model, device_ids=[device.index] if device.type == "cuda" else None)

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
                augment: Augmentation | None, seed: int, epoch: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`shard_batches` with :func:`training.data.batches`' arguments (always
        shuffled)."""
        assert shuffle
        return shard_batches(x, y, batch_size, self.rank, augment=augment, seed=seed,
                             epoch=epoch)

    def average_outside_gradients(self) -> None:
        """Average the gradients of ``outside`` over the ranks (a missing one counts as 0)."""
        for p in self.outside:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad.div_(self.rank.world)

    def sum_over_ranks(self, sums: dict[str, float]) -> dict[str, float]:
        """Each value summed over the ranks."""
        t = torch.tensor(list(sums.values()), dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(sums, t.tolist(), strict=True))


def _global_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch norm over the global batch: mean and variance reduced over all ranks
    (differentiably), running statistics updated as a single process would."""
    if not self.training:
        return super(type(self), self).forward(x)
    dims = [0, *range(2, x.dim())]
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
    total = dist_fn.all_reduce(torch.cat([x.sum(dims), count]))
    n = total[-1]
    mean = total[:-1] / n  # (C,)
    shape = [1, -1] + [1] * (x.dim() - 2)
    centred = x - mean.view(shape)
    var = dist_fn.all_reduce(centred.pow(2).sum(dims)) / n  # biased, as BN normalises with
    if self.track_running_stats and self.running_mean is not None:
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                        else self.momentum)
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(var.detach() * n / (n - 1), momentum)
    out = centred * torch.rsqrt(var + self.eps).view(shape)
    if self.affine:
        out = out * self.weight.view(shape) + self.bias.view(shape)
    return out


class _GlobalBatchNorm1d(nn.BatchNorm1d):
    forward = _global_bn_forward


class _GlobalBatchNorm2d(nn.BatchNorm2d):
    forward = _global_bn_forward


_GLOBAL: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: _GlobalBatchNorm1d, nn.BatchNorm2d: _GlobalBatchNorm2d}
_LOCAL = {v: k for k, v in _GLOBAL.items()}

