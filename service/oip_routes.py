"""HTTP routes of the Open Inference Protocol (v2): health, metadata and exact-tensor infer.

Health, server metadata and model readiness are open; model metadata and infer need the API
key (checked before the body is read, :mod:`service.auth`). The infer body is read here, at
most what the served model can use (:func:`service.oip.body_limit`), and parsed in the decode
pool rather than by FastAPI on the event loop.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service import oip
from service.auth import KeyedRoute
from service.bodies import BodyError, is_json, read_body
from service.deps import AuthorizedModelDep, ModelDep, ServiceDep
from service.errors import ApiError
from service.routes import analyze
from service.schemas import (
    InferResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    error_responses,
)

health = APIRouter(tags=["health"])
v2 = APIRouter(tags=["oip"])
v2_keyed = APIRouter(route_class=KeyedRoute, tags=["oip"])

#: The infer request body in the OpenAPI schema (the route reads and parses it itself).
INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/InferRequest"}}}}}


@health.get("/v2/health/live")
async def live() -> Live:
    """The process is up."""
    return Live(live=True)


@health.get("/v2/health/ready", responses=error_responses(503))
async def ready(service: ServiceDep) -> Ready:
    """The model is loaded and warmed up (503 otherwise)."""
    return Ready(ready=service.ready)


@health.get("/v2/models/{name}/ready", responses=error_responses(404, 422, 503))
async def model_ready(service: ModelDep) -> ModelReady:
    return ModelReady(name=service.card.name, ready=service.ready)


@v2.get("/v2")
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="pathguard", version=request.app.version)


@v2_keyed.get("/v2/models/{name}", responses=error_responses(401, 404, 422, 503))
async def model_metadata(service: AuthorizedModelDep) -> ModelMetadata:
    """Input and output tensors of the model."""
    return oip.metadata(service.card, len(service.bundle.profile.layer_names))


@v2_keyed.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY,
               responses=error_responses(400, 401, 404, 408, 413, 422, 503))
async def infer(service: AuthorizedModelDep, request: Request) -> InferResponse:
    """Score an exact FP32 tensor [N, C, H, W] in [0, 1] (no image codec in between)."""
    card = service.card
    max_files = service.settings.max_files
    content_type = request.headers.get("content-type")
    if not is_json(content_type):
        got = repr(content_type[:60]) if content_type else "none"
        raise ApiError(400, "bad_request", f"send the infer request as JSON with Content-Type: "
                       f"application/json (got {got})")
    limit = min(service.settings.max_body_bytes, oip.body_limit(card.input_shape, max_files))
    body = await read_body(request, limit, f"the largest infer request for this model "
                           f"({max_files} images of {'x'.join(map(str, card.input_shape))})")
    try:
        parsed = await anyio.to_thread.run_sync(oip.parse_infer, body, card.input_shape,
                                                max_files, limiter=service.decode_limiter)
    except BodyError as e:
        raise ApiError(400, e.code, str(e)) from None
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])}
                                      for err in e.errors(include_url=False)]) from None
    except oip.TensorError as e:
        raise ApiError(400, "invalid_tensor", str(e)) from None
    result = await analyze(service, parsed.images)
    params: dict[str, str | int | float | bool] = {
        "threshold": card.threshold, "target_fpr": card.target_fpr,
        "batch_size": result.batch_size}
    if card.clean_fpr is not None:
        params["clean_fpr"] = card.clean_fpr
    if card.fpr_confidence is not None:
        params["fpr_confidence"] = card.fpr_confidence
    return InferResponse(model_name=card.name, model_version=card.version,
                         id=parsed.request.id, parameters=params,
                         outputs=oip.outputs(result.analysis, parsed.outputs))
