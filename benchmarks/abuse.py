"""Abuse benchmark (issue 20): valid traffic at a fixed rate, with and without abusive clients.

Starts ``python -m service`` (:func:`loadtest.server.serving`) on each bundle with an API key
and default limits, warms it up, records its resident memory (RSS), then runs two phases of the
same valid traffic (PNG images to ``/classify``, 4 at a time to ``/classify/batch``, exact
tensors to ``/v2/models/{name}/infer``, at ``--rate`` requests/s, open loop) while a poller
asks ``/v2/health/live`` every 20 ms:

1. **baseline**: the valid traffic alone;
2. **abuse**: the same traffic while the abusive clients of :mod:`loadtest.abusers` (in
   another process) run one client per class of issue 20 (response amplification,
   decode-cost bombs, a PNG of 400,000 chunks, unauthenticated 8 MB bodies, made-up 2 KB
   method names and metrics scrapes, trailing-slash requests with a hostile Host header,
   unparseable bodies) one request at a time, and hold ``--slow`` silent, header-trickling and
   body-trickling connections each.

Reports valid-request p50/p99 in both phases, the health check's worst latency, 5xx counts
(valid and abusive), failed valid requests, peak RSS against the post-warm-up RSS (the
kernel's high-water mark, reset after warm-up) and the abusive answers by class. Exits 1 if
any criterion of issue 20 fails: a 5xx, a failed valid request, health worst >= 1 s, abuse p99
> 3x baseline p99, peak RSS > 1.5x post-warm-up. The measuring is :mod:`loadtest.abuse`.

    python benchmarks/abuse.py --bundle models/mnist/bundle
    python benchmarks/abuse.py --bundle models/cifar10/bundle --json abuse-cifar.json
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from loadtest.abuse import report, run

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("abuse")


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
        log.info("\n%s", report(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
