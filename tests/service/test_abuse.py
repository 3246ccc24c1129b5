"""Issue 20: work bounded by what a request is, not by what an attacker chooses.

One real server (``python -m service`` in a subprocess, as an operator starts it) with an API
key and short timeouts serves every test here over real HTTP on 127.0.0.1; the abusive inputs
come from :mod:`loadtest.abusive_inputs`. Each test names the behaviour it replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from loadtest import abusive_inputs as abusive
from loadtest.abuse import measure
from loadtest.server import Server, serving
from service import routes
from service.app import create_app
from service.bodies import INLINE_FORM_BYTES
from service.budget import MAX_JPEG_SCANS
from service.imaging import Image

KEY = "abuse-key"
AUTH = {"X-API-Key": KEY}
MAX_CONNECTIONS = 64
SERVER_ENV = {"PATHGUARD_API_KEY": KEY, "PATHGUARD_HEADER_TIMEOUT": "1",
              "PATHGUARD_BODY_TIMEOUT": "1", "PATHGUARD_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
              "PATHGUARD_EXECUTION": "masked"}
INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def server(bundle_dir) -> Iterator[Server]:
    with serving(bundle_dir, env=SERVER_ENV, ready_timeout=60.0) as running:
        yield running


@pytest.fixture(scope="module")
def h11_server(bundle_dir) -> Iterator[Server]:
    """The same server parsing HTTP with h11 instead of httptools."""
    with serving(bundle_dir, env={**SERVER_ENV, "PATHGUARD_HTTP": "h11"},
                 ready_timeout=60.0) as running:
        yield running


#: The module's server fixture for each HTTP parser.
SERVER_OF = {"httptools": "server", "h11": "h11_server"}


@pytest.fixture(params=sorted(SERVER_OF))
def either(request: pytest.FixtureRequest) -> Server:
    """The server with each HTTP parser: the connection rules are the protocol's."""
    return request.getfixturevalue(SERVER_OF[request.param])


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=10.0) as client:
        yield client


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text[:300]
    body = r.json()
    assert body["code"] == code and body["error"], body
    return str(body["error"])


