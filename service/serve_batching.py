"""Request batching by Ray Serve (``serve.batch``), behind the interface of the micro-batcher.

Under Ray Serve each replica's app gets a :class:`ServeBatcher` in place of
:class:`service.batching.MicroBatcher`: concurrent requests of one replica are merged into one
forward pass by Ray Serve's own ``@serve.batch`` queue, counted in images (``batch_size_fn``),
up to ``max_batch`` images, waiting at most ``max_wait_s`` for company, with at most
``workers`` forward passes at once. The forward pass runs in the inference thread pool, never
on the replica's event loop. Backpressure is the micro-batcher's: beyond ``max_pending``
images queued or running, :meth:`ServeBatcher.submit` raises
:class:`~service.batching.OverloadedError` (503 to the client).

Differences from the micro-batcher: a request larger than ``max_batch`` images (possible only
when ``max_files`` exceeds ``max_batch_size``) would be refused by ``serve.batch``, so the
batch limit is raised to the largest request; :meth:`close` refuses new work and waits for the
accepted requests (``serve.batch`` has no drain of its own).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor

import torch
from ray import serve

from detector.analysis import Analysis
from service.batching import BatchResult, admit


def _images(items: list[tuple[torch.Tensor, float]]) -> int:
    """Images in a list of queued (images, submitted) items: ``serve.batch``'s batch size."""
    return sum(len(images) for images, _ in items)


class ServeBatcher:
    """``serve.batch`` in front of ``run``: (N, C, H, W) float32 -> Analysis of N rows.

    Same constructor and methods as :class:`~service.batching.MicroBatcher`; ``max_files``
    is the largest request (images) the batch limit must admit.
    """

    def __init__(self, run: Callable[[torch.Tensor], Analysis], executor: Executor, *,
                 max_batch: int = 32, max_wait_s: float = 0.0, max_pending: int = 256,
                 workers: int = 1, on_batch: Callable[[Analysis, float], None] | None = None,
                 max_files: int = 1) -> None:
        if max_batch < 1 or max_pending < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError(f"invalid batcher limits: max_batch={max_batch}, max_pending="
                             f"{max_pending}, workers={workers}, max_wait_s={max_wait_s}")
        self._run = run
        self._executor = executor
        self._on_batch = on_batch
        self.max_pending = max_pending
        self._pending = 0
        self._closing = False
        self._idle: asyncio.Event | None = None
        self._batched = serve.batch(max_batch_size=max(max_batch, max_files),
                                    batch_wait_timeout_s=max_wait_s,
                                    max_concurrent_batches=workers,
                                    batch_size_fn=_images)(self._pathguard_forward)

    @property
    def pending(self) -> int:
        """Images queued or in a running forward pass."""
        return self._pending

    async def start(self) -> None:
        """Nothing to start: ``serve.batch`` starts its queue on first use."""
        self._idle = asyncio.Event()
        self._idle.set()

    async def close(self) -> None:
        """Refuse new work and wait until every accepted request has its result."""
        self._closing = True
        if self._idle is not None:
            await self._idle.wait()

    async def submit(self, images: torch.Tensor) -> BatchResult:
        """images: (n, C, H, W) float32 in [0, 1] -> this request's result rows.

        Raises :class:`OverloadedError` if closing or if n more images would exceed
        ``max_pending``, and whatever ``run`` raised for the batch.
        """
        n = len(images)
        admit(n, pending=self._pending, limit=self.max_pending, closing=self._closing)
        if self._idle is None:
            raise RuntimeError("ServeBatcher.submit before start()")
        self._pending += n
        self._idle.clear()
        try:
            return await self._batched((images, time.perf_counter()))
        finally:
            self._pending -= n
            if self._pending == 0:
                self._idle.set()

    async def _pathguard_forward(self, items: list[tuple[torch.Tensor, float]]
                                 ) -> list[BatchResult]:
        """One forward pass over the queued requests' images; each request's rows back."""
        sizes = [len(images) for images, _ in items]
        total = sum(sizes)
        batch = items[0][0] if len(items) == 1 else torch.cat(
            [images for images, _ in items])  # (B, C, H, W)
        start = time.perf_counter()
        analysis = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, batch)
        seconds = time.perf_counter() - start
        if self._on_batch is not None:
            self._on_batch(analysis, seconds)
        results, offset = [], 0
        for (_, submitted), n in zip(items, sizes, strict=True):
            rows = analysis if len(items) == 1 else analysis.take(offset, offset + n)
            results.append(BatchResult(rows, total, start - submitted, seconds))
            offset += n
        return results
