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
    if not isinstance(exc, ApiError):  # the framework's own (never with exception text)
        if exc.status_code == 400:
            code = "bad_request"
            message = f"the request body is malformed: {message}"  # e.g. multipart parsing
        elif exc.status_code == 404:
            message = _not_found(request.method, request.url.path)
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {request.method[:20]} is not allowed here; use {allowed}"
    return JSONResponse(error_body(message, code), status_code=exc.status_code,
                        headers=exc.headers)


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, for echoing client input in a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _not_found(method: str, path: str) -> str:
    shown = shorten(path, 200)
    hint = "; paths have no trailing slash" if path.endswith("/") and path != "/" else ""
    return f"no such endpoint: {method[:20]} {shown}{hint}"


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


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)
