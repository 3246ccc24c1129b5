"""The HTTP/1.1 connection: uvicorn's HTTP protocol plus limits on request heads and connections.

The server parses HTTP with httptools (C) by default, h11 (pure Python) on request
(``PATHGUARD_HTTP``): under abusive traffic every byte a trickling client sends is parsed in
the server process, on the interpreter lock that valid requests need too (docs/SECURITY.md).
uvicorn (0.54) closes a keep-alive connection that stays silent ``timeout_keep_alive``
seconds after a response, but nothing else: a connection that never sends a byte, or sends
its headers one byte a second, is held for ever, and ``limit_concurrency`` answers 503 to
new *requests* while the silent connections it counts stay open. The guarded protocols
(:data:`PROTOCOLS`) add three rules:

- **header deadline**: a connection must deliver a complete request head within
  ``header_timeout`` seconds of connecting or of its previous response; otherwise it gets
  ``408`` (JSON ``request_timeout``) and is closed. This also ends a client that keeps
  trickling a body the app already answered without reading it (an early 401 or 413);
- **head size**: a connection that sends over :data:`MAX_HEAD_BYTES` while its head is awaited
  gets ``400`` (JSON ``bad_request``) and is closed (h11 has this limit itself, httptools none);
- **connection cap**: beyond ``max_connections`` open connections, a new one gets ``503``
  (JSON ``overloaded``, ``Retry-After: 1``) at once and is closed.

The body's own deadline is the app's (:mod:`service.limits`). :func:`protocol_factory` gives
uvicorn's ``http`` setting. The rules are per server process; parser errors get the JSON
``400`` too.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from http import HTTPStatus
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.config import HttpParser
from service.errors import error_body

#: Seconds a refused connection is kept reading (and dropping) before it is closed.
LINGER_S = 1.0
#: The most bytes a connection may send while its request head is awaited (h11's own limit;
#: httptools has none).
MAX_HEAD_BYTES = 16 * 1024


def raw_response(status: int, code: str, message: str, headers: dict[str, str] | None = None
                 ) -> bytes:
    """A complete HTTP/1.1 response with the JSON error body, closing the connection (written
    to the socket directly, outside a request cycle)."""
    body = json.dumps(error_body(message, code)).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _ConnectionGuard:
    """The head deadline, the head size limit, the connection cap and JSON parser errors, for
    a uvicorn HTTP protocol class (mixed in before it). A subclass calls :meth:`_head_arrived`
    once the parser has a complete request head, and :meth:`_arm` when a response completes
    with no request head waiting."""

    # what the uvicorn protocol class provides
    connections: set[Any]
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None, *, header_timeout: float,
                 max_connections: int) -> None:
        super().__init__(config, server_state, app_state, _loop)  # type: ignore[call-arg]
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_of: Any = None  # the cycle before the awaited head
        self._head_bytes = 0  # received since the head has been awaited
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.max_connections:
            self._refuse(raw_response(
                503, "overloaded", f"the server has {self.max_connections} connections open, "
                "its limit; retry shortly", {"retry-after": "1"}))
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if self._refused:  # after a refusal, what the client still sends is dropped
            return
        super().data_received(data)  # type: ignore[misc]
        if self._head_timer is not None:  # no head in these bytes either
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._disarm()
                self._refuse(raw_response(400, "bad_request", "no complete request head in "
                                          f"the first {MAX_HEAD_BYTES} bytes"))

    def send_400_response(self, msg: str) -> None:
        """What uvicorn sends when the parser rejects a request (a malformed request line or
        header, or with httptools a method it does not know): the JSON error, then closed."""
        self._refuse(raw_response(400, "bad_request", f"invalid HTTP request ({msg.rstrip('.')}"
                                  "): the request line or a header could not be parsed"))

    def _head_arrived(self) -> None:
        if self._head_timer is not None and self.cycle is not self._head_of:
            self._disarm()  # a request head arrived: its body has the app's deadline

    def _arm(self) -> None:
        self._disarm()
        self._head_of, self._head_bytes = self.cycle, 0
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not self._head_of or self.transport.is_closing():
            return
        self._refuse(raw_response(
            408, "request_timeout", f"no complete request head within "
            f"{self.header_timeout:g} s; send the request at once"))

    def _refuse(self, response: bytes) -> None:
        """Send ``response``, stop sending, and close a moment later: a client still sending
        its request then reads the response rather than a connection reset."""
        if self.transport.is_closing():
            return
        self._refused = True
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


class GuardedHttpToolsProtocol(_ConnectionGuard, HttpToolsProtocol):
    """uvicorn's httptools protocol (HTTP parsed in C), guarded: the server's default."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._head_arrived()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts a pipelined request, if one is queued
        if self.cycle.response_complete:  # nothing received and unanswered: await a head
            self._arm()


class GuardedH11Protocol(_ConnectionGuard, H11Protocol):
    """uvicorn's h11 protocol (HTTP parsed in Python), guarded."""

    def handle_events(self) -> None:
        super().handle_events()
        self._head_arrived()

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn starts a pipelined request, which disarms it
        super().on_response_complete()


#: The HTTP parsers the server can use (its ``http`` setting).
PROTOCOLS: dict[HttpParser, type[_ConnectionGuard]] = {"httptools": GuardedHttpToolsProtocol,
                                                       "h11": GuardedH11Protocol}


def protocol_factory(header_timeout: float, max_connections: int,
                     parser: HttpParser = "httptools") -> Any:
    """uvicorn's ``http`` setting: the guarded protocol of ``parser`` (:data:`PROTOCOLS`) with
    these limits."""
    return partial(PROTOCOLS[parser], header_timeout=header_timeout,
                   max_connections=max_connections)
