"""service.batching: concurrent requests share forward passes, rows go back to their owners."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from detector.analysis import Analysis
from service.batching import MicroBatcher, OverloadedError


def fake_analysis(images: torch.Tensor) -> Analysis:
    """An Analysis whose rows identify their input: score = the image's first pixel."""
    n = len(images)
    first = images.reshape(n, -1)[:, 0].numpy().astype(np.float64)
    return Analysis(
        probs=np.tile(first[:, None], (1, 3)), predictions=np.zeros(n, dtype=np.int64),
        scores=first, flagged=first > 0.5, threshold=0.5, layer_names=["a", "b"],
        layer_anomaly=np.zeros((n, 2)), layer_open=np.ones((n, 2), dtype=np.int64),
        layer_filters=np.array([4, 8]), open_fraction=np.full(n, 0.5),
        flops_fraction=np.full(n, 0.25))


def images(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)


class BlockedRun:
    """A batcher's run function that records each batch's size and blocks until ``gate`` is
    set (at most 5 s)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()

    def __call__(self, x: torch.Tensor) -> Analysis:
        self.calls.append(len(x))
        self.gate.wait(5)
        return fake_analysis(x)


def run(coro):
    return asyncio.run(coro)


def test_analysis_take_slices_per_image_arrays_only():
    a = fake_analysis(images([0.1, 0.2, 0.3]))
    part = a.take(1, 3)
    assert len(part) == 2
    np.testing.assert_allclose(part.scores, [0.2, 0.3])
    assert part.layer_open.shape == (2, 2) and part.layer_filters.tolist() == [4, 8]
    assert part.layer_names == ["a", "b"] and part.threshold == 0.5


def test_concurrent_requests_share_one_forward_pass():
    slow = BlockedRun()

    async def main() -> list:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(slow, pool, max_batch=8)
            await batcher.start()
            first = asyncio.create_task(batcher.submit(images([0.0])))
            await asyncio.sleep(0.05)  # the first request is running; the rest queue up
            rest = [asyncio.create_task(batcher.submit(images([v]))) for v in (0.1, 0.2, 0.3)]
            pair = asyncio.create_task(batcher.submit(images([0.4, 0.5])))
            await asyncio.sleep(0.05)
            assert batcher.pending == 6
            slow.gate.set()
            results = await asyncio.gather(first, *rest, pair)
            await batcher.close()
            return results

    results = run(main())
    assert slow.calls == [1, 5]
    assert [r.batch_size for r in results] == [1, 5, 5, 5, 5]
    np.testing.assert_allclose([float(r.analysis.scores[0]) for r in results[:4]],
                               [0.0, 0.1, 0.2, 0.3], atol=1e-6)
    np.testing.assert_allclose(results[4].analysis.scores, [0.4, 0.5], atol=1e-6)


def test_max_batch_and_oversized_requests():
    slow = BlockedRun()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(slow, pool, max_batch=2)
            await batcher.start()
            tasks = [asyncio.create_task(batcher.submit(images([0.0])))]
            await asyncio.sleep(0.05)
            tasks += [asyncio.create_task(batcher.submit(images(v)))
                      for v in ([0.1], [0.2], [0.3], [0.4, 0.5, 0.6])]
            await asyncio.sleep(0.05)
            slow.gate.set()
            await asyncio.gather(*tasks)
            await batcher.close()

    run(main())
    assert slow.calls == [1, 2, 1, 3]  # never split; a request over max_batch runs alone


def test_no_merging_with_max_batch_one():
    calls: list[int] = []

    def record(x: torch.Tensor) -> Analysis:
        calls.append(len(x))
        return fake_analysis(x)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(record, pool, max_batch=1)
            await batcher.start()
            await asyncio.gather(*(batcher.submit(images([0.1])) for _ in range(5)))
            await batcher.close()

    run(main())
    assert calls == [1] * 5


def test_wait_gathers_requests_when_idle():
    calls: list[int] = []

    def record(x: torch.Tensor) -> Analysis:
        calls.append(len(x))
        return fake_analysis(x)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(record, pool, max_batch=4, max_wait_s=0.2)
            await batcher.start()

            async def later(delay: float) -> None:
                await asyncio.sleep(delay)
                await batcher.submit(images([0.1]))

            await asyncio.gather(later(0.0), later(0.02), later(0.04))
            await batcher.close()

    run(main())
    assert calls == [3]


def test_overload_is_refused_at_once():
    slow = BlockedRun()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(slow, pool, max_batch=4, max_pending=3)
            await batcher.start()
            tasks = [asyncio.create_task(batcher.submit(images([0.1, 0.2])))]
            await asyncio.sleep(0.02)
            with pytest.raises(OverloadedError, match="at capacity"):
                await batcher.submit(images([0.3, 0.4]))
            tasks.append(asyncio.create_task(batcher.submit(images([0.5]))))  # fits
            await asyncio.sleep(0.02)
            slow.gate.set()
            await asyncio.gather(*tasks)
            assert batcher.pending == 0
            await batcher.close()

    run(main())


def test_errors_reach_every_request_of_the_batch():
    def broken(x: torch.Tensor) -> Analysis:
        raise ValueError("boom")

    async def main() -> list:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(broken, pool)
            await batcher.start()
            results = await asyncio.gather(batcher.submit(images([0.1])),
                                           batcher.submit(images([0.2])),
                                           return_exceptions=True)
            assert batcher.pending == 0
            await batcher.close()
            return results

    assert all(isinstance(r, ValueError) for r in run(main()))


def test_cancelled_requests_are_skipped():
    slow = BlockedRun()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(slow, pool)
            await batcher.start()
            first = asyncio.create_task(batcher.submit(images([0.1])))
            await asyncio.sleep(0.02)
            gone = asyncio.create_task(batcher.submit(images([0.2, 0.3])))
            kept = asyncio.create_task(batcher.submit(images([0.4])))
            await asyncio.sleep(0.02)
            gone.cancel()
            slow.gate.set()
            await asyncio.gather(first, kept)
            assert batcher.pending == 0
            await batcher.close()

    run(main())
    assert slow.calls == [1, 1]


def test_close_drains_queued_requests_and_refuses_new_ones():
    """Shutdown drops nothing accepted: the running pass finishes, the queued requests run
    next (without the idle wait for company), and only submissions after close() are refused."""
    slow = BlockedRun()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(slow, pool, max_wait_s=10.0)
            with pytest.raises(RuntimeError, match="before start"):
                await batcher.submit(images([0.1]))
            await batcher.start()
            running = asyncio.create_task(batcher.submit(images([0.1])))
            await asyncio.sleep(0.02)  # waiting for company up to 10 s
            assert slow.calls == []
            closing = asyncio.create_task(batcher.close())
            await asyncio.sleep(0.05)  # close() ends the wait: the first pass runs
            assert slow.calls == [1]
            queued = [asyncio.create_task(batcher.submit(images([v])))
                      for v in (0.2, 0.3)]
            await asyncio.sleep(0.02)
            assert all(isinstance(t.exception(), OverloadedError) for t in queued)
            slow.gate.set()
            await asyncio.wait_for(closing, 5)
            assert (await running).analysis.scores.tolist() == pytest.approx([0.1])
            assert batcher.pending == 0

    run(main())


def test_close_runs_requests_queued_behind_a_running_pass():
    slow = BlockedRun()

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(slow, pool)
            await batcher.start()
            running = asyncio.create_task(batcher.submit(images([0.1])))
            await asyncio.sleep(0.02)
            queued = [asyncio.create_task(batcher.submit(images([v]))) for v in (0.2, 0.3)]
            await asyncio.sleep(0.02)
            closing = asyncio.create_task(batcher.close())
            await asyncio.sleep(0.02)
            assert not closing.done()
            slow.gate.set()
            await asyncio.wait_for(closing, 5)
            assert (await running).batch_size == 1
            results = [await t for t in queued]
            assert [r.analysis.scores[0] for r in results] == pytest.approx([0.2, 0.3])
            assert [r.batch_size for r in results] == [2, 2]  # merged into one pass
            assert batcher.pending == 0

    run(main())
    assert slow.calls == [1, 2]
