"""Closed-loop throughput and latency of one request at a fixed concurrency, with the server's
CPU and images per forward pass over the same run."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from loadtest.bodies import multipart
from loadtest.clients import drive
from loadtest.metrics import forward_passes
from loadtest.process_stats import tree_cpu
from loadtest.request_mix import Prepared, kind_index


@dataclass(frozen=True)
class Throughput:
    """One run: ``requests`` answered in ``seconds`` by ``concurrency`` clients."""

    concurrency: int
    requests: int
    seconds: float
    latencies: np.ndarray  # (requests,) seconds
    mean_batch: float  # images per forward pass on the server during the run
    server_cpu: float  # CPU seconds the server's process tree used during the run
    client_cpu: float  # CPU seconds this (client) process used during the run

    @property
    def throughput(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0 to 100) of the latencies, in seconds."""
        return float(np.percentile(self.latencies, q))


def classify_request(image: bytes, content_type: str = "image/png") -> Prepared:
    """``POST /classify?layers=false`` of one image file."""
    body, ctype = multipart([("file", "x.png", image, content_type)])
    return Prepared(kind_index("classify"), "/classify?layers=false", body, ctype)


def measure_throughput(url: str, request: Prepared, concurrency: int, requests: int,
                       server_pid: int, timeout: float = 60.0) -> Throughput:
    """``requests`` copies of ``request`` from ``concurrency`` clients (each sends its next
    when its last is answered), after two per client to warm up, against the server at
    ``url`` whose process is ``server_pid``. RuntimeError naming the first answer that is not
    200."""
    asyncio.run(drive(url, [request] * (2 * concurrency), concurrency, timeout))
    images, passes = forward_passes(url)
    cpu_server, cpu_client = tree_cpu(server_pid), time.process_time()
    outcomes, seconds = asyncio.run(drive(url, [request] * requests, concurrency, timeout))
    cpu_server = tree_cpu(server_pid) - cpu_server
    cpu_client = time.process_time() - cpu_client
    images_after, passes_after = forward_passes(url)
    failed = [o for o in outcomes if o.status != 200]
    if failed:
        raise RuntimeError(f"{request.path} answered {failed[0].status} {failed[0].code} "
                           f"({len(failed)} of {len(outcomes)} requests failed)")
    return Throughput(concurrency, requests, seconds, np.array([o.seconds for o in outcomes]),
                      (images_after - images) / max(passes_after - passes, 1), cpu_server,
                      cpu_client)
