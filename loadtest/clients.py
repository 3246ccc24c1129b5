"""Concurrent clients that send prepared requests to a server and judge each answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from loadtest.request_mix import KINDS, Prepared


@dataclass(frozen=True)
class Outcome:
    """What one request got: status (0: transport error), error code, latency, correctness."""

    kind: int
    status: int
    code: str | None
    seconds: float
    correct: int = 0  # images whose predicted class is the label
    images: int = 0  # images with a label in the response


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
    """Send ``requests`` from ``concurrency`` clients, each sending its next request when its
    last is answered; (outcomes in completion order, wall seconds).

    Each client has its own connection pool of one keep-alive connection: one pool shared by
    32 tasks spends several ms of CPU per request, which on a small machine is taken from the
    server under test.

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
