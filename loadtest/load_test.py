"""The mixed load test: valid and hostile requests from concurrent clients against a real server,
with latency, memory and CPU measured and a pass/fail verdict.

:func:`run_load_test` starts ``python -m service`` (:func:`loadtest.server.serving`) on a bundle,
or drives one already running at :attr:`LoadTest.url` (e.g. a Ray Serve deployment); warms it
up with the same traffic, records the server's resident memory (RSS), then sends
:attr:`LoadTest.requests` requests drawn by :func:`loadtest.request_mix.plan` and judges the run
(:func:`loadtest.summary.summarize`):

- every valid request got 200 (a 503 from a full queue counts as a failure, listed apart);
- no response was a 5xx and no request failed at the transport level;
- every invalid request got its documented status and error code;
- RSS after the run is within ``max_rss_growth`` of RSS after warm-up;
- the server is still running at the end.

A server at ``url`` is measured (RSS, CPU) only with ``pid`` (a process whose tree holds the
server: ``serve run``'s); without it the RSS criterion is left out, and "still running" means
it still answers ``/v2/health/ready``. Images per forward pass come from ``/metrics`` of a server
started here only (under Ray Serve each scrape reaches one replica). The hostile requests are
sized from the server's limits: :attr:`LoadTest.server_env` must repeat a running server's
non-default ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from detector.bundle import read_manifest
from loadtest.clients import Outcome, drive
from loadtest.metrics import forward_passes
from loadtest.process_stats import PeakSampler, tree_cpu, tree_rss
from loadtest.request_mix import BATCH_IMAGES, INFER_IMAGES, Payloads, Prepared, plan
from loadtest.server import ServerError, answers_ready, serving
from loadtest.summary import Summary, summarize
from service.config import ENV_PREFIX, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadTest:
    """How to load the server; ValueError names a bad value.

    requests: requests in the measured run (>= 1); warmup: requests before RSS is taken as the
    reference (>= 0); concurrency: concurrent clients (>= 1); invalid_fraction: share of
    invalid requests in [0, 1]; threads: the started server's torch threads; timeout: seconds
    per request; max_rss_growth: allowed relative RSS change from warm-up to the end;
    server_env: ``PATHGUARD_*`` settings of the server (given to the one started here; for
    ``url``, the ones it runs with); seed: of the request draw; url: base URL of a running
    server to drive instead of starting one; pid: with ``url``, the process whose tree's RSS
    and CPU to measure.
    """

    requests: int = 5000
    warmup: int = 500
    concurrency: int = 64
    invalid_fraction: float = 0.2
    threads: int = 1
    timeout: float = 60.0
    max_rss_growth: float = 0.10
    server_env: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    url: str | None = None
    pid: int | None = None

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.warmup < 0:
            raise ValueError(f"requests ({self.requests}) and concurrency ({self.concurrency}) "
                             f"must be >= 1, warmup ({self.warmup}) >= 0")
        if not 0.0 <= self.invalid_fraction <= 1.0:
            raise ValueError(f"invalid_fraction must be in [0, 1], got {self.invalid_fraction}")
        bad = [k for k in self.server_env if not k.startswith(ENV_PREFIX)]
        if bad:
            raise ValueError(f"server_env takes {ENV_PREFIX}* settings only, got {bad}")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// base URL, got {self.url!r}")
        if self.pid is not None and (self.url is None or not psutil.pid_exists(self.pid)):
            raise ValueError(f"pid {self.pid}: needs url and a running process")


def server_settings(overrides: Mapping[str, str]) -> dict[str, Any]:
    """The server's limits: :class:`Settings` defaults, then ``PATHGUARD_*`` overrides."""
    values: dict[str, Any] = {name: f.get_default(call_default_factory=True)
                              for name, f in Settings.model_fields.items()}
    for key, value in overrides.items():
        name = key.removeprefix(ENV_PREFIX).lower()
        if key.startswith(ENV_PREFIX) and name in values:
            values[name] = value
    return values


@dataclass
class Measured:
    """What one run measured: outcomes, wall seconds, RSS (bytes, NaN if not measured), CPU
    seconds and images per forward pass (NaN if not measured), and whether the server still
    runs."""

    outcomes: list[Outcome]
    seconds: float
    rss: dict[str, float]
    cpu: dict[str, float]
    alive: bool


