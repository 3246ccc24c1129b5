"""HTTP errors as JSON bodies ``{"error": message, "code": reason}`` (see :class:`ErrorBody`).

Routes raise :class:`ApiError`; the handlers installed by :func:`install_error_handlers` give
the framework's own errors (404, 405, 413, 422, body parsing) the same shape, and turn any
unexpected exception into a logged 500 without internals in the body.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

#: Hints for multipart fields a client may have misnamed.
_FIELD_HINTS = {
    "file": "send the image as multipart/form-data with field name 'file'",
    "files": "send the images as multipart/form-data, each with field name 'files'",
}


class ApiError(HTTPException):
    """An HTTP error with a machine-readable ``code`` and a message for people."""

    def __init__(self, status_code: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=message, headers=dict(headers or {}))
        self.code = code


def error_body(message: str, code: str, errors: list[dict[str, Any]] | None = None
               ) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "code": code}
    if errors is not None:
        body["errors"] = errors
    return body


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = getattr(exc, "code", None) or _status_code_name(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if not isinstance(exc, ApiError):
        if exc.status_code == 400 and exc.__cause__ is not None:
            message = f"{message}: {exc.__cause__}"  # e.g. malformed multipart
        elif exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
    return JSONResponse(error_body(message, code), status_code=exc.status_code,
                        headers=exc.headers)


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """One readable sentence for FastAPI's validation errors."""
    parts = []
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ())]
        where, field = (loc[0], ".".join(loc[1:])) if loc else ("request", "")
        kind = e.get("type")
        if kind == "missing" and where == "body" and field in _FIELD_HINTS:
            parts.append(f"missing form field {field!r}: {_FIELD_HINTS[field]}")
        elif kind == "missing":
            parts.append(f"missing {where} field {field!r}" if field else f"missing {where}")
        elif where == "body" and field in _FIELD_HINTS:
            parts.append(f"form field {field!r} is not a file upload: {_FIELD_HINTS[field]}")
        elif where == "body" and not field and kind == "model_attributes_type":
            parts.append("the request body must be a JSON object, sent with "
                         "Content-Type: application/json")
        else:
            target = f"{where} field {field!r}" if field else where
            parts.append(f"{target}: {e.get('msg', 'invalid')}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts)


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in exc.errors()[:20]]
    return JSONResponse(error_body(describe_validation_errors(exc.errors()),
                                   "validation_error", errors), status_code=422)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error; see the server log", "internal"),
                        status_code=500)


class BodyLimit:
    """ASGI middleware: JSON 413 for request bodies over ``max_bytes``.

    A declared ``Content-Length`` over the limit is refused before any of the body is read;
    a streamed body is cut off as soon as it passes the limit. (FastAPI's own
    ``max_body_size`` answers in plain text, hence this.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _error(self, size: str) -> ApiError:
        return ApiError(413, "content_too_large", f"the request body ({size}) is larger than "
                        f"the limit of {self.max_bytes} bytes", headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(self._error(f"{int(declared)} bytes"), scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error(f"over {received} bytes")
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watch_send)
        except ApiError as e:  # raised in limited_receive outside a route's error handling
            if started or e.status_code != 413:
                raise
            await _send_error(e, scope, receive, send)


async def _send_error(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse(error_body(str(exc.detail), exc.code), status_code=exc.status_code,
                            headers=exc.headers)
    await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
