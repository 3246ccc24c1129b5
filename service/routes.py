"""HTTP routes: decode -> micro-batched analysis -> response model. HTTP errors live here.

Open: ``/v2``, ``/v2/health/*``, ``/v2/models/{name}/ready``, ``/metrics`` (unless
``metrics_require_key``) and the OpenAPI docs. Everything else needs the API key if one is set.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Annotated

import anyio
import numpy as np
import torch
from fastapi import APIRouter, File, Query, Request, Response, UploadFile

from service import oip
from service.batching import BatchResult, OverloadedError
from service.deps import (
    AuthorizedModelDep,
    AuthorizedServiceDep,
    MetricsDep,
    ModelDep,
    ServiceDep,
    ServiceState,
)
from service.errors import ApiError
from service.imaging import (
    DecodedImage,
    DecodeErrorKind,
    ImageDecodeError,
    decode_image,
    image_size,
)
from service.results import image_result
from service.schemas import (
    BatchResponse,
    ClassifyResponse,
    InferRequest,
    InferResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    Timing,
    error_responses,
)

router = APIRouter()

_DECODE_STATUS = {
    DecodeErrorKind.EMPTY: 400,
    DecodeErrorKind.NOT_AN_IMAGE: 415,
    DecodeErrorKind.UNSUPPORTED_FORMAT: 415,
    DecodeErrorKind.CORRUPT: 400,
    DecodeErrorKind.TOO_LARGE: 413,
}

#: Images up to this many pixels are decoded on the event loop (tens of microseconds, less
#: than a hop to a worker thread); larger ones in the decode thread pool.
INLINE_DECODE_PIXELS = 128 * 128

TopK = Annotated[int, Query(ge=1, le=1000, description="how many classes to list (capped at "
                                                       "the number of classes)")]
Layers = Annotated[bool, Query(description="include the per-layer path report")]


# --- helpers ---------------------------------------------------------------------------------


async def _decode(service: ServiceState, upload: UploadFile, index: int | None = None
                  ) -> DecodedImage:
    """The upload as model input; 4xx ApiError naming the file if it is not usable."""
    data = await upload.read()
    c, h, w = service.card.input_shape
    settings = service.settings
    decode = partial(decode_image, data, channels=c, size=(h, w),
                     max_pixels=settings.max_image_pixels, background=settings.alpha_background)
    size = image_size(data)
    try:
        if size is not None and size[0] * size[1] <= INLINE_DECODE_PIXELS:
            return decode()
        return await anyio.to_thread.run_sync(decode, limiter=service.decode_limiter)
    except ImageDecodeError as e:
        where = "" if index is None else f"files[{index}] ({upload.filename!r}): "
        raise ApiError(_DECODE_STATUS[e.kind], str(e.kind), f"{where}{e}") from None


async def _analyze(service: ServiceState, images: torch.Tensor) -> BatchResult:
    """images: (N, C, H, W) float32 in [0, 1]; 503 if the queue is full."""
    try:
        return await service.batcher.submit(images)
    except OverloadedError as e:
        raise ApiError(503, "overloaded", f"{e}; retry shortly",
                       headers={"Retry-After": "1"}) from None


def _timing(start: float, decode_s: float, result: BatchResult) -> Timing:
    return Timing(decode_ms=decode_s * 1e3, queue_ms=result.queue_s * 1e3,
                  inference_ms=result.inference_s * 1e3,
                  total_ms=(time.perf_counter() - start) * 1e3, batch_size=result.batch_size)


# --- image API -------------------------------------------------------------------------------


@router.post("/classify", tags=["classify"],
             responses=error_responses(400, 401, 413, 415, 422, 503))
async def classify(
    service: AuthorizedServiceDep,
    file: Annotated[UploadFile, File(description="PNG, JPEG, WebP or BMP image")],
    top_k: TopK = 5,
    layers: Layers = True,
) -> ClassifyResponse:
    """Classify one image and judge whether it is adversarial, with its computation path."""
    start = time.perf_counter()
    decoded = await _decode(service, file)
    decode_s = time.perf_counter() - start
    result = await _analyze(service, torch.from_numpy(decoded.array)[None])  # (1, C, H, W)
    card = service.card
    body = image_result(card, result.analysis, 0, decoded, file.filename,
                        top_k=min(top_k, len(card.labels)), layers=layers)
    return ClassifyResponse(model=card.ref, timing=_timing(start, decode_s, result), **dict(body))


@router.post("/classify/batch", tags=["classify"],
             responses=error_responses(400, 401, 413, 415, 422, 503))
async def classify_batch(
    service: AuthorizedServiceDep,
    files: Annotated[list[UploadFile], File(description="images, field name 'files' for each")],
    top_k: TopK = 5,
    layers: Layers = True,
) -> BatchResponse:
    """Classify several images in one forward pass; results in upload order."""
    start = time.perf_counter()
    limit = service.settings.max_files
    if len(files) > limit:
        raise ApiError(400, "too_many_files", f"too many files: {len(files)}, at most {limit} "
                       f"per request")
    decoded = [await _decode(service, f, i) for i, f in enumerate(files)]
    decode_s = time.perf_counter() - start
    images = torch.from_numpy(np.stack([d.array for d in decoded]))  # (N, C, H, W)
    result = await _analyze(service, images)
    card = service.card
    k = min(top_k, len(card.labels))
    results = [image_result(card, result.analysis, i, d, f.filename, top_k=k, layers=layers)
               for i, (d, f) in enumerate(zip(decoded, files, strict=True))]
    return BatchResponse(model=card.ref, results=results,
                         timing=_timing(start, decode_s, result))


# --- Open Inference Protocol -----------------------------------------------------------------


@router.get("/v2/health/live", tags=["health"])
async def live() -> Live:
    """The process is up."""
    return Live(live=True)


@router.get("/v2/health/ready", tags=["health"], responses=error_responses(503))
async def ready(service: ServiceDep) -> Ready:
    """The model is loaded and warmed up (503 otherwise)."""
    return Ready(ready=service.ready)


@router.get("/v2", tags=["oip"])
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name="pathguard", version=request.app.version)


@router.get("/v2/models/{name}/ready", tags=["health"],
            responses=error_responses(404, 422, 503))
async def model_ready(service: ModelDep) -> ModelReady:
    return ModelReady(name=service.card.name, ready=service.ready)


@router.get("/v2/models/{name}", tags=["oip"],
            responses=error_responses(401, 404, 422, 503))
async def model_metadata(service: AuthorizedModelDep) -> ModelMetadata:
    """Input and output tensors of the model."""
    return oip.metadata(service.card, len(service.bundle.profile.layer_names))


@router.post("/v2/models/{name}/infer", tags=["oip"],
             responses=error_responses(400, 401, 404, 413, 422, 503))
async def infer(service: AuthorizedModelDep, request: InferRequest) -> InferResponse:
    """Score an exact FP32 tensor [N, C, H, W] in [0, 1] (no image codec in between)."""
    card = service.card
    try:
        images = oip.input_tensor(request, card.input_shape, service.settings.max_files)
        names = oip.requested_outputs(request)
    except oip.TensorError as e:
        raise ApiError(400, "invalid_tensor", str(e)) from None
    result = await _analyze(service, images)
    params: dict[str, str | int | float | bool] = {
        "threshold": card.threshold, "target_fpr": card.target_fpr,
        "batch_size": result.batch_size}
    if card.clean_fpr is not None:
        params["clean_fpr"] = card.clean_fpr
    return InferResponse(model_name=card.name, model_version=card.version, id=request.id,
                         parameters=params, outputs=oip.outputs(result.analysis, names))


# --- metrics ---------------------------------------------------------------------------------


@router.get("/metrics", tags=["health"], response_class=Response,
            responses={200: {"content": {"text/plain": {}}}, **error_responses(401)})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics of this process."""
    return Response(metrics.render(), media_type=metrics.content_type)
