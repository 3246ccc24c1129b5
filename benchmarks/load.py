"""Mixed load on the real server: valid and hostile requests, latency, memory, pass/fail.

Starts ``python -m service`` on a free localhost port (:mod:`benchmarks.harness`), warms it
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
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python benchmarks/load.py`` from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import (  # noqa: E402
    metric_value,
    multipart,
    serving,
)
from detector.bundle import read_manifest  # noqa: E402
from service.config import ENV_PREFIX, Settings  # noqa: E402

DEFAULT_BUNDLE = ROOT / "models" / "mnist" / "bundle"
#: Test images for a model input shape when --data is not given.
DEFAULT_DATA = {(1, 28, 28): ROOT.parent / "shared" / "data" / "mnist.npz",
                (3, 32, 32): ROOT.parent / "shared" / "data" / "cifar10.npz",
                (1, 8, 8): "digits"}
BATCH_IMAGES = 4  # images per valid /classify/batch request
INFER_IMAGES = 2  # images per valid infer request


@dataclass(frozen=True)
class Kind:
    """A kind of request: valid ones must get 200, invalid ones ``status`` with ``code``."""

    name: str
    valid: bool
    weight: float  # relative share within the valid or the invalid requests
    status: int = 200
    code: str | None = None
    blocking: bool = False  # sent with httpx's blocking client (see ``drive``)


KINDS = (
    Kind("classify", True, 6.0),
    Kind("classify_batch", True, 1.0),
    Kind("infer", True, 1.0),
    Kind("empty_file", False, 1.0, 400, "empty"),
    Kind("truncated_png", False, 1.0, 400, "corrupt_image"),
    Kind("not_an_image", False, 1.0, 415, "not_an_image"),
    Kind("gif", False, 1.0, 415, "unsupported_format"),
    Kind("wrong_field", False, 1.0, 422, "validation_error"),
    Kind("bad_query", False, 1.0, 422, "validation_error"),
    Kind("too_many_files", False, 1.0, 400, "too_many_files"),
    Kind("pixel_bomb", False, 1.0, 413, "image_too_large"),
    Kind("body_too_large", False, 0.1, 413, "content_too_large", blocking=True),
    Kind("malformed_multipart", False, 1.0, 400, "bad_request"),
    Kind("infer_wrong_shape", False, 1.0, 400, "invalid_tensor"),
    Kind("infer_out_of_range", False, 1.0, 400, "invalid_tensor"),
    Kind("infer_unknown_model", False, 1.0, 404, "unknown_model"),
    Kind("infer_not_json", False, 1.0, 400, "bad_request"),
    Kind("unknown_route", False, 1.0, 404, "not_found"),
)


@dataclass(frozen=True)
class Prepared:
    """One HTTP request, encoded once; ``labels``: true classes of its images (valid ones)."""

    kind: int  # index into KINDS
    path: str
    body: bytes
    content_type: str
    labels: tuple[int, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What one request got: status (0: transport error), error code, latency, correctness."""

    kind: int
    status: int
    code: str | None
    seconds: float
    correct: int = 0  # images whose predicted class is the label
    images: int = 0  # images with a label in the response


@dataclass
class Summary:
    """Everything a run measured; ``to_json`` is what ``--json`` writes."""

    config: dict[str, Any]
    machine: dict[str, Any]
    seconds: float
    statuses: dict[str, int]
    kinds: dict[str, dict[str, Any]]
    valid: dict[str, Any]
    invalid: dict[str, Any]
    rss: dict[str, float]
    cpu: dict[str, float]
    criteria: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.criteria.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


# --- request payloads ------------------------------------------------------------------------


def encode_image(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """(H, W, C) uint8 -> image file bytes (grey for one channel)."""
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buf, fmt)
    return buf.getvalue()


def infer_body(x: np.ndarray, name: str = "input") -> bytes:
    """(N, C, H, W) float32 -> an Open Inference Protocol request body."""
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32",
              "data": [float(v) for v in x.ravel()]}
    return json.dumps({"inputs": [tensor]}).encode()


