"""Load test of the real server next to the bare model, in one run.

Starts ``python -m service`` on a free localhost port, drives ``POST /classify`` with a bounded
load (httpx AsyncClient; concurrency 1, 8 and 32 by default) and reports throughput and
p50/p95/p99 latency, next to ``bundle.analyze`` on one image (median) and on batches of 32, all
with the same pinned thread count. Prints the done-when ratios:

- p50 latency at concurrency 1 / bare single-image time   (target <= 3x)
- throughput at concurrency 32 / at concurrency 1          (target >= 2x)
- throughput at concurrency 32 / bare batched throughput   (target >= 0.25)

Usage::

    python benchmarks/serve.py --bundle runs/digits/detector/bundle
    python benchmarks/serve.py --bundle ... --compare-micro-batch   # on vs off

The client runs in this process and shares the CPU with the server: on a small machine the
numbers include its cost.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from detector.bundle import Bundle, load_bundle
from loadtest.bodies import encode_image
from loadtest.server import serving
from loadtest.throughput import Throughput, classify_request, measure_throughput

log = logging.getLogger("benchmarks.serve")


def sample_png(bundle: Bundle, seed: int = 0) -> bytes:
    """A random image of exactly the model's input size (no resizing on the server)."""
    c, h, w = bundle.spec.input_shape
    return encode_image(np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8))


def bare_times(bundle: Bundle, repeats: int, batch: int) -> tuple[float, float]:
    """Median seconds of bundle.analyze on 1 image, and images/s on batches of ``batch``."""
    c, h, w = bundle.spec.input_shape
    one, many = torch.rand(1, c, h, w), torch.rand(batch, c, h, w)
    for x in (one, many, one, many):
        bundle.analyze(x)
    singles = []
    for _ in range(repeats):
        start = time.perf_counter()
        bundle.analyze(one)
        singles.append(time.perf_counter() - start)
    batches = []
    for _ in range(max(5, repeats // 5)):
        start = time.perf_counter()
        bundle.analyze(many)
        batches.append(time.perf_counter() - start)
    return statistics.median(singles), batch / statistics.median(batches)


def run_server(args: argparse.Namespace, image: bytes, micro_batch: bool) -> list[Throughput]:
    """Start the server with micro-batching on or off; one run per ``--concurrency`` level."""
    env = {"PATHGUARD_MICRO_BATCH": str(micro_batch).lower(),
           "PATHGUARD_BATCH_WAIT_MS": str(args.batch_wait_ms)}
    with serving(args.bundle, env=env, threads=args.threads) as server:
        return [measure_throughput(server.url, classify_request(image), c, args.requests,
                                   server.pid) for c in args.concurrency]


def report(title: str, single: float, batched: float, results: list[Throughput]) -> None:
    print(f"\n{title}")  # noqa: T201
    rows = [f"{'':<24}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'batch':>8}"
            f"{'srv cpu ms/req':>16}{'client cpu ms/req':>19}",
            f"{'bare analyze, 1 image':<24}{1 / single:>10.0f}{single * 1e3:>10.2f}",
            f"{'bare analyze, batch 32':<24}{batched:>10.0f}"]
    rows += [f"{f'/classify c={r.concurrency}':<24}{r.throughput:>10.0f}"
             f"{r.percentile(50) * 1e3:>10.2f}{r.percentile(95) * 1e3:>10.2f}"
             f"{r.percentile(99) * 1e3:>10.2f}{r.mean_batch:>8.1f}"
             f"{r.server_cpu / r.requests * 1e3:>16.2f}{r.client_cpu / r.requests * 1e3:>19.2f}"
             for r in results]
    print("\n".join(rows))  # noqa: T201
    by_c = {r.concurrency: r for r in results}
    lo, hi = min(by_c), max(by_c)
    ratios = [
        (f"p50@c{lo} / bare single", by_c[lo].percentile(50) / single, "<= 3"),
        (f"throughput c{hi} / c{lo}", by_c[hi].throughput / by_c[lo].throughput, ">= 2"),
        (f"throughput c{hi} / bare batched", by_c[hi].throughput / batched, ">= 0.25"),
    ]
    for name, value, target in ratios:
        print(f"  {name:<34}{value:>7.2f}x   (target {target})")  # noqa: T201


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("runs/digits/detector/bundle"))
    p.add_argument("--requests", type=int, default=300, help="per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    p.add_argument("--repeats", type=int, default=100, help="bare single-image timings")
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="the server's PATHGUARD_BATCH_WAIT_MS (default: %(default)s)")
    p.add_argument("--compare-micro-batch", action="store_true",
                   help="run the server with micro-batching on and off")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    bundle = load_bundle(args.bundle)
    single, batched = bare_times(bundle, args.repeats, 32)
    image = sample_png(bundle)
    modes = [True, False] if args.compare_micro_batch else [True]
    for micro_batch in modes:
        log.info("server with micro-batching %s ...", "on" if micro_batch else "off")
        results = run_server(args, image, micro_batch)
        mode = f"on, wait {args.batch_wait_ms:g} ms" if micro_batch else "off"
        report(f"{bundle.name}: {args.threads} thread(s), micro-batching {mode}, "
               f"{args.requests} requests per level",
               single, batched, results)


if __name__ == "__main__":
    main()
