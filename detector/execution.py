"""Choosing between masked and sparse execution by timing both on the machine that serves.

Sparse execution (:mod:`detector.sparse`) pays only where the convolutions are large next to
the fixed cost of slicing and of the gates, which depends on the network, the batch size, the
CPU and its thread count (``docs/RESULTS.md`` section 4). :func:`plan_execution` measures instead
of guessing: it runs a caller-given analysis in both modes on random images, interleaved, at
batch 1 and at a larger batch, and keeps the faster mode for each. Both modes give the same
predictions and paths up to float rounding, so the choice changes only the latency.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from detector.analysis import EXECUTIONS


@dataclass(frozen=True)
class ExecutionPlan:
    """The execution mode for batches of one image (``single``) and of more (``batched``).

    timings_ms: {batch size: {mode: median milliseconds}} as measured (empty if not measured).
    """

    single: str
    batched: str
    timings_ms: dict[int, dict[str, float]]

    def for_batch(self, n: int) -> str:
        """The mode that runs a batch of ``n`` >= 1 images."""
        return self.single if n == 1 else self.batched

    def describe(self) -> str:
        """One line for logs, e.g. ``batch 1: sparse (0.61 vs 1.02 ms masked); ...``."""
        parts = []
        for batch, times in sorted(self.timings_ms.items()):
            best = min(times, key=times.__getitem__)
            rest = ", ".join(f"{t:.2f} ms {m}" for m, t in times.items() if m != best)
            parts.append(f"batch {batch}: {best} ({times[best]:.2f} vs {rest})")
        return "; ".join(parts)


def fixed_plan(mode: str) -> ExecutionPlan:
    """A plan that always uses ``mode`` (one of :data:`detector.analysis.EXECUTIONS`)."""
    if mode not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {mode!r}")
    return ExecutionPlan(mode, mode, {})


def plan_execution(run: Callable[[torch.Tensor, str], object],
                   input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32),
                   repeats: int = 9, seed: int = 0) -> ExecutionPlan:
    """Time ``run(images, mode)`` for every mode of :data:`~detector.analysis.EXECUTIONS`.

    ``input_shape``: (C, H, W); images are uniform in [0, 1] (seeded), ``repeats`` >= 1 timed
    calls per mode and batch size after one untimed warm-up call, modes interleaved; medians of
    wall time on this thread, so set the thread count first. ``batch_sizes``: the smallest
    decides ``single``, the largest ``batched`` (give 1 and the largest batch served).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    generator = torch.Generator().manual_seed(seed)
    timings: dict[int, dict[str, float]] = {}
    for batch in sizes:
        images = torch.rand(batch, *input_shape, generator=generator)
        samples: dict[str, list[float]] = {mode: [] for mode in EXECUTIONS}
        for mode in EXECUTIONS:
            run(images, mode)  # warm-up: first calls allocate and pick kernels
        for _ in range(repeats):
            for mode in EXECUTIONS:
                start = time.perf_counter()
                run(images, mode)
                samples[mode].append(time.perf_counter() - start)
        timings[batch] = {m: 1e3 * statistics.median(s) for m, s in samples.items()}

    def fastest(batch: int) -> str:
        return min(timings[batch], key=timings[batch].__getitem__)

    return ExecutionPlan(fastest(sizes[0]), fastest(sizes[-1]), timings)