class Payloads:
    """Makes requests of every kind from test images (uint8 NCHW) for one model and limits."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, model: str,
                 settings: Mapping[str, Any], rng: np.random.Generator) -> None:
        self.images, self.labels, self.model, self.rng = images, labels, model, rng
        self.max_files = int(settings["max_files"])
        self.pngs = [encode_image(im.transpose(1, 2, 0)) for im in images]
        self.gif = encode_image(images[0].transpose(1, 2, 0), "GIF")
        side = math.isqrt(int(settings["max_image_pixels"])) + 1  # side^2 over the limit
        buf = io.BytesIO()
        Image.new("1", (side, side)).save(buf, "PNG")  # a few KB, side^2 pixels
        self.bomb = buf.getvalue()
        self.too_large = b"\0" * (int(settings["max_body_bytes"]) + 1)
        self.builders: dict[str, Callable[[], Prepared]] = {
            k.name: getattr(self, f"_{k.name}") for k in KINDS}

    def make(self, kind: int) -> Prepared:
        return self.builders[KINDS[kind].name]()

    def _pick(self, n: int) -> np.ndarray:
        return self.rng.choice(len(self.images), size=n, replace=False)

    def _files(self, path: str, idx: np.ndarray, field_name: str = "file") -> Prepared:
        body, ctype = multipart([(field_name, f"{i}.png", self.pngs[i], "image/png")
                                 for i in idx])
        return Prepared(-1, path, body, ctype, tuple(int(self.labels[i]) for i in idx))

    def _with(self, kind: str, p: Prepared) -> Prepared:
        index = next(i for i, k in enumerate(KINDS) if k.name == kind)
        return Prepared(index, p.path, p.body, p.content_type,
                        p.labels if KINDS[index].valid else ())

    def _upload(self, kind: str, data: bytes, ctype: str = "image/png",
                path: str = "/classify") -> Prepared:
        body, content_type = multipart([("file", "upload", data, ctype)])
        return self._with(kind, Prepared(-1, path, body, content_type))

    def _classify(self) -> Prepared:
        return self._with("classify", self._files("/classify", self._pick(1)))

    def _classify_batch(self) -> Prepared:
        return self._with("classify_batch", self._files(
            "/classify/batch?layers=false", self._pick(BATCH_IMAGES), "files"))

    def _infer(self) -> Prepared:
        idx = self._pick(INFER_IMAGES)
        x = self.images[idx].astype(np.float32) / 255.0
        return self._with("infer", Prepared(-1, f"/v2/models/{self.model}/infer", infer_body(x),
                                            "application/json",
                                            tuple(int(self.labels[i]) for i in idx)))

    def _empty_file(self) -> Prepared:
        return self._upload("empty_file", b"")

    def _truncated_png(self) -> Prepared:
        png = self.pngs[int(self._pick(1)[0])]
        return self._upload("truncated_png", png[: len(png) // 2])

    def _not_an_image(self) -> Prepared:
        return self._upload("not_an_image", b"this is not an image\n" * 20, "text/plain")

    def _gif(self) -> Prepared:
        return self._upload("gif", self.gif, "image/gif")

    def _wrong_field(self) -> Prepared:
        return self._with("wrong_field", self._files("/classify", self._pick(1), "image"))

    def _bad_query(self) -> Prepared:
        p = self._files("/classify?top_k=0", self._pick(1))
        return self._with("bad_query", p)

    def _too_many_files(self) -> Prepared:
        idx = self.rng.choice(len(self.images), size=self.max_files + 1)
        return self._with("too_many_files", self._files("/classify/batch", idx, "files"))

    def _pixel_bomb(self) -> Prepared:
        return self._upload("pixel_bomb", self.bomb)

    def _body_too_large(self) -> Prepared:
        return self._with("body_too_large", Prepared(-1, "/classify", self.too_large,
                                                     "multipart/form-data; boundary=x"))

    def _malformed_multipart(self) -> Prepared:
        variants = [  # a part without a name, a broken header, no boundary, garbage
            (b"--x\r\nContent-Disposition: form-data\r\n\r\n", "boundary=x"),
            (b"--x\r\nbad header line\r\n\r\ndata\r\n--x--\r\n", "boundary=x"),
            (multipart([("file", "a.png", self.pngs[0], "image/png")])[0], ""),
            (bytes(self.rng.integers(0, 256, 64, dtype=np.uint8)), "boundary=x")]
        body, params = variants[int(self.rng.integers(len(variants)))]
        ctype = "multipart/form-data" + (f"; {params}" if params else "")
        return self._with("malformed_multipart", Prepared(-1, "/classify", body, ctype))

    def _infer_tensor(self, kind: str, x: np.ndarray, model: str | None = None) -> Prepared:
        return self._with(kind, Prepared(-1, f"/v2/models/{model or self.model}/infer",
                                         infer_body(x), "application/json"))

    def _infer_wrong_shape(self) -> Prepared:
        c, h, w = self.images.shape[1:]
        return self._infer_tensor("infer_wrong_shape", np.zeros((1, c, h, w + 1), np.float32))

    def _infer_out_of_range(self) -> Prepared:
        x = self.images[self._pick(1)].astype(np.float32)  # 0..255, not / 255
        x.flat[0] = 255.0
        return self._infer_tensor("infer_out_of_range", x)

    def _infer_unknown_model(self) -> Prepared:
        x = self.images[self._pick(1)].astype(np.float32) / 255.0
        return self._infer_tensor("infer_unknown_model", x, f"{self.model}-nope")

    def _infer_not_json(self) -> Prepared:
        return self._with("infer_not_json", Prepared(
            -1, f"/v2/models/{self.model}/infer", b"{\"inputs\": [", "application/json"))

    def _unknown_route(self) -> Prepared:
        return self._with("unknown_route", self._files("/classify/nowhere", self._pick(1)))


def plan(payloads: Payloads, requests: int, invalid_fraction: float,
         rng: np.random.Generator) -> list[Prepared]:
    """``requests`` requests, each invalid with probability ``invalid_fraction``, kinds drawn
    by weight within the valid and the invalid ones (a kind's payloads are reused when many)."""
    valid = [i for i, k in enumerate(KINDS) if k.valid]
    invalid = [i for i, k in enumerate(KINDS) if not k.valid]

    def weights(idx: list[int]) -> np.ndarray:
        w = np.array([KINDS[i].weight for i in idx])
        return w / w.sum()

    is_invalid = rng.random(requests) < invalid_fraction
    kinds = np.where(is_invalid, rng.choice(invalid, size=requests, p=weights(invalid)),
                     rng.choice(valid, size=requests, p=weights(valid)))
    cache: dict[int, list[Prepared]] = {}
    out = []
    for kind in kinds.tolist():
        pool = cache.setdefault(kind, [])
        if len(pool) < 256:  # at most 256 distinct payloads per kind
            pool.append(payloads.make(kind))
            out.append(pool[-1])
        else:
            out.append(pool[int(rng.integers(len(pool)))])
    return out


# --- driving ---------------------------------------------------------------------------------


def judge(p: Prepared, status: int, body: Any, seconds: float) -> Outcome:
    """The outcome of one answered request: its error code, and predictions vs labels."""
    code = body.get("code") if isinstance(body, dict) and status >= 400 else None
    predicted: list[int] = []
    if status == 200 and isinstance(body, dict):
        if "prediction" in body:
            predicted = [body["prediction"]["index"]]
        elif "results" in body:
            predicted = [r["prediction"]["index"] for r in body["results"]]
        elif "outputs" in body:
            predicted = next(o["data"] for o in body["outputs"] if o["name"] == "prediction")
    correct = sum(int(a == b) for a, b in zip(predicted, p.labels, strict=False))
    return Outcome(p.kind, status, code, seconds, correct, min(len(predicted), len(p.labels)))


async def drive(url: str, requests: Sequence[Prepared], concurrency: int,
                timeout: float) -> tuple[list[Outcome], float]:
    """Send ``requests`` from ``concurrency`` clients (one keep-alive connection each, as
    benchmarks/serve.py explains); (outcomes in completion order, wall seconds).

    Bodies over the server's limit go through httpx's blocking client in a thread: the server
    answers 413 before reading such a body and closes the connection, and httpx's async
    client (httpcore over anyio) then reports a ReadError instead of the response, while the
    blocking client, like curl, reads it.
    """
    order = iter(requests)
    outcomes: list[Outcome] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for p in order:  # the iterator is shared: each request is sent once
            start = time.perf_counter()
            headers = {"Content-Type": p.content_type}
            try:
                if KINDS[p.kind].blocking:
                    r = await asyncio.to_thread(httpx.post, f"{url}{p.path}", content=p.body,
                                                headers=headers, timeout=timeout)
                else:
                    r = await client.post(p.path, content=p.body, headers=headers)
                seconds = time.perf_counter() - start
                try:
                    body = r.json()
                except ValueError:
                    body = None
                outcomes.append(judge(p, r.status_code, body, seconds))
            except httpx.HTTPError as e:
                outcomes.append(Outcome(p.kind, 0, type(e).__name__,
                                        time.perf_counter() - start))

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits)
               for _ in range(concurrency)]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        seconds = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return outcomes, seconds


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and its children (server workers, if any)."""
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and its live children."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


async def drive_sampling_rss(url: str, pid: int, requests: Sequence[Prepared],
                             concurrency: int, timeout: float, every: float = 0.25
                             ) -> tuple[list[Outcome], float, int]:
    """:func:`drive`, sampling the RSS of ``pid``'s tree meanwhile; (outcomes, seconds, peak
    RSS)."""
    peak = tree_rss(pid)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), every)

    sampler = asyncio.create_task(sample())
    try:
        outcomes, seconds = await drive(url, requests, concurrency, timeout)
    finally:
        done.set()
        await sampler
    return outcomes, seconds, max(peak, tree_rss(pid))


# --- report ----------------------------------------------------------------------------------


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and max in milliseconds (NaN if empty)."""
    if not seconds:
        return {k: float("nan") for k in ("p50", "p95", "p99", "max")}
    a = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(outcomes: Sequence[Outcome], seconds: float, config: dict[str, Any],
              machine: dict[str, Any], rss: dict[str, float], cpu: dict[str, float],
              max_rss_growth: float, alive: bool) -> Summary:
    """Counts, latencies and the pass/fail criteria of a run."""
    statuses = Counter(str(o.status) for o in outcomes)
    kinds: dict[str, dict[str, Any]] = {}
    for i, k in enumerate(KINDS):
        mine = [o for o in outcomes if o.kind == i]
        if not mine:
            continue
        expected = [o for o in mine if o.status == k.status and o.code == k.code]
        kinds[k.name] = {"valid": k.valid, "count": len(mine), "expected_status": k.status,
                         "expected": f"{k.status} {k.code or ''}".strip(),
                         "as_expected": len(expected),
                         "statuses": dict(Counter(str(o.status) for o in mine)),
                         "latency_ms": percentiles_ms([o.seconds for o in mine])}
    valid = [o for o in outcomes if KINDS[o.kind].valid]
    invalid = [o for o in outcomes if not KINDS[o.kind].valid]
    labelled = sum(o.images for o in valid)
    valid_failed = [o for o in valid if o.status != 200]
    unexpected = [o for o in invalid
                  if (o.status, o.code) != (KINDS[o.kind].status, KINDS[o.kind].code)]
    server_errors = [o for o in outcomes if o.status >= 500]
    transport = [o for o in outcomes if o.status == 0]
    growth = rss["after_run"] / rss["after_warmup"] - 1.0  # NaN where RSS was not measured
    summary = Summary(
        config=config, machine=machine, seconds=seconds, statuses=dict(statuses), kinds=kinds,
        valid={"count": len(valid), "failed": len(valid_failed),
               "overloaded_503": sum(o.status == 503 for o in valid),
               "throughput_rps": len(valid) / seconds,
               "latency_ms": percentiles_ms([o.seconds for o in valid if o.status == 200]),
               "images_labelled": labelled,
               "accuracy": sum(o.correct for o in valid) / labelled if labelled else None},
        invalid={"count": len(invalid), "unexpected": len(unexpected),
                 "unexpected_examples": [f"{KINDS[o.kind].name}: {o.status} {o.code}"
                                         for o in unexpected[:10]],
                 "latency_ms": percentiles_ms([o.seconds for o in invalid])},
        rss={**rss, "growth": growth}, cpu=cpu)
    summary.criteria = {
        "valid requests all 200": {"value": len(valid_failed), "passed": not valid_failed},
        "no 5xx": {"value": len(server_errors), "passed": not server_errors},
        "no transport errors": {"value": len(transport), "passed": not transport},
        "invalid requests get their 4xx": {"value": len(unexpected), "passed": not unexpected},
        f"RSS growth within {max_rss_growth:.0%}": {
            "value": round(growth, 4), "passed": abs(growth) <= max_rss_growth},
        "server still running": {"value": alive, "passed": alive},
    }
    if math.isnan(growth):  # an external server without --pid
        del summary.criteria[f"RSS growth within {max_rss_growth:.0%}"]
    return summary