def classify(http: httpx.Client, data: bytes) -> httpx.Response:
    return http.post("/classify", files={"file": ("x.png", data, "image/png")})


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took
    (``timeout`` if it never closed)."""
    start = time.monotonic()
    sock.settimeout(0.1)
    data = b""
    while time.monotonic() - start < timeout:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    return data, timeout


def worst_health_latency(server: Server, during: Callable[[], object]) -> tuple[object, float]:
    """Run ``during()`` while polling /v2/health/live; its result and the worst latency."""
    stop, worst = threading.Event(), [0.0]

    def poll() -> None:
        with httpx.Client(base_url=server.url, timeout=10.0) as client:
            while not stop.is_set():
                start = time.perf_counter()
                client.get("/v2/health/live")
                worst[0] = max(worst[0], time.perf_counter() - start)
                time.sleep(0.01)

    with ThreadPoolExecutor(1) as pool:
        poller = pool.submit(poll)
        try:
            result = during()
        finally:
            stop.set()
        poller.result()
    return result, worst[0]


# --- response amplification ------------------------------------------------------------------


def test_outputs_are_requested_at_most_once(http):
    """Was: each repeated output answered in full (447 MB for 2.8 MB of request)."""
    body = abusive.repeated_outputs_body((1, 8, 8), 3)
    message = error(http.post(INFER, content=body, headers={"Content-Type": "application/json"}),
                    400, "invalid_tensor")
    assert "['probabilities'] requested more than once" in message
    many = abusive.repeated_outputs_body((1, 8, 8), 2000)  # 54 KB
    message = error(http.post(INFER, content=many, headers={"Content-Type": "application/json"}),
                    400, "bad_request")
    assert "2006 objects and arrays" in message


def test_infer_body_is_bounded_by_what_the_model_can_use(http):
    """Was: any body up to 8 MiB parsed (0.7 s of event loop for 8 MB)."""
    body = b'{"inputs": [{"data": [' + b"0.5, " * 100_000 + b"0.5]}]}"
    message = error(http.post(INFER, content=body, headers={"Content-Type": "application/json"}),
                    413, "content_too_large")
    assert "largest infer request for this model (32 images of 1x8x8)" in message


# --- decode cost ---------------------------------------------------------------------------


def test_jpeg_with_thousands_of_scans_is_refused_unread(http):
    """Was: decoded, one pass over the coefficients per scan (17 s for 20,000 scans)."""
    data = abusive.many_scans_jpeg(5000)
    start = time.perf_counter()
    message = error(classify(http, data), 413, "image_too_complex")
    assert f"5000 scans, more than the {MAX_JPEG_SCANS}" in message
    assert time.perf_counter() - start < 1.0
    assert classify(http, abusive.many_scans_jpeg(10)).status_code == 200  # a normal one


def test_one_pixel_wide_image_is_refused(http):
    """Was: 1 x 16.7 M pixels decoded and resized (+680 MB)."""
    message = error(classify(http, abusive.tall_png(4_000_000)), 413, "image_too_complex")
    assert "1x4000000, an aspect ratio over the limit of 64:1" in message


def test_png_with_a_million_chunks_never_blocks_the_event_loop(server, http):
    """Was: the header check parsed every chunk on the event loop (2 s for 500,000)."""
    data = abusive.chunk_bomb_png(300_000)  # 4.5 MB
    response, worst = worst_health_latency(server, lambda: classify(http, data))
    assert isinstance(response, httpx.Response)
    assert "more than 4096 chunks" in error(response, 413, "image_too_complex")
    assert worst < 0.5


def test_png_holding_a_few_of_its_rows_is_truncated(http):
    """Was: 4 of 4,096 rows decoded and the rest zero-filled, with 200."""
    message = error(classify(http, abusive.truncated_rows_png()), 400, "corrupt_image")
    assert "truncated" in message and "64x4096" in message


def test_large_multipart_bodies_are_parsed_off_the_event_loop(server, http):
    """Bodies over 64 KB are parsed in the decode pool: same answers as on the loop."""
    pixels = np.random.default_rng(0).integers(0, 256, (300, 300), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    assert len(buf.getvalue()) > INLINE_FORM_BYTES
    r = http.post("/classify", files={"file": ("big name.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["input"]["filename"] == "big name.png" and r.json()["input"]["width"] == 300
    nameless = (b"--x\r\nContent-Disposition: form-data\r\n\r\n" + bytes(100_000)
                + b"\r\n--x--\r\n")
    message = error(http.post("/classify", content=nameless,
                              headers={"Content-Type": "multipart/form-data; boundary=x"}),
                    400, "bad_request")
    assert message.startswith("the request body is malformed")


def test_uploads_are_opened_once_in_a_decode_worker(make_settings, digit_png, monkeypatch):
    """Was: opened twice (header check, then decode), small ones decoded on the event loop."""
    opened, on_loop = [], []
    real_open, real_decode = Image.open, routes.decode_image

    def counting_open(*args, **kwargs):
        opened.append(1)
        return real_open(*args, **kwargs)

    def where_decoded(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real_decode(*args, **kwargs)

    with TestClient(create_app(make_settings())) as client:
        monkeypatch.setattr(Image, "open", counting_open)
        monkeypatch.setattr(routes, "decode_image", where_decoded)
        r = client.post("/classify", files={"file": ("d.png", digit_png, "image/png")})
    assert r.status_code == 200, r.text
    assert opened == [1] and on_loop == [False]


# --- authentication before the body --------------------------------------------------------


def test_401_comes_before_the_body_is_sent(either):
    """Was: the body was read and parsed first (an 8 MB JSON body: 0.7 s, 60 MB)."""
    with connect(either) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 5000000\r\n\r\n".encode())
        data, took = read_until_closed(sock, 3.0)
    assert data.startswith(b"HTTP/1.1 401 ") and b'"code":"unauthorized"' in data
    assert took < 1.0  # answered and closed at once, no body sent


@pytest.mark.parametrize("path", [INFER, "/classify", "/classify/batch"])
def test_malformed_bodies_without_a_key_get_401(server, path):
    """Was: 400 or 422 about the body, before the missing key was noticed."""
    for ctype in ("application/json", "multipart/form-data; boundary=x"):
        r = httpx.post(f"{server.url}{path}", content=b"{not json --x",
                       headers={"Content-Type": ctype})
        error(r, 401, "unauthorized")


# --- slow and idle clients -----------------------------------------------------------------


def test_silent_connection_is_closed(either):
    """Was: held open for ever (200 silent sockets for 30 s)."""
    with connect(either) as sock:
        data, took = read_until_closed(sock, 5.0)
    assert took < 3.0 and data.startswith(b"HTTP/1.1 408 ")
    assert b'"code": "request_timeout"' in data


def test_headers_trickled_byte_by_byte_are_cut_off(either):
    """Was: headers at 1 byte/s held for the whole test."""
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    with connect(either) as sock:
        start = time.monotonic()
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - start > 4:
                    break
        except OSError:  # the server closed the connection
            pass
        data, _ = read_until_closed(sock, 2.0)
        took = time.monotonic() - start
    assert took < 4.0 and data.startswith(b"HTTP/1.1 408 ")


def test_a_request_head_over_16_kib_gets_400(either):
    """h11 has the limit itself; httptools would have kept every byte until the deadline."""
    with connect(either) as sock:
        with contextlib.suppress(OSError):  # the server may close the connection first
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: "
                         + b"a" * 40_000)
        data, took = read_until_closed(sock, 3.0)
    assert took < 2.0 and data.startswith(b"HTTP/1.1 400 ")
    assert b'"code": "bad_request"' in data


def test_body_trickled_after_a_valid_prefix_gets_408(either):
    """Was: held open while the client sent nothing more."""
    with connect(either) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-API-Key: " + KEY.encode()
                     + b"\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                       b"Content-Length: 1000\r\n\r\n--x\r\n")
        data, took = read_until_closed(sock, 5.0)
    assert took < 3.0 and data.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in data


def test_an_idle_keep_alive_connection_gets_408_after_its_response(either):
    """The head deadline counts again from each response (keep-alive lasts 5 s)."""
    with connect(either) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = read_until_closed(sock, 5.0)
    assert data.startswith(b"HTTP/1.1 200 ") and took < 3.0
    assert data.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 408 " in data


def test_pipelined_requests_are_answered_in_order_then_the_deadline_runs(either):
    """A head that arrived while the previous request ran is not waited for again."""
    with connect(either) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = read_until_closed(sock, 5.0)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", data) == [b"200", b"200", b"408"] and took < 3.0


def test_connections_beyond_the_limit_get_503(either):
    """Was: no connection limit."""
    held = [connect(either) for _ in range(MAX_CONNECTIONS + 4)]
    try:
        with connect(either) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            data, _ = read_until_closed(sock, 3.0)
    finally:
        for sock in held:
            sock.close()
    assert data.startswith(b"HTTP/1.1 503 ") and b'"code": "overloaded"' in data
    time.sleep(0.2)
    assert httpx.get(f"{either.url}/v2/health/live").status_code == 200


# --- metrics, redirects, errors ------------------------------------------------------------


@pytest.mark.parametrize("parser", sorted(SERVER_OF))
def test_made_up_methods_share_one_metrics_label(parser, request):
    """Was: one Prometheus series per method name (241 MB of /metrics after 7,000). httptools
    refuses a method it does not know while parsing (400, before the app); h11 passes it on
    (405, counted under one label)."""
    h11 = parser == "h11"
    server = request.getfixturevalue(SERVER_OF[parser])
    with httpx.Client(base_url=server.url) as client:
        for i in range(30):
            r = client.request(f"X{i:03d}" + "M" * 500, "/v2/health/live")
            if h11:
                assert r.status_code == 405
            else:
                assert "could not be parsed" in error(r, 400, "bad_request")
        text = client.get("/metrics").text
    assert "MMMM" not in text
    other = [line for line in text.splitlines() if line.startswith(
        "pathguard_http_requests_total") and 'method="other"' in line]
    assert len(other) == (1 if h11 else 0)
    assert not h11 or float(other[0].rsplit(" ", 1)[1]) >= 30

def test_no_redirect_built_from_the_host_header(http):
    """Was: 307 to http://evil.example/... for a trailing slash."""
    r = http.post(INFER + "/", json={}, headers={"Host": "evil.example"},
                  follow_redirects=False)
    assert "location" not in r.headers
    assert "no trailing slash" in error(r, 404, "not_found")


