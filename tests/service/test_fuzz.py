"""Schema fuzzing: schemathesis drives every operation of the app's own OpenAPI schema.

The app runs in-process (schemathesis' ASGI transport, which runs the lifespan: the session's
tiny digits bundle is loaded) with an API key and ``metrics_require_key`` on, so the auth
checks have something to check. Every response must be a non-5xx whose status code, content
type, headers and body are declared in the schema; every error body must carry a code listed in
docs/SERVICE.md. ``positive_data_acceptance`` is left out on purpose: the schema cannot say that
the bytes of ``file`` must decode as an image or that an OIP tensor must have the model's shape,
so schema-valid requests are legitimately refused with 4xx (the hostile corpus and the OIP tests
check those answers one by one). To reach the model at all, about half of the positive cases
are steered past those checks (:func:`deepen`).
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

import service
from detector.bundle import MANIFEST
from service.app import create_app
from service.bodies import BodyError
from service.config import Settings
from service.routes import DECODE_STATUS

API_KEY = "fuzz-key"
#: Every error code docs/SERVICE.md lists (its error table), and nothing else.
DOCUMENTED_CODES = frozenset({
    "empty", "corrupt_image", "too_many_files", "invalid_tensor", "bad_request",
    "unauthorized", "unknown_model", "not_found", "method_not_allowed", "request_timeout",
    "content_too_large", "image_too_large", "image_too_complex", "not_an_image",
    "unsupported_format", "validation_error", "rate_limited", "internal", "overloaded",
    "not_ready", "inference_failed",
})
#: Small limits, as in conftest's shared app, so that fuzzed requests can reach them.
LIMITS = {"max_files": 4, "max_queue": 64, "max_image_pixels": 10_000, "max_body_bytes": 200_000}
#: Examples per operation and generation phase: ~650 requests in ~15 s on 2 busy cores.
MAX_EXAMPLES = 60


def error_body_is_documented(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                             case: schemathesis.Case) -> bool | None:
    """Every 4xx is JSON ``{"error": non-empty message, "code": a documented code}``."""
    if response.status_code < 400:
        return None
    body = response.json()
    assert isinstance(body, dict), f"error body is not an object: {body!r}"
    assert isinstance(body.get("error"), str) and body["error"].strip(), body
    assert body.get("code") in DOCUMENTED_CODES, f"undocumented error code {body.get('code')!r}"
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          ignored_auth, unsupported_method, error_body_is_documented]


@pytest.fixture(scope="module")
def fuzz_schema(make_settings: Callable[..., Settings]) -> Iterator[schemathesis.BaseSchema]:
    """The app's schema, loaded from its /openapi.json through the ASGI transport; the app's
    lifespan (started by schemathesis on first use) is shut down after the module."""
    app = create_app(make_settings(**LIMITS, api_key=API_KEY, metrics_require_key=True))
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        asgi.shutdown_lifespans()


@pytest.fixture(scope="module")
def manifest(bundle_dir: Path) -> dict[str, Any]:
    """The served bundle's manifest: its ``name`` and ``input_shape`` (C, H, W)."""
    return dict(json.loads((bundle_dir / MANIFEST).read_text()))


def image_from(data: bytes) -> bytes:
    """A valid image whose size, mode, format and pixels all come from the fuzzed ``data``
    (at least 1 byte): width and height 1..24, grey / RGB / RGBA, PNG, BMP, lossless WebP or
    JPEG."""
    n = len(data)
    width, height = 1 + data[0] % 24, 1 + data[-1] % 24
    mode, fmt = ("L", "RGB", "RGBA")[n % 3], ("PNG", "BMP", "WEBP", "JPEG")[(n // 3) % 4]
    if fmt in ("BMP", "JPEG") and mode == "RGBA":
        mode = "RGB"
    channels = len(mode)
    pixels = (data * (width * height * channels // n + 1))[:width * height * channels]
    image = Image.frombytes(mode, (width, height), pixels)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def as_bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def deepen(case: schemathesis.Case, manifest: dict[str, Any]) -> None:
    """Point about half of the positive cases past the checks the schema cannot express, so
    they reach the model: the served model's name, decodable images, a tensor of the model's
    shape. Which cases are changed, and the images' pixels, follow the generated data."""
    params = case.path_parameters or {}
    if "name" in params and len(str(params["name"])) % 3 != 0:
        params["name"] = manifest["name"]  # any string is a valid name: 200 or 404 are both right
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return  # negative bodies must stay invalid for negative_data_rejection
    body = case.body
    if case.path == "/classify" and isinstance(body, dict) and "file" in body:
        data = as_bytes(body["file"])
        if data and len(data) % 2 == 0:
            body["file"] = image_from(data)
    elif case.path == "/classify/batch" and isinstance(body, dict):
        files = body.get("files")
        if isinstance(files, list) and files:
            blobs = [as_bytes(f) or b"\x00" for f in files]
            if sum(map(len, blobs)) % 2 == 0:
                body["files"] = [image_from(b) for b in blobs]
    elif case.path.endswith("/infer") and isinstance(body, dict) and body.get("inputs"):
        first = body["inputs"][0]
        data = first.get("data") if isinstance(first, dict) else None
        if isinstance(data, list) and len(data) % 2 == 0:
            numbers = [abs(x) % 1.0 for x in data if isinstance(x, float)] or [0.5]
            count, size = len(data) % 4 + 1, math.prod(manifest["input_shape"])
            first.update(name="input", datatype="FP32",
                         shape=[count, *manifest["input_shape"]],
                         data=(numbers * (count * size))[:count * size])


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_every_operation_conforms_to_its_schema(case: schemathesis.Case,
                                                manifest: dict[str, Any]) -> None:
    deepen(case, manifest)
    case.call_and_validate(headers={"X-API-Key": API_KEY}, checks=CHECKS)


def error_table() -> dict[str, int]:
    """The error table of docs/SERVICE.md: code -> status."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "SERVICE.md").read_text()
    table = text.split("### Errors", 1)[1].split("## Settings", 1)[0]
    return {part.strip("` "): int(line[2:5]) for line in table.splitlines()
            if line.startswith("| ") and line[2:5].isdigit()
            for part in line.split("|")[2].split(",")}


def test_documented_codes_match_service_md() -> None:
    """The fuzz check's list of codes is the table in docs/SERVICE.md, so neither drifts."""
    assert set(error_table()) == DOCUMENTED_CODES


def test_every_code_the_service_raises_is_documented_with_one_status() -> None:
    """Every (status, code) the service's source can answer with (literal ApiError and raw
    responses, decode errors, body errors, the framework's own) is in the table, with the
    table's status: one taxonomy, used everywhere."""
    source = "\n".join(p.read_text() for p in sorted(Path(service.__file__).parent.glob("*.py")))
    pairs = {(int(s), c) for s, c in re.findall(
        r'(?:ApiError|raw_response)\(\s*(\d{3}),\s*"(\w+)"', source)}
    pairs |= {(status, str(kind)) for kind, status in DECODE_STATUS.items()}
    pairs |= {(400, BodyError("x").code), (400, BodyError("x", "too_many_files").code)}
    pairs |= {(404, "not_found"), (405, "method_not_allowed"), (422, "validation_error"),
              (500, "internal")}  # service/errors.py: the framework's errors
    assert len(pairs) >= 18
    table = error_table()
    assert {code: table.get(code) for _, code in pairs} == {code: status for status, code in pairs}