def report(s: Summary) -> str:
    """The human-readable summary of a run."""
    c, v, inv = s.config, s.valid, s.invalid
    mib = 2.0 ** 20
    total = sum(k["count"] for k in s.kinds.values())
    lines = [
        f"{c['bundle']} ({c['model']}{', at ' + c['url'] if c.get('url') else ''}): "
        f"{total} requests at concurrency {c['concurrency']} "
        f"in {s.seconds:.1f} s = {total / s.seconds:.0f} req/s "
        f"({v['count']} valid = {v['throughput_rps']:.0f} req/s, {inv['count']} invalid)",
        f"machine: {s.machine['cpus']} CPUs, load average {s.machine['load_before'][0]:.1f} "
        f"before / {s.machine['load_after'][0]:.1f} after; this process nice "
        f"{s.machine['nice']}; server CPU {s.cpu['server_s']:.1f} s, client CPU "
        f"{s.cpu['client_s']:.1f} s; {s.cpu['images_per_pass']:.1f} images per forward pass",
        "statuses: " + ", ".join(f"{k}: {n}" for k, n in sorted(s.statuses.items())),
        "",
        f"{'kind':<22}{'count':>7}{'expected':>24}{'as exp.':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}  other statuses",
    ]
    for name, k in s.kinds.items():
        lat = k["latency_ms"]
        others = {st: n for st, n in k["statuses"].items() if st != str(k["expected_status"])}
        lines.append(f"{name:<22}{k['count']:>7}{k['expected']:>24}{k['as_expected']:>9}"
                     f"{lat['p50']:>9.1f}{lat['p95']:>9.1f}{lat['p99']:>9.1f}  "
                     f"{others or ''}")
    lat = v["latency_ms"]
    accuracy = "n/a" if v["accuracy"] is None else f"{v['accuracy']:.4f}"
    rss = (f"RSS: {s.rss['after_start'] / mib:.1f} MiB after start, "
           f"{s.rss['after_warmup'] / mib:.1f} MiB after warm-up, {s.rss['peak'] / mib:.1f} MiB "
           f"peak, {s.rss['after_run'] / mib:.1f} MiB after the run ({s.rss['growth']:+.1%})"
           if not math.isnan(s.rss["growth"]) else "RSS: not measured (--url without --pid)")
    lines += [
        "",
        f"valid: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms, "
        f"max {lat['max']:.1f} ms; failed {v['failed']} (503 overloaded: "
        f"{v['overloaded_503']}); accuracy {accuracy} on {v['images_labelled']} images",
        rss,
    ]
    if inv["unexpected_examples"]:
        lines.append("unexpected answers to invalid requests: "
                     + "; ".join(inv["unexpected_examples"]))
    lines.append("")
    for name, crit in s.criteria.items():
        lines.append(f"  [{'PASS' if crit['passed'] else 'FAIL'}] {name} ({crit['value']})")
    lines.append(f"load test {'PASSED' if s.passed else 'FAILED'}")
    return "\n".join(lines)