def measure(url: str, pid: int | None, warmup: Sequence[Prepared],
            requests: Sequence[Prepared], concurrency: int, timeout: float, *,
            passes: bool, alive: Callable[[], bool]) -> Measured:
    """Warm the server at ``url`` up, drive ``requests`` and measure; RSS and server CPU of
    ``pid``'s process tree (if given), forward passes from ``/metrics`` if ``passes``."""
    nan = float("nan")
    rss_start = tree_rss(pid) if pid is not None else nan
    asyncio.run(drive(url, warmup, concurrency, timeout))
    rss_warm = tree_rss(pid) if pid is not None else nan
    batches = forward_passes(url) if passes else (nan, nan)
    cpu_server = tree_cpu(pid) if pid is not None else nan
    cpu_client = time.process_time()
    if pid is not None:
        with PeakSampler(lambda: tree_rss(pid), every=0.25) as sampler:
            outcomes, seconds = asyncio.run(drive(url, requests, concurrency, timeout))
        peak = sampler.peak
    else:
        outcomes, seconds = asyncio.run(drive(url, requests, concurrency, timeout))
        peak = nan
    cpu = {"server_s": (tree_cpu(pid) if pid is not None else nan) - cpu_server,
           "client_s": time.process_time() - cpu_client}
    rss_after = tree_rss(pid) if pid is not None else nan
    images, n = (b - a for a, b in zip(batches, forward_passes(url) if passes else (nan, nan),
                                       strict=True))
    cpu["forward_passes"], cpu["images_per_pass"] = n, images / max(n, 1) if passes else nan
    rss = {"after_start": float(rss_start), "after_warmup": float(rss_warm),
           "peak": float(peak), "after_run": float(rss_after)}
    return Measured(outcomes, seconds, rss, cpu, alive())


def run_load_test(bundle: Path, images: np.ndarray, labels: np.ndarray, test: LoadTest,
                  source: str = "") -> Summary:
    """Start a server on ``bundle`` (or take ``test.url``'s, which serves ``bundle``), warm it
    up, drive the load and measure; the run's summary.

    images: (N, C, H, W) uint8 test images of the model's input shape; labels: (N,) their
    classes; source: where they come from (for the report). ValueError if the images do not
    fit the model; :class:`~loadtest.server.ServerError` if no server answers at ``test.url``
    or the one started here does not become ready.
    """
    manifest = read_manifest(bundle)
    if tuple(images.shape[1:]) != tuple(manifest.input_shape):
        raise ValueError(f"the test images are {tuple(images.shape[1:])}; the model of {bundle} "
                         f"takes {tuple(manifest.input_shape)}")
    settings = server_settings(test.server_env)
    rng = np.random.default_rng(test.seed)
    payloads = Payloads(images, labels, manifest.name, settings, rng)
    warmup = plan(payloads, test.warmup, test.invalid_fraction, rng)
    requests = plan(payloads, test.requests, test.invalid_fraction, rng)
    worst = test.concurrency * max(BATCH_IMAGES, INFER_IMAGES)
    if worst > int(settings["max_queue"]):
        log.warning("%d clients may hold %d images in flight, over max_queue %s: valid "
                    "requests may get 503", test.concurrency, worst, settings["max_queue"])
    config = {"bundle": str(bundle), "model": manifest.name, "data": source,
              "requests": test.requests, "warmup": test.warmup,
              "concurrency": test.concurrency, "invalid_fraction": test.invalid_fraction,
              "seed": test.seed, "threads": test.threads, "server_env": dict(test.server_env),
              "max_queue": int(settings["max_queue"]), "url": test.url, "pid": test.pid}
    machine = {"cpus": os.cpu_count(), "load_before": list(os.getloadavg()),
               "nice": os.nice(0), "python": platform.python_version(),
               "platform": platform.platform()}
    if test.url is not None:
        url = test.url.rstrip("/")
        if not answers_ready(url):
            raise ServerError(f"no server answers /v2/health/ready at {test.url}")
        m = measure(url, test.pid, warmup, requests, test.concurrency, test.timeout,
                    passes=False, alive=lambda: answers_ready(url))
    else:
        with serving(bundle, env=test.server_env, threads=test.threads) as server:
            m = measure(server.url, server.pid, warmup, requests, test.concurrency,
                        test.timeout, passes=True, alive=lambda: server.proc.poll() is None)
    machine["load_after"] = list(os.getloadavg())
    return summarize(m.outcomes, m.seconds, config, machine, m.rss, m.cpu,
                     test.max_rss_growth, m.alive)
