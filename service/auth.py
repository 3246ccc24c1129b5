"""The optional API key, checked before a request's body is read.

FastAPI reads and parses a route's body before it solves the route's dependencies, so a key
checked in a dependency only refuses a request after its body was received and parsed (an
8 MB JSON body without a key used to cost 0.7 s of event loop before its 401). Protected
routes therefore use :class:`KeyedRoute`, whose handler checks the key first; a request
without it gets its 401 without a byte of its body read, and the connection is closed (the
unread body is not drained). The routes still declare the key as a security dependency (see
:mod:`service.deps`) for the OpenAPI schema.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.config import Settings
from service.errors import ApiError

API_KEY_HEADER = "X-API-Key"


def check_key(settings: Settings, key: str | None, *, close: bool = False) -> None:
    """401 :class:`ApiError` unless the server has no key or ``key`` matches it (constant
    time). ``close``: ask the server to close the connection (the body was not read)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value().encode()
    if key is None or not hmac.compare_digest(key.encode(), expected):
        headers = {"WWW-Authenticate": API_KEY_HEADER}
        if close:
            headers["Connection"] = "close"
        raise ApiError(401, "unauthorized", f"missing or wrong API key; send it in the "
                       f"{API_KEY_HEADER} header", headers=headers)


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class KeyedRoute(APIRoute):
    """A route that requires the API key (when one is set) before its body is read."""

    def key_required(self, settings: Settings) -> bool:
        """Whether this route needs the key under ``settings`` (always, here)."""
        return True

    async def after_key(self, request: Request) -> None:
        """Runs once the key is accepted, before FastAPI reads the body (subclasses check
        the body here)."""

    def get_route_handler(self) -> Handler:
        handler = super().get_route_handler()

        async def keyed(request: Request) -> Response:
            settings: Settings = request.app.state.settings
            if self.key_required(settings):
                check_key(settings, request.headers.get(API_KEY_HEADER), close=True)
            await self.after_key(request)
            return await handler(request)

        return keyed


class MetricsRoute(KeyedRoute):
    """``/metrics``: keyed only when ``metrics_require_key`` is set."""

    def key_required(self, settings: Settings) -> bool:
        return settings.metrics_require_key