# --- command ---------------------------------------------------------------------------------


def server_settings(overrides: Mapping[str, str]) -> dict[str, Any]:
    """The server's limits: :class:`Settings` defaults, then ``PATHGUARD_*`` overrides."""
    values: dict[str, Any] = {name: f.get_default(call_default_factory=True)
                              for name, f in Settings.model_fields.items()}
    for key, value in overrides.items():
        name = key.removeprefix(ENV_PREFIX).lower()
        if key.startswith(ENV_PREFIX) and name in values:
            values[name] = value
    return values


def load_images(data: str | None, input_shape: tuple[int, int, int], count: int
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """Up to ``count`` test images (uint8 NCHW of the model's shape), labels, and the source."""
    from training.data import load_dataset

    spec = data if data is not None else DEFAULT_DATA.get(input_shape)
    if spec is None:
        raise SystemExit(f"no default test images for input shape {input_shape}: pass --data")
    ds = load_dataset(str(spec))
    x, y = ds.x_test[:count].numpy(), ds.y_test[:count].numpy()
    if tuple(x.shape[1:]) != input_shape:
        raise SystemExit(f"{spec} holds {tuple(x.shape[1:])} images; the model takes "
                         f"{input_shape}")
    return x, y, str(spec)


def forward_passes(url: str) -> tuple[float, float]:
    """(images, forward passes) the server has run so far, from its ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=30.0).text
    return (metric_value(text, "pathguard_inference_batch_size_sum"),
            metric_value(text, "pathguard_inference_batch_size_count"))


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith(ENV_PREFIX):
            raise SystemExit(f"--set wants {ENV_PREFIX}NAME=VALUE, got {pair!r}")
        env[key] = value
    return env


def answers_ready(url: str) -> bool:
    """Whether the server at ``url`` answers ``/v2/health/ready`` with 200."""
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=10.0).status_code == 200
    except httpx.HTTPError:
        return False


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
        outcomes, seconds, peak = asyncio.run(drive_sampling_rss(
            url, pid, requests, concurrency, timeout))
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


def run(args: argparse.Namespace) -> Summary:
    """Start the server (or take ``--url``'s), warm it up, drive the load and measure; the
    run's summary."""
    manifest = read_manifest(args.bundle)
    model = manifest.name
    input_shape = manifest.input_shape
    overrides = parse_env(args.set)
    settings = server_settings(overrides)
    images, labels, source = load_images(args.data, input_shape, args.images)  # type: ignore[arg-type]
    rng = np.random.default_rng(args.seed)
    payloads = Payloads(images, labels, model, settings, rng)
    warmup = plan(payloads, args.warmup, args.invalid_fraction, rng)
    requests = plan(payloads, args.requests, args.invalid_fraction, rng)
    worst = args.concurrency * max(BATCH_IMAGES, INFER_IMAGES)
    if worst > int(settings["max_queue"]):
        print(f"note: {args.concurrency} clients may hold {worst} images in flight, over "  # noqa: T201
              f"max_queue {settings['max_queue']}: valid requests may get 503")
    config = {"bundle": str(args.bundle), "model": model, "data": source,
              "requests": args.requests, "warmup": args.warmup,
              "concurrency": args.concurrency, "invalid_fraction": args.invalid_fraction,
              "seed": args.seed, "threads": args.threads, "server_env": overrides,
              "max_queue": int(settings["max_queue"]), "url": args.url, "pid": args.pid}
    machine = {"cpus": os.cpu_count(), "load_before": list(os.getloadavg()),
               "nice": os.nice(0), "python": platform.python_version(),
               "platform": platform.platform()}
    if args.url is not None:
        url = args.url.rstrip("/")
        if not answers_ready(url):
            raise SystemExit(f"--url {args.url}: no server answers /v2/health/ready there")
        m = measure(url, args.pid, warmup, requests, args.concurrency, args.timeout,
                    passes=False, alive=lambda: answers_ready(url))
    else:
        with serving(args.bundle, env=overrides, threads=args.threads) as server:
            m = measure(server.url, server.pid, warmup, requests, args.concurrency,
                        args.timeout, passes=True, alive=lambda: server.proc.poll() is None)
    machine["load_after"] = list(os.getloadavg())
    return summarize(m.outcomes, m.seconds, config, machine, m.rss, m.cpu, args.max_rss_growth,
                     m.alive)


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
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        p.error("--requests and --concurrency must be >= 1, --warmup >= 0")
    if not 0.0 <= args.invalid_fraction <= 1.0:
        p.error("--invalid-fraction must be in [0, 1]")
    if args.url is not None and not args.url.startswith(("http://", "https://")):
        p.error(f"--url must be an http:// or https:// base URL, got {args.url!r}")
    if args.pid is not None and (args.url is None or not psutil.pid_exists(args.pid)):
        p.error(f"--pid {args.pid}: needs --url and a running process")
    summary = run(args)
    print(report(summary))  # noqa: T201
    if args.json is not None:
        args.json.write_text(json.dumps(summary.to_json(), indent=2) + "\n")
    return 0 if summary.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
