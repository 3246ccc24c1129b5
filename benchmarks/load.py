"""Mixed load on the real server: valid and hostile requests, latency, memory, pass/fail.

Starts ``python -m service`` on a free localhost port (:mod:`loadtest.server`), warms it
up with the same traffic, records the server's resident memory (RSS), then sends a bounded
number of requests from concurrent clients: about 80 % valid (real test images as PNG to
``/classify`` and ``/classify/batch``, exact FP32 tensors to ``/v2/models/{name}/infer``)
and 20 % invalid (empty, truncated, not an image, GIF, wrong field, too many files, a pixel
bomb, a body over the limit, malformed multipart, wrong / out-of-range tensors, unknown model,
not JSON, unknown route, bad query). Reports counts by status and kind, throughput, latency
percentiles of valid requests and RSS after warm-up vs after the run, and exits with status 1
if any criterion fails:

- every valid request got 200 (a 503 from a full queue counts as a failure, listed apart);
- no response was a 5xx and no request failed at the transport level;
- every invalid request got its documented status and error code;
- RSS after the run is within ``--max-rss-growth`` (10 %) of RSS after warm-up;
- the server is still running at the end.

Usage::

    python benchmarks/load.py                                   # models/mnist/bundle, 5,000
    python benchmarks/load.py --bundle runs/digits/detector/bundle --requests 1000 \\
        --concurrency 16 --set PATHGUARD_MAX_QUEUE=64 --json load.json

``--url`` drives a server that is already running instead (e.g. a Ray Serve deployment,
docs/SCALING.md): ``--bundle`` is then the bundle it serves (for the model's name and input
shape) and ``--set`` must repeat the server's non-default limits, since the hostile requests
are sized from them. Its RSS and CPU are measured only with ``--pid`` (a process whose tree
holds the server: ``serve run``'s); without it the RSS criterion is left out, and
"still running" means it still answers ``/v2/health/ready``. Images per forward pass come from
``/metrics`` of the server started here only (under Ray Serve each scrape reaches one replica).

With the defaults a valid request carries at most 4 images, so 64 clients have at most 256
images in flight: exactly the default ``max_queue``, so valid requests never see a 503. The
client runs in this process and shares the CPU with the server.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from detector.bundle import read_manifest
from loadtest.load_test import LoadTest, run_load_test
from loadtest.server import ServerError
from loadtest.summary import report
from service.config import ENV_PREFIX
from training.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "models" / "mnist" / "bundle"
#: Test images for a model input shape when --data is not given.
DEFAULT_DATA = {(1, 28, 28): ROOT.parent / "shared" / "data" / "mnist.npz",
                (3, 32, 32): ROOT.parent / "shared" / "data" / "cifar10.npz",
                (1, 8, 8): "digits"}


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """``PATHGUARD_NAME=VALUE`` pairs -> {name: value}; SystemExit on another form."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith(ENV_PREFIX):
            raise SystemExit(f"--set wants {ENV_PREFIX}NAME=VALUE, got {pair!r}")
        env[key] = value
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                   help="bundle to serve, or with --url the one that server serves (default: "
                        "the committed MNIST bundle)")
    p.add_argument("--url", default=None,
                   help="drive the server already running at this base URL, e.g. "
                        "http://127.0.0.1:8000, instead of starting one (--threads is then "
                        "ignored; pass its non-default limits with --set)")
    p.add_argument("--pid", type=int, default=None,
                   help="with --url: the process whose tree's RSS and CPU to measure (e.g. "
                        "serve run's)")
    p.add_argument("--data", default=None, help="test images: 'digits', a .npz file, ... "
                   "(default: chosen by the model's input shape, e.g. ../shared/data/mnist.npz)")
    p.add_argument("--images", type=int, default=1000, help="test images to draw from")
    p.add_argument("--requests", type=int, default=5000, help="requests in the measured run")
    p.add_argument("--warmup", type=int, default=500, help="requests before measuring RSS")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent clients")
    p.add_argument("--invalid-fraction", type=float, default=0.2,
                   help="share of invalid requests (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--max-rss-growth", type=float, default=0.10,
                   help="allowed RSS change from warm-up to the end (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="PATHGUARD_NAME=VALUE",
                   help="a server setting (repeatable), e.g. PATHGUARD_MAX_QUEUE=64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    try:
        test = LoadTest(requests=args.requests, warmup=args.warmup,
                        concurrency=args.concurrency, invalid_fraction=args.invalid_fraction,
                        threads=args.threads, timeout=args.timeout,
                        max_rss_growth=args.max_rss_growth, server_env=parse_env(args.set),
                        seed=args.seed, url=args.url, pid=args.pid)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    input_shape = tuple(read_manifest(args.bundle).input_shape)
    data = args.data if args.data is not None else DEFAULT_DATA.get(input_shape)
    if data is None:
        raise SystemExit(f"no default test images for input shape {input_shape}: pass --data")
    ds = load_dataset(str(data))
    try:
        summary = run_load_test(args.bundle, ds.x_test[:args.images].numpy(),
                                ds.y_test[:args.images].numpy(), test, source=str(data))
    except ValueError as e:  # images of another shape
        raise SystemExit(f"--data {data}: {e}") from None
    except ServerError as e:
        raise SystemExit(str(e)) from None
    print(report(summary))  # noqa: T201
    if args.json is not None:
        args.json.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
