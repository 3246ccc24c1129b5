"""Choosing between masked and sparse execution by timing both on the machine that serves.

Sparse execution (:mod:`detector.sparse`) pays only where the convolutions are large next to
the fixed cost of slicing and of the gates, which depends on the network, the batch size, the
CPU and its thread count (``docs/RESULTS.md`` section 4). :func:`plan_execution` measures instead
of guessing: it runs a caller-given analysis in both modes on random images, interleaved, at
batch 1 and at a larger batch, and keeps sparse where it is clearly faster (by more than
``margin``), masked, the reference, otherwise: on the small committed models the two differ by a
few percent, within the noise, and a coin flip at every start-up would make latency less
predictable. Both modes give the same predictions and paths up to float rounding, so the choice
changes only the latency.

:func:`median_times_ms` is the one timing loop (interleaved runs, medians) behind the plan and
behind ``benchmarks/speed.py``, which times more variants (dense twin, path recording, pruning).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from detector.analysis import EXECUTIONS

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: latency; ``cpu``: CPU time of this process (robust to other processes on a shared
machine; equals the latency with one thread and nothing else running)."""


@dataclass(frozen=True)
class ExecutionPlan:
    """The execution mode for batches of one image (``single``) and of more (``batched``).

    timings_ms: {batch size: {mode: median milliseconds}} as measured (empty if not measured).
    """

    single: str
    batched: str
    timings_ms: dict[int, dict[str, float]]

    @classmethod
    def from_timings(cls, timings_ms: dict[int, dict[str, float]],
                     margin: float = 0.1) -> ExecutionPlan:
        """The plan for measured ``{batch size: {"masked": ms, "sparse": ms}}``: per size, sparse
        if its time is below ``(1 - margin)`` times masked's, else masked; the smallest size
        decides ``single``, the largest ``batched``."""
        _check_margin(margin)
        if not timings_ms:
            raise ValueError("no timings given")

        def choose(batch: int) -> str:
            t = timings_ms[batch]
            return "sparse" if t["sparse"] < (1.0 - margin) * t["masked"] else "masked"

        return cls(choose(min(timings_ms)), choose(max(timings_ms)), timings_ms)

    def for_batch(self, n: int) -> str:
        """The mode that runs a batch of ``n`` >= 1 images."""
        return self.single if n == 1 else self.batched

    def describe(self) -> str:
        """One line for logs, e.g. ``batch 1: sparse (masked 1.02 ms, sparse 0.61 ms); ...``."""
        smallest = min(self.timings_ms, default=1)
        return "; ".join(
            f"batch {batch}: {self.single if batch == smallest else self.batched} ("
            + ", ".join(f"{m} {t:.2f} ms" for m, t in times.items()) + ")"
            for batch, times in sorted(self.timings_ms.items()))


def fixed_plan(mode: str) -> ExecutionPlan:
    """A plan that always uses ``mode`` (one of :data:`detector.analysis.EXECUTIONS`)."""
    if mode not in EXECUTIONS:
        raise ValueError(f"execution must be one of {EXECUTIONS}, got {mode!r}")
    return ExecutionPlan(mode, mode, {})


def plan_execution(run: Callable[[torch.Tensor, str], object],
                   input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 32),
                   repeats: int = 9, seed: int = 0, margin: float = 0.1) -> ExecutionPlan:
    """Time ``run(images, mode)`` for every mode of :data:`~detector.analysis.EXECUTIONS`.

    ``input_shape``: (C, H, W); images are uniform in [0, 1] (seeded), ``repeats`` >= 1 timed
    calls per mode and batch size after one untimed warm-up call, modes interleaved; medians of
    wall time on this thread, so set the thread count first. ``batch_sizes``: the smallest
    decides ``single``, the largest ``batched`` (give 1 and the largest batch served).
    Sparse is chosen where its median is below ``(1 - margin)`` times masked's, margin in [0, 1).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    _check_margin(margin)
    sizes = sorted(set(batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    generator = torch.Generator().manual_seed(seed)
    timings: dict[int, dict[str, float]] = {}
    for batch in sizes:
        images = torch.rand(batch, *input_shape, generator=generator)
        runs = {mode: (lambda x, mode=mode: run(x, mode)) for mode in EXECUTIONS}
        timings[batch] = median_times_ms(runs, [images], repeats)
    return ExecutionPlan.from_timings(timings, margin)


def median_times_ms(runs: Mapping[str, Callable[[torch.Tensor], object]],
                    inputs: Sequence[torch.Tensor], repeats: int, warmup: int = 1,
                    clock: str = "wall") -> dict[str, float]:
    """Median milliseconds per call of each of ``runs`` ({name: f(batch)}), interleaved.

    Each run first gets ``warmup`` >= 0 untimed calls (first calls allocate and pick kernels) on
    ``inputs[0], inputs[1], ...`` (cycled); then ``repeats`` >= 1 rounds, round r calling every
    run once on ``inputs[r % len(inputs)]``, so background load hits every run alike.
    ``clock``: a key of :data:`CLOCKS`. The calls run as given (no grad mode is set here).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if not inputs:
        raise ValueError("no inputs to time on")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    for f in runs.values():
        for i in range(warmup):
            f(inputs[i % len(inputs)])
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        x = inputs[r % len(inputs)]
        for name, f in runs.items():
            start = now()
            f(x)
            samples[name].append(now() - start)
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def _check_margin(margin: float) -> None:
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