@pytest.mark.parametrize(("body", "words"), [
    (abusive.huge_integer_json(5001), "column 4309"),
    (abusive.deep_json(5000), "5002 objects and arrays"),
    # the column is pydantic-core's (13 or 14 by version: the bad byte or the one after)
    (abusive.non_utf8_json(), "not valid JSON at line 1, column 1"),
    (b'{"inputs": [', "not valid JSON"),
], ids=["huge_integer", "deep_nesting", "non_utf8", "cut_short"])
def test_unparseable_json_is_one_clear_error(http, body, words):
    """Was: Python's own text (int digits limit, recursion depth, codec) as 400, or 422."""
    message = error(http.post(INFER, content=body, headers={"Content-Type": "application/json"}),
                    400, "bad_request")
    assert words in message
    for python_text in ("sys.set_int_max_str_digits", "recursion", "codec", "Exceeds"):
        assert python_text not in message


def test_multipart_without_its_closing_boundary_is_malformed(http, digit_png):
    """Was: parsed into fewer parts and reported as a missing 'file' field (422)."""
    body, ctype = abusive.unterminated_multipart(digit_png)
    message = error(http.post("/classify", content=body, headers={"Content-Type": ctype}),
                    400, "bad_request")
    assert "closing boundary (--x--)" in message
    assert http.post("/classify", content=body + b"--\r\n",
                     headers={"Content-Type": ctype}).status_code == 200


