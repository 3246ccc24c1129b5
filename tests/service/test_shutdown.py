"""The real server (``python -m service`` in a subprocess) under overload and on SIGTERM.

Requests are held in flight without mocks: with ``PATHGUARD_BATCH_WAIT_MS=1000`` an idle
micro-batcher waits up to a second for more images before it runs a forward pass, so
requests sit in its queue, visible as ``pathguard_queue_images`` in ``/metrics``.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from loadtest.metrics import metric_value
from loadtest.server import Server, serving

HOLD = {"PATHGUARD_BATCH_WAIT_MS": "1000"}  # an idle batcher waits 1 s for company


def wait_queued(server: Server, images: int, timeout: float = 15.0) -> None:
    """Wait until ``images`` images are queued or running in the server's micro-batcher."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics", timeout=5.0).text
        if metric_value(text, "pathguard_queue_images") >= images:
            return
        time.sleep(0.01)
    pytest.fail(f"{images} images never queued:\n{server.log()[-2000:]}")


@pytest.fixture(scope="module")
def digit_pngs(digits_test, encode: Callable[..., bytes]) -> list[bytes]:
    """The first 24 test digits as 8x8 grey PNGs."""
    x = digits_test[0][:24, 0].numpy()
    return [encode(Image.fromarray(np.ascontiguousarray(im))) for im in x]


def post_batch(url: str, pngs: list[bytes]) -> httpx.Response:
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    return httpx.post(f"{url}/classify/batch?layers=false", files=files, timeout=30.0)


def stalled_upload(url: str) -> socket.socket:
    """A client that sends the headers and part of a body, then nothing (until closed)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                 b"Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\n")
    return sock


def test_sigterm_lets_in_flight_requests_finish(bundle_dir, digit_pngs):
    """SIGTERM while 6 batch requests (24 images) wait in the batcher and one client stalls
    mid-upload: the six get 200 with their own results, the stalled one is cut off after
    PATHGUARD_SHUTDOWN_TIMEOUT, and the process exits with status 0."""
    env = {**HOLD, "PATHGUARD_SHUTDOWN_TIMEOUT": "3"}
    with serving(bundle_dir, env=env) as server, ThreadPoolExecutor(6) as pool:
        stalled = stalled_upload(server.url)
        chunks = [digit_pngs[i:i + 4] for i in range(0, 24, 4)]
        futures = [pool.submit(post_batch, server.url, chunk) for chunk in chunks]
        wait_queued(server, 24)
        assert not any(f.done() for f in futures)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        responses = [f.result(timeout=30) for f in futures]
        answered = time.monotonic() - signalled
        status = server.proc.wait(timeout=30)
        took = time.monotonic() - signalled
        stalled.close()
        log = server.log()
    for r in responses:
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["results"]) == 4
        assert body["timing"]["batch_size"] == 24  # all six were queued when SIGTERM came
    assert answered < 2.5  # the batcher's 1 s wait, not the stalled client's 3 s
    assert status == 0, log
    assert 2.5 < took < 15, log  # waited for the stalled client, then gave up on it
    # uvicorn logs the one task it cancelled (the stalled upload), and nothing before it
    before, cancelled, after = log.partition("Cancel 1 running task(s), timeout graceful "
                                             "shutdown exceeded")
    assert cancelled, log
    assert "Traceback" not in before and "ERROR" not in before.removesuffix("ERROR:    "), log
    assert "CancelledError" in after, log


def test_overload_is_a_quick_503_with_retry_after(bundle_dir, digit_pngs):
    """A full queue (max_queue 4, held by one 4-image batch) refuses more work at once with a
    JSON 503 and Retry-After; health stays up, the held request succeeds, and the server
    serves again once the queue has room."""
    env = {**HOLD, "PATHGUARD_MAX_QUEUE": "4", "PATHGUARD_MAX_FILES": "4"}
    one = {"file": ("d.png", digit_pngs[0], "image/png")}
    tensor = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                          "data": [0.0] * 64}]}
    with serving(bundle_dir, env=env) as server, ThreadPoolExecutor(1) as pool:
        held = pool.submit(post_batch, server.url, digit_pngs[:4])
        wait_queued(server, 4)
        start = time.monotonic()
        refused = httpx.post(f"{server.url}/classify", files=one, timeout=10.0)
        refused_infer = httpx.post(f"{server.url}/v2/models/digits/infer", json=tensor,
                                   timeout=10.0)
        refused_s = time.monotonic() - start
        ready = httpx.get(f"{server.url}/v2/health/ready", timeout=10.0)
        assert not held.done()  # the queue was still full for all of the above
        first = held.result(timeout=30)
        after = httpx.post(f"{server.url}/classify", files=one, timeout=30.0)
    for r in (refused, refused_infer):
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        assert body["code"] == "overloaded"
        assert "at capacity" in body["error"] and "limit 4" in body["error"]
    assert refused_s < 0.9  # answered at once, not after the held batch
    assert ready.status_code == 200
    assert first.status_code == 200 and len(first.json()["results"]) == 4
    assert after.status_code == 200, after.text
