"""ASGI middleware bounding every request body in size and in time.

- **Size**: a declared ``Content-Length`` over ``max_bytes`` is refused with 413 before any
  of the body is read; a streamed body is cut off as soon as it passes the limit. (FastAPI's
  own ``max_body_size`` answers in plain text, hence this.)
- **Time**: the whole body must arrive within ``timeout_s`` seconds of the request's headers;
  a client that trickles it, or stops sending, gets 408 ``request_timeout`` and the
  connection is closed. (The headers' own deadline and idle connections are the server's
  job: :mod:`service.protocol`.)

Both answer with the usual JSON error body and ``Connection: close``.

:class:`RateLimit` bounds how often an expensive route may run (``/perturb``: 429
``rate_limited`` with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_body


def body_too_large(size: str, limit: str) -> ApiError:
    """413 ``content_too_large`` for a body of ``size`` over ``limit`` (both as prose); closes
    the connection, since the rest of the body is not read."""
    return ApiError(413, "content_too_large", f"the request body ({size}) is larger than "
                    f"{limit}", headers={"Connection": "close"})


class BodyLimits:
    """JSON 413 for bodies over ``max_bytes``, 408 for bodies not received in ``timeout_s``."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: str) -> ApiError:
        return body_too_large(size, f"the limit of {self.max_bytes} bytes")

    def _too_slow(self, received: int) -> ApiError:
        return ApiError(408, "request_timeout", f"the request body was not received within "
                        f"{self.timeout_s:g} s ({received} bytes arrived); send it at once",
                        headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(self._too_large(f"{int(declared)} bytes"), scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        received = 0
        body_done = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # e.g. waiting for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise self._too_slow(received) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"over {received} bytes")
                body_done = not message.get("more_body", False)
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watch_send)
        except ApiError as e:  # raised in limited_receive outside a route's error handling
            if started or e.status_code not in (408, 413):
                raise
            await _send_error(e, scope, receive, send)


async def _send_error(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(error_body(str(exc.detail), exc.code), status_code=exc.status_code,
                            headers=exc.headers)
    await response(scope, receive, send)


class RateLimit:
    """A token bucket: ``per_minute`` requests a minute on average, bursts of at most that many.

    Not thread-safe: use it from the event loop only.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1:
            raise ValueError(f"per_minute must be >= 1, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self.tokens = self.capacity
        self.last = clock()

    def take(self) -> float:
        """0.0 if a request may run now (it is counted), else the seconds until one may."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def rate_limited(what: str, per_minute: int, wait_s: float) -> ApiError:
    """429 ``rate_limited`` with ``Retry-After`` (whole seconds, at least 1)."""
    retry = max(1, math.ceil(wait_s))
    return ApiError(429, "rate_limited", f"{what} is limited to {per_minute} requests a minute "
                    f"on this server; retry in {retry} s", headers={"Retry-After": str(retry)})
