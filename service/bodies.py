"""Request bodies: read with a limit, checked for shape before anything parses them.

- **Multipart** (the image routes, :class:`MultipartRoute`): after the API key, the body is
  read (at most ``max_body_bytes``, see :mod:`service.limits`) and checked on its bytes before
  Starlette parses it: it must end with its closing boundary (a body cut short used to be
  parsed into fewer parts and reported as a missing field), and hold at most ``max_files``
  parts plus a few form fields (each part costs a spooled file). Bodies over
  :data:`INLINE_FORM_BYTES` are parsed in the decode pool, not on the event loop.
- **JSON** (:func:`parse_json`): at most :data:`MAX_JSON_CONTAINERS` objects and arrays,
  counted on the raw bytes (braces inside strings count too), so the work of parsing grows
  with the numbers and strings a request holds, not with structure an attacker chooses
  (40,000 requested outputs took 0.3 s of CPU to validate, with the GIL held); then parsed and
  validated by pydantic in one pass. A body that is not JSON (syntax, encoding, nesting,
  numbers out of range) is a :class:`BodyError` naming the line and column; a JSON body with
  wrong fields is pydantic's ``ValidationError``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from typing import TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartException, MultiPartParser

from service.auth import KeyedRoute
from service.config import Settings
from service.errors import ApiError
from service.limits import body_too_large

#: Objects and arrays a JSON body may hold (an OIP infer request needs about 12).
MAX_JSON_CONTAINERS = 64
#: Form fields a multipart body may hold besides its files.
EXTRA_FORM_PARTS = 4
#: Multipart bodies up to this size are parsed on the event loop (microseconds); larger ones
#: in the decode pool (python-multipart takes ~10 ms per MB, more for some contents).
INLINE_FORM_BYTES = 64 * 1024

M = TypeVar("M", bound=BaseModel)
_POSITION = re.compile(r"line (\d+) column (\d+)")


class BodyError(ValueError):
    """A body that cannot be parsed; ``code`` is the error code, the message says why."""

    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def parse_json(body: bytes, model: type[M]) -> M:
    """``body`` as ``model``: :class:`BodyError` if it is not JSON or holds too many objects
    and arrays, ``ValidationError`` if its fields are wrong."""
    containers = body.count(b"{") + body.count(b"[")
    if containers > MAX_JSON_CONTAINERS:
        raise BodyError(f"the JSON body holds {containers} objects and arrays (counting "
                        f"brackets), more than the {MAX_JSON_CONTAINERS} a request needs")
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        invalid = [err for err in e.errors() if err["type"] == "json_invalid"]
        if not invalid:
            raise
        match = _POSITION.search(str(invalid[0].get("msg", "")))
        where = f" at line {match[1]}, column {match[2]}" if match else ""
        raise BodyError(f"the request body is not valid JSON{where} (send UTF-8 JSON; "
                        f"numbers must fit a 64-bit float)") from None


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type announces JSON (``application/json`` or ``.../...+json``)."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                            and media.endswith("+json"))


async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The whole body, at most ``limit`` bytes (413 :class:`ApiError` beyond, from the
    declared Content-Length before anything is read). ``what`` names the limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(f"{int(declared)} bytes", f"{what}: {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(f"over {limit} bytes", f"{what}: {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def check_multipart(body: bytes, content_type: str, max_parts: int) -> None:
    """:class:`BodyError` unless ``body`` ends with its closing boundary and holds at most
    ``max_parts`` parts. A missing boundary parameter is left to Starlette's parser."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        return
    delimiter = b"--" + boundary
    if body.rfind(delimiter + b"--") < 0:
        raise BodyError(f"the multipart body does not end with its closing boundary "
                        f"(--{boundary.decode('latin-1')}--): it was cut short or is malformed")
    parts = body.count(delimiter) - 1
    if parts > max_parts:
        raise BodyError(f"the multipart body has {parts} parts, more than the {max_parts} "
                        f"a request may send", code="too_many_files")


class MultipartRoute(KeyedRoute):
    """A keyed route whose multipart body is read and checked (:func:`check_multipart`)
    before Starlette parses it. Other content types are left to FastAPI, which reports the
    missing form field."""

    async def after_key(self, request: Request) -> None:
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/"):
            return
        settings: Settings = request.app.state.settings
        body = await request.body()  # kept: Starlette's form parser reuses it
        try:
            check_multipart(body, content_type, settings.max_files + EXTRA_FORM_PARTS)
        except BodyError as e:
            raise ApiError(400, e.code, str(e)) from None
        service = request.app.state.service
        if len(body) <= INLINE_FORM_BYTES or service is None:
            return  # parsed by FastAPI on the event loop: microseconds
        try:
            form = await anyio.to_thread.run_sync(parse_form, body, content_type,
                                                  limiter=service.decode_limiter)
        except MultiPartException as e:
            raise ApiError(400, "bad_request", f"the request body is malformed: "
                           f"{e.message}") from None
        request._form = form  # Starlette's cache of the parsed form, which FastAPI then reads


def parse_form(body: bytes, content_type: str) -> FormData:
    """Starlette's multipart parser over ``body``, in an event loop of its own: call it in a
    worker thread, so that parsing megabytes does not hold up the server's loop."""
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    async def parse() -> FormData:
        return await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()

    return asyncio.run(parse())