def test_head_on_get_routes(http):
    """Was: 405."""
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
        r = http.head(path)
        assert r.status_code == 200 and r.content == b"", path


# --- the abuse benchmark -------------------------------------------------------------------

#: The answers each abusive class of loadtest.abusers may get (``closed``: the server
#: ended the connection, e.g. while an unauthenticated client was still sending its body).
ALLOWED = {
    "amplification": {"400", "413"}, "decode_bombs": {"400", "413"}, "chunk_png": {"413"},
    "auth": {"401", "closed"}, "metrics": {"200", "400", "405"}, "redirect": {"404"},
    "errors": {"200", "400"}, "slow_silent": {"408", "closed", "held"},
    "slow_headers": {"408", "closed", "held"}, "slow_body": {"408", "closed", "held"},
}


def test_abuse_benchmark_refuses_every_class(server):
    """The abuse benchmark (loadtest.abuse, which benchmarks/abuse.py runs), briefly: every
    abusive class gets its 4xx (or is cut off), no 5xx, no failed valid request (latency and
    memory ratios need the full run)."""
    result = measure(server, KEY, rate=10.0, duration_s=1.5, warmup_s=0.5, slow=1,
                     pause_s=0.1)
    assert result["baseline"]["requests"] == result["abuse"]["requests"] == 15
    checks = result["checks"]
    assert checks["no 5xx"] and checks["no failed valid request"] and checks["server alive"]
    seen: dict[str, set[str]] = {}
    for key in result["abusive_answers"]:
        name, answer = key.split(":", 1)
        seen.setdefault(name, set()).add(answer)
    assert set(seen) == set(ALLOWED)
    for name, answers in seen.items():
        assert answers <= ALLOWED[name], (name, answers)
    assert {"400", "413"} <= seen["decode_bombs"] and "401" in seen["auth"]
