"""Write the hostile upload corpus (:mod:`loadtest.hostile_corpus`) to a directory, and post it
to a running server's ``/classify``, checking every answer.

    python benchmarks/hostile_corpus.py /tmp/hostile                       # write the files
    python benchmarks/hostile_corpus.py /tmp/hostile --url http://127.0.0.1:8000   # and check

The expectations assume the default limits (``max_body_bytes`` 8 MiB, ``max_image_pixels``
4096 x 4096) and a model with an input smaller than 16 x 16 (the digits and MNIST bundles).
Exits 1 if a file gets another answer or the server is not ready afterwards.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loadtest.hostile_check import Answer, check_server
from loadtest.hostile_corpus import CORPUS, write


def _print_answer(answer: Answer) -> None:
    print(f"{'FAIL' if answer.problems else 'ok  '} {answer.status} {answer.item.name}: "  # noqa: T201
          f"{'; '.join(answer.problems) or answer.item.what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="where to write the files")
    parser.add_argument("--url", help="also post every file to this server's /classify")
    parser.add_argument("--api-key", help="X-API-Key for --url")
    args = parser.parse_args(argv)
    rows = write(args.directory)
    print(f"wrote {len(rows)} files and expected.json to {args.directory}")  # noqa: T201
    if args.url is None:
        return 0
    result = check_server(args.url, args.api_key, on_answer=_print_answer)
    print(f"{len(CORPUS) - result.failures}/{len(CORPUS)} as expected; "  # noqa: T201
          f"/v2/health/ready: {result.ready_status}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
