"""An async micro-batcher: concurrent requests share one forward pass, off the event loop.

Requests :meth:`MicroBatcher.submit` image tensors; a collector task hands the queued ones,
up to ``max_batch`` images, to a free inference worker (the executor's process or thread) as one
stacked batch, and gives each request its own rows of the result. While all workers are busy,
new requests queue up, so under load batches grow by themselves; an idle batcher waits at
most ``max_wait_s`` for company (0: runs what is queued at once, no added latency).
``max_batch=1`` turns merging off (one forward pass per request, same queueing). A request is
never split; one larger than ``max_batch`` runs as a batch of its own.

Backpressure: at most ``max_pending`` images may be queued or running; beyond it
:meth:`submit` raises :class:`OverloadedError` at once.

Shutdown: :meth:`close` refuses new work but drains what is queued (without waiting for
company) and waits for running forward passes, so no accepted request is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from detector.analysis import Analysis

log = logging.getLogger(__name__)


class OverloadedError(RuntimeError):
    """The queue is full; the caller should retry later."""


def admit(n: int, *, pending: int, limit: int, closing: bool) -> None:
    """Admission of a request of ``n`` images with ``pending`` images queued or running:
    raises :class:`OverloadedError` when the batcher is closing or ``limit`` would be passed."""
    if closing:
        raise OverloadedError("the server is shutting down")
    if pending + n > limit:
        raise OverloadedError(f"the server is at capacity ({pending} images queued or "
                              f"running, limit {limit})")


@dataclass(frozen=True)
class BatchResult:
    """One request's rows of a forward pass.

    analysis: the request's n rows; batch_size: images in the forward pass it shared;
    queue_s: seconds from submission to the start of the forward pass; inference_s: seconds
    the forward pass (with the detector) took.
    """

    analysis: Analysis
    batch_size: int
    queue_s: float
    inference_s: float


@dataclass
class _Item:
    images: torch.Tensor
    future: asyncio.Future[BatchResult]
    submitted: float


class Batcher(Protocol):
    """What the routes need of a batcher: :class:`MicroBatcher`, or under Ray Serve
    :class:`service.serve_batching.ServeBatcher`."""

    @property
    def pending(self) -> int:
        """Images queued or in a running forward pass."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, images: torch.Tensor) -> BatchResult:
        """images: (n, C, H, W) float32 in [0, 1] -> this request's rows (or OverloadedError)."""
        ...


class BatcherFactory(Protocol):
    """Builds the batcher in the lifespan; the keyword arguments are :class:`MicroBatcher`'s."""

    def __call__(self, run: Callable[[torch.Tensor], Analysis], executor: Executor, *,
                 max_batch: int, max_wait_s: float, max_pending: int, workers: int,
                 on_batch: Callable[[Analysis, float], None] | None) -> Batcher: ...


class MicroBatcher:
    """Queue of image batches in front of ``run``: (N, C, H, W) float32 -> Analysis of N rows.

    ``run`` is called in ``executor``; ``on_batch(analysis, seconds)`` is called on the event
    loop after each forward pass (for metrics). Use between :meth:`start` and :meth:`close`.
    """

    def __init__(self, run: Callable[[torch.Tensor], Analysis], executor: Executor, *,
                 max_batch: int = 32, max_wait_s: float = 0.0, max_pending: int = 256,
                 workers: int = 1,
                 on_batch: Callable[[Analysis, float], None] | None = None) -> None:
        if max_batch < 1 or max_pending < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError(f"invalid batcher limits: max_batch={max_batch}, max_pending="
                             f"{max_pending}, workers={workers}, max_wait_s={max_wait_s}")
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_pending = max_pending
        self._workers = workers
        self._on_batch = on_batch
        self._queue: deque[_Item] = deque()
        self._queued_images = 0
        self._pending = 0
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(workers)
        self._collector: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def pending(self) -> int:
        """Images queued or in a running forward pass."""
        return self._pending

    async def start(self) -> None:
        """Start the collector task (idempotent)."""
        if self._collector is None:
            self._collector = asyncio.create_task(self._collect(), name="micro-batcher")

    async def close(self) -> None:
        """Refuse new work, run everything queued, wait for running passes, then stop.

        Queued requests are not failed: they run at once (an idle batcher no longer waits for
        company) and get their results. Only if the collector is gone (it never started or
        died) are queued requests failed with :class:`OverloadedError`.
        """
        self._closing = True
        self._wakeup.set()
        collector = self._collector
        waiting: set[asyncio.Future[Any]] = {item.future for item in self._queue}
        while waiting and collector is not None and not collector.done():
            _, waiting = await asyncio.wait({*waiting, collector},
                                            return_when=asyncio.FIRST_COMPLETED)
            waiting.discard(collector)
        if collector is not None:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            self._collector = None
        while self._queue:
            item = self._queue.popleft()
            self._queued_images -= len(item.images)
            self._pending -= len(item.images)
            if not item.future.done():
                item.future.set_exception(OverloadedError("the server is shutting down"))
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def submit(self, images: torch.Tensor) -> BatchResult:
        """images: (n, C, H, W) float32 in [0, 1] -> this request's result rows.

        Raises :class:`OverloadedError` if the queue cannot take n more images, and whatever
        ``run`` raised for the batch.
        """
        n = len(images)
        admit(n, pending=self._pending, limit=self.max_pending, closing=self._closing)
        if self._collector is None:
            raise RuntimeError("MicroBatcher.submit before start()")
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(images, future, time.perf_counter()))
        self._queued_images += n
        self._pending += n
        self._wakeup.set()
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                while not self._queue:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                if self.max_wait_s > 0:
                    deadline = loop.time() + self.max_wait_s
                    while self._queued_images < self.max_batch and not self._closing:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        self._wakeup.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wakeup.wait(), remaining)
                batch = self._take()
            except BaseException:
                self._slots.release()
                raise
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._forward(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _take(self) -> list[_Item]:
        """Queued items up to ``max_batch`` images (at least one); cancelled ones dropped."""
        batch: list[_Item] = []
        size = 0
        while self._queue:
            item = self._queue[0]
            n = len(item.images)
            if item.future.done():  # the client went away
                self._queue.popleft()
                self._queued_images -= n
                self._pending -= n
                continue
            if batch and size + n > self.max_batch:
                break
            self._queue.popleft()
            self._queued_images -= n
            batch.append(item)
            size += n
        return batch

    async def _forward(self, batch: list[_Item]) -> None:
        sizes = [len(item.images) for item in batch]
        total = sum(sizes)
        try:
            images = batch[0].images if len(batch) == 1 else torch.cat(
                [item.images for item in batch])  # (B, C, H, W)
            start = time.perf_counter()
            analysis = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, images)
            seconds = time.perf_counter() - start
        except Exception as e:  # the forward pass failed: every request in it fails
            log.exception("forward pass of %d images failed", total)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        finally:
            self._pending -= total
            self._slots.release()
        if self._on_batch is not None:
            self._on_batch(analysis, seconds)
        offset = 0
        for item, n in zip(batch, sizes, strict=True):
            if not item.future.done():
                rows = analysis if len(batch) == 1 else analysis.take(offset, offset + n)
                item.future.set_result(BatchResult(rows, total, start - item.submitted, seconds))
            offset += n
