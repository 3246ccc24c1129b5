"""The abuse benchmark (issue 20): valid traffic at a fixed rate, with and without abusive
clients, against a real server.

After a warm-up, two phases of the same valid traffic (PNG images to ``/classify``, 4 at a time
to ``/classify/batch``, exact tensors to ``/v2/models/{name}/infer``, at ``rate`` requests/s,
open loop) run while a poller asks ``/v2/health/live`` every 20 ms:

1. **baseline**: the valid traffic alone;
2. **abuse**: the same traffic while :mod:`loadtest.abusers` (in another process) runs one
   client per class of issue 20 (response amplification, decode-cost bombs, a PNG of 400,000
   chunks, unauthenticated 8 MB bodies, made-up 2 KB method names and metrics scrapes,
   trailing-slash requests with a hostile Host header, unparseable bodies) one request at a
   time, and holds ``slow`` silent, header-trickling and body-trickling connections each.

:func:`measure` reports valid-request p50/p99 in both phases, the health check's worst latency,
5xx counts (valid and abusive), failed valid requests, peak RSS against the post-warm-up RSS
of the server with its inference workers (the kernel's high-water marks, reset after warm-up
and summed; sampled where they cannot be reset) and the abusive answers by class, with the
criteria of issue 20: no 5xx, no failed valid request, health worst < 1 s, abuse p99 <= 3x
baseline p99, peak RSS <= 1.5x post-warm-up.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.abusers import Target, abuser_process, describe
from loadtest.bodies import encode_image
from loadtest.process_stats import PeakSampler, reset_tree_peak_rss, tree_peak_rss, tree_rss
from loadtest.server import Server, serving
from loadtest.summary import percentiles_ms

log = logging.getLogger(__name__)
#: The API key of the server :func:`run` starts.
KEY = "abuse-bench-key"


@dataclass
class Phase:
    """What one phase measured."""

    requests: int
    failed: int
    server_errors: int
    p50_ms: float
    p99_ms: float
    health_worst_ms: float
    abusive_5xx: int = 0


def _pngs(shape: tuple[int, int, int], n: int, seed: int = 0) -> list[bytes]:
    c, h, w = shape
    rng = np.random.default_rng(seed)
    return [encode_image(rng.integers(0, 256, (h, w, c), dtype=np.uint8)) for _ in range(n)]


def _valid_request(i: int, model: str, shape: tuple[int, int, int], pngs: list[bytes]
                   ) -> tuple[str, dict[str, Any]]:
    """Request i of the valid mix: 70 % /classify, 20 % infer, 10 % /classify/batch."""
    kind = i % 10
    if kind < 7:
        return "/classify?layers=false", {"files": {"file": ("d.png", pngs[i % len(pngs)],
                                                             "image/png")}}
    if kind < 9:
        data = np.random.default_rng(i).random(int(np.prod(shape))).round(4).tolist()
        return f"/v2/models/{model}/infer", {"json": {"inputs": [
            {"name": "input", "shape": [1, *shape], "datatype": "FP32", "data": data}]}}
    files = [("files", (f"{j}.png", pngs[(i + j) % len(pngs)], "image/png")) for j in range(4)]
    return "/classify/batch?layers=false", {"files": files}


async def _traffic(url: str, key: str, model: str, shape: tuple[int, int, int], rate: float,
                   duration_s: float, pngs: list[bytes]) -> Phase:
    """Valid requests at ``rate`` per second for ``duration_s`` s, and the health poller."""
    latencies: list[float] = []
    failed = server_errors = 0
    worst_health = 0.0
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=60.0,
                                 limits=limits) as client, \
            httpx.AsyncClient(base_url=url, timeout=60.0) as health:

        async def one(i: int) -> None:
            nonlocal failed, server_errors
            path, kwargs = _valid_request(i, model, shape, pngs)
            start = time.perf_counter()
            try:
                r = await client.post(path, **kwargs)
            except httpx.HTTPError:
                failed += 1
                return
            latencies.append(time.perf_counter() - start)
            failed += r.status_code != 200
            server_errors += r.status_code >= 500

        async def poll() -> None:
            nonlocal worst_health, server_errors
            while not stop.is_set():
                start = time.perf_counter()
                r = await health.get("/v2/health/live")
                worst_health = max(worst_health, time.perf_counter() - start)
                server_errors += r.status_code >= 500
                await asyncio.sleep(0.02)

        poller = asyncio.create_task(poll())
        t0 = time.perf_counter()
        tasks = []
        for i in range(int(rate * duration_s)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        stop.set()
        await poller
    ms = percentiles_ms(latencies)
    return Phase(requests=len(tasks), failed=failed, server_errors=server_errors,
                 p50_ms=ms["p50"], p99_ms=ms["p99"], health_worst_ms=worst_health * 1e3)


def _model(server: Server, key: str) -> tuple[str, tuple[int, int, int]]:
    """The served model's name (from /metrics) and input shape (C, H, W)."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    name = metrics.split('pathguard_model_info{name="', 1)[1].split('"', 1)[0]
    card = httpx.get(f"{server.url}/v2/models/{name}", headers={"X-API-Key": key},
                     timeout=10).json()
    c, h, w = card["inputs"][0]["shape"][1:]
    return name, (c, h, w)


def _abused(server: Server, key: str, model: str, shape: tuple[int, int, int], rate: float,
            duration_s: float, pause_s: float, slow: int, pngs: list[bytes]
            ) -> tuple[Phase, dict[str, int]]:
    """The valid traffic while the abusive clients run in another process; the phase and the
    abusive answers by ``class:answer``."""
    host, port = server.url.removeprefix("http://").split(":")
    target = Target(host, int(port), model, shape, key)
    ctx = multiprocessing.get_context("spawn")
    channel = ctx.Queue()
    process = ctx.Process(target=abuser_process, args=(target, duration_s, pause_s, slow,
                                                       channel))
    process.start()
    try:
        if channel.get(timeout=120) != "ready":
            raise RuntimeError("the abusive clients did not start")
        log.info("abuse: the same traffic and the abusive clients")
        abuse = asyncio.run(_traffic(server.url, key, model, shape, rate, duration_s, pngs))
        answers = channel.get(timeout=duration_s + 120)
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return abuse, answers


def run(bundle: Path, rate: float, duration_s: float, warmup_s: float, slow: int,
        pause_s: float) -> dict[str, Any]:
    """Start the server on ``bundle`` (with an API key) and :func:`measure` it."""
    with serving(bundle, env={"PATHGUARD_API_KEY": KEY}) as server:
        result = measure(server, KEY, rate, duration_s, warmup_s, slow, pause_s)
    return {"bundle": str(bundle), **result}


def measure(server: Server, key: str, rate: float, duration_s: float, warmup_s: float,
            slow: int, pause_s: float) -> dict[str, Any]:
    """Both phases against a running server whose API key is ``key``; the measurements and
    the verdict."""
    model, shape = _model(server, key)
    pngs = _pngs(shape, 64)
    log.info("%s: model %s %s, warm-up %g s", server.url, model, shape, warmup_s)
    asyncio.run(_traffic(server.url, key, model, shape, rate, warmup_s, pngs))
    rss_warm = tree_rss(server.pid)  # the server and its inference workers
    exact_peak = reset_tree_peak_rss(server.pid)
    with PeakSampler(lambda: tree_rss(server.pid), every=0.02) as sampler:
        log.info("baseline: %g requests/s for %g s", rate, duration_s)
        baseline = asyncio.run(_traffic(server.url, key, model, shape, rate, duration_s, pngs))
        abuse, answers = _abused(server, key, model, shape, rate, duration_s, pause_s, slow,
                                 pngs)
    rss_peak = tree_peak_rss(server.pid) if exact_peak else sampler.peak
    abuse.abusive_5xx = sum(n for k, n in answers.items() if k.rsplit(":", 1)[1][:1] == "5")
    checks = {
        "no 5xx": baseline.server_errors + abuse.server_errors + abuse.abusive_5xx == 0,
        "no failed valid request": baseline.failed + abuse.failed == 0,
        "health worst < 1 s": abuse.health_worst_ms < 1000,
        "abuse p99 <= 3x baseline p99": abuse.p99_ms <= 3 * baseline.p99_ms,
        "peak RSS <= 1.5x post-warm-up": rss_peak <= 1.5 * rss_warm,
        "server alive": server.proc.poll() is None,
    }
    return {"model": model, "rate": rate, "duration_s": duration_s,
            "baseline": asdict(baseline), "abuse": asdict(abuse),
            "rss_post_warmup_mb": rss_warm / 2**20, "rss_peak_mb": rss_peak / 2**20,
            "abusive_answers": answers, "checks": checks, "passed": all(checks.values())}


def report(result: dict[str, Any]) -> str:
    """The human-readable results of one bundle (:func:`run`'s or :func:`measure`'s)."""
    b, a = result["baseline"], result["abuse"]
    lines = [f"{result.get('bundle', '')} ({result['model']}), {result['rate']:g} valid requests/s "
             f"for {result['duration_s']:g} s per phase",
             f"  valid p50 / p99: baseline {b['p50_ms']:.1f} / {b['p99_ms']:.1f} ms, abuse "
             f"{a['p50_ms']:.1f} / {a['p99_ms']:.1f} ms ({a['p99_ms'] / b['p99_ms']:.2f}x)",
             f"  health worst: baseline {b['health_worst_ms']:.0f} ms, abuse "
             f"{a['health_worst_ms']:.0f} ms",
             f"  5xx: valid {b['server_errors'] + a['server_errors']}, abusive "
             f"{a['abusive_5xx']}; failed valid: {b['failed'] + a['failed']} of "
             f"{b['requests'] + a['requests']}",
             f"  RSS post-warm-up {result['rss_post_warmup_mb']:.0f} MB, peak "
             f"{result['rss_peak_mb']:.0f} MB "
             f"({result['rss_peak_mb'] / result['rss_post_warmup_mb']:.2f}x)",
             "  abusive answers:", describe(result["abusive_answers"])]
    lines += [f"  {'ok  ' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()]
    return "\n".join(lines)
