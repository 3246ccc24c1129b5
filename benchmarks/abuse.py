"""Abuse benchmark (issue 20): valid traffic at a fixed rate, with and without abusive clients.

Starts ``python -m service`` (:mod:`benchmarks.harness`) on a bundle with an API key and
default limits, warms it up, records its resident memory (RSS), then runs two phases of the
same valid traffic (PNG images to ``/classify``, 4 at a time to ``/classify/batch``, exact
tensors to ``/v2/models/{name}/infer``, at ``--rate`` requests/s, open loop) while a poller
asks ``/v2/health/live`` every 20 ms:

1. **baseline**: the valid traffic alone;
2. **abuse**: the same traffic while :mod:`benchmarks.abusers` (in another process) runs one
   client per class of issue 20 (response amplification, decode-cost bombs, a PNG of 400,000
   chunks, unauthenticated 8 MB bodies, made-up 2 KB method names and metrics scrapes,
   trailing-slash requests with a hostile Host header, unparseable bodies) one request at a
   time, and holds ``--slow`` silent, header-trickling and body-trickling connections each.

Reports valid-request p50/p99 in both phases, the health check's worst latency, 5xx counts
(valid and abusive), failed valid requests, peak RSS against the post-warm-up RSS (the
kernel's high-water mark, reset after warm-up) and the abusive answers by class. Exits 1 if
any criterion of issue 20 fails: a 5xx, a failed valid request, health worst >= 1 s, abuse p99
> 3x baseline p99, peak RSS > 1.5x post-warm-up.

    python benchmarks/abuse.py --bundle models/mnist/bundle
    python benchmarks/abuse.py --bundle models/cifar10/bundle --json abuse-cifar.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.abusers import Target, abuser_process, describe  # noqa: E402
from benchmarks.harness import Server, serving  # noqa: E402
from benchmarks.load import encode_image, percentiles_ms  # noqa: E402

log = logging.getLogger("abuse")
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


def _rss_kb(pid: int, field: str) -> int:
    """VmRSS or VmHWM (peak) of a process, in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def _reset_peak(pid: int) -> bool:
    """Reset the kernel's peak-RSS mark of ``pid`` to its current RSS; False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class _PeakSampler:
    """The largest RSS of a process, sampled every 20 ms in a thread (a fallback for when
    the kernel's mark cannot be reset)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, _rss_kb(self.pid, "VmRSS"))

    def start(self) -> _PeakSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop sampling; the peak in KiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_kb


def _model(server: Server, key: str) -> tuple[str, tuple[int, int, int]]:
    """The served model's name (from /metrics) and input shape (C, H, W)."""
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    name = metrics.split('pathguard_model_info{name="', 1)[1].split('"', 1)[0]
    card = httpx.get(f"{server.url}/v2/models/{name}", headers={"X-API-Key": key},
                     timeout=10).json()
    c, h, w = card["inputs"][0]["shape"][1:]
    return name, (c, h, w)


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
    rss_warm = _rss_kb(server.pid, "VmRSS")
    exact_peak = _reset_peak(server.pid)
    sampler = _PeakSampler(server.pid).start()
    log.info("baseline: %g requests/s for %g s", rate, duration_s)
    baseline = asyncio.run(_traffic(server.url, key, model, shape, rate, duration_s, pngs))
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
    sampled_peak = sampler.stop()
    rss_peak = _rss_kb(server.pid, "VmHWM") if exact_peak else sampled_peak
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
            "rss_post_warmup_mb": rss_warm / 1024, "rss_peak_mb": rss_peak / 1024,
            "abusive_answers": answers, "checks": checks, "passed": all(checks.values())}


def _report(result: dict[str, Any]) -> str:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, action="append",
                   help="bundle directory (repeatable; default: the committed MNIST and "
                        "CIFAR-10 bundles)")
    p.add_argument("--rate", type=float, default=20.0, help="valid requests per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up traffic")
    p.add_argument("--slow", type=int, default=20, help="connections held by each kind of "
                   "slow client")
    p.add_argument("--pause", type=float, default=0.05, help="seconds each abusive client "
                   "waits between requests")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bundles = args.bundle or [ROOT / "models/mnist/bundle", ROOT / "models/cifar10/bundle"]
    results = [run(b, args.rate, args.duration, args.warmup, args.slow, args.pause)
               for b in bundles]
    for result in results:
        log.info("\n%s", _report(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
