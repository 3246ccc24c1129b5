"""Where the server's forward passes run: a worker process with its own copy of the bundle
(``process``, the default), or a thread of the server process (``thread``).

Python runs one thread of a process at a time. In ``thread`` mode the inference thread shares
that lock with the event loop, which parses every request (HTTP framing, multipart bodies,
JSON) and with the image decoders: a forward pass at batch 1 is a few hundred small torch
operations, and it waits for the lock before each of them while the loop works through large
bodies, so other clients' traffic lengthens its latency (docs/SECURITY.md, abuse benchmark).
In ``process`` mode the passes run in worker processes (``PATHGUARD_INFERENCE_WORKERS`` of
them, each loading the bundle itself), which hold their own lock; the server process sends
them the decoded images (N, C, H, W) and gets the :class:`~detector.analysis.Analysis` back,
both pickled (about 12 KB per CIFAR-10 image).

Workers are started from a fork server where the platform has one (a clean single-threaded
process: starting a worker costs a fork and the bundle load), else spawned. They ignore
SIGINT and SIGTERM: the server process shuts them down after draining its queue. A worker
that dies (killed, out of memory) breaks the pool: the requests in flight fail, the service
reports itself not ready (``/v2/health/ready``) and answers 503 until it is restarted.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from detector.analysis import Analysis
from detector.bundle import Bundle, load_bundle
from detector.execution import ExecutionPlan
from service.config import InferenceMode

#: The bundle and execution plan of this worker process, set once by :func:`_start_worker`
#: (process mode only; the server process never sets it).
_worker: tuple[Bundle, ExecutionPlan] | None = None


def analyze_with_plan(bundle: Bundle, plan: ExecutionPlan, images: torch.Tensor) -> Analysis:
    """images: (N, C, H, W) float32 in [0, 1] -> the bundle's analysis, in the plan's mode."""
    return bundle.analyze(images, execution=plan.for_batch(len(images)))


def inference_pool(mode: InferenceMode, bundle: Bundle, plan: ExecutionPlan, workers: int,
                   threads: int) -> tuple[Executor, Callable[[torch.Tensor], Analysis]]:
    """The executor that runs forward passes and the function it runs: images (N, C, H, W)
    float32 in [0, 1] -> Analysis. ``bundle``: the server's loaded bundle (``thread`` mode runs
    it; ``process`` mode's workers load their own from ``bundle.path``); ``threads``:
    torch intra-op threads per worker process. The caller shuts the executor down."""
    if mode == "thread":
        return (ThreadPoolExecutor(workers, thread_name_prefix="pathguard-inference"),
                partial(analyze_with_plan, bundle, plan))
    if mode != "process":
        raise ValueError(f"inference mode must be process or thread, got {mode!r}")
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                   initargs=(bundle.path, plan, threads))
    return executor, _analyze_in_worker


def _start_worker(directory: Path, plan: ExecutionPlan, threads: int) -> None:
    """Process-pool initializer: load the bundle once, leave shutdown to the server."""
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _worker = (load_bundle(directory), plan)


def _analyze_in_worker(images: torch.Tensor) -> Analysis:
    if _worker is None:
        raise RuntimeError("not an inference worker process (no bundle loaded)")
    return analyze_with_plan(*_worker, images)
