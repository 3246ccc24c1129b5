"""HTTP routes of the image API and metrics: decode -> micro-batched analysis -> response.

Each resource has its own router, whose route class checks the API key before the body is
read (:mod:`service.auth`) and, for the image routes, the multipart body's shape before it is
parsed (:mod:`service.bodies`). The Open Inference Protocol routes are in
:mod:`service.oip_routes`. HTTP errors live here and there.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import BrokenExecutor
from functools import partial
from typing import Annotated

import anyio
import numpy as np
import torch
from fastapi import APIRouter, File, Query, Response, UploadFile

from service.auth import MetricsRoute
from service.batching import BatchResult, OverloadedError
from service.bodies import MultipartRoute
from service.deps import AuthorizedServiceDep, MetricsDep, ServiceState
from service.errors import ApiError
from service.imaging import DecodedImage, DecodeErrorKind, ImageDecodeError, decode_image
from service.results import image_result
from service.schemas import BatchResponse, ClassifyResponse, Timing, error_responses

log = logging.getLogger(__name__)

images = APIRouter(route_class=MultipartRoute, tags=["classify"])
metrics_router = APIRouter(route_class=MetricsRoute, tags=["health"])

DECODE_STATUS = {
    DecodeErrorKind.EMPTY: 400,
    DecodeErrorKind.NOT_AN_IMAGE: 415,
    DecodeErrorKind.UNSUPPORTED_FORMAT: 415,
    DecodeErrorKind.CORRUPT: 400,
    DecodeErrorKind.TOO_LARGE: 413,
    DecodeErrorKind.TOO_COMPLEX: 413,
}

TopK = Annotated[int, Query(ge=1, le=1000, description="how many classes to list (capped at "
                                                       "the number of classes)")]
Layers = Annotated[bool, Query(description="include the per-layer path report")]
Filters = Annotated[bool, Query(description="with layers: each layer's filters, open or "
                                            "closed, and how often the predicted class opens "
                                            "each (the path as a picture needs them)")]


# --- helpers ---------------------------------------------------------------------------------


def _decode_in_order(service: ServiceState, blobs: list[bytes]
                     ) -> list[DecodedImage] | tuple[int, ImageDecodeError]:
    """Decode every blob (in a decode worker); at the first failure, its index and error."""
    c, h, w = service.card.input_shape
    settings = service.settings
    decode = partial(decode_image, channels=c, size=(h, w),
                     max_pixels=settings.max_image_pixels, background=settings.alpha_background)
    decoded = []
    for i, data in enumerate(blobs):
        try:
            decoded.append(decode(data))
        except ImageDecodeError as e:
            return i, e
    return decoded


async def decode_uploads(service: ServiceState, uploads: list[UploadFile], *, named: bool
                         ) -> list[DecodedImage]:
    """The uploads as model input, decoded in one trip to the decode pool (never on the event
    loop); 4xx ApiError for the first unusable one (naming it if ``named``)."""
    blobs = [await upload.read() for upload in uploads]
    result = await anyio.to_thread.run_sync(_decode_in_order, service, blobs,
                                            limiter=service.decode_limiter)
    if isinstance(result, list):
        return result
    index, error = result
    where = f"files[{index}] ({uploads[index].filename!r}): " if named else ""
    raise ApiError(DECODE_STATUS[error.kind], str(error.kind), f"{where}{error}")


async def analyze(service: ServiceState, images: torch.Tensor) -> BatchResult:
    """images: (N, C, H, W) float32 in [0, 1]; 503 if the queue is full, or if the inference
    workers are gone (then the service stops being ready, for good: restart it)."""
    try:
        return await service.batcher.submit(images)
    except OverloadedError as e:
        raise ApiError(503, "overloaded", f"{e}; retry shortly",
                       headers={"Retry-After": "1"}) from None
    except BrokenExecutor:
        service.ready = False
        log.critical("an inference worker died: the service is not ready any more; restart it")
        raise ApiError(503, "inference_failed", "the inference worker died; the server must be "
                       "restarted") from None


def _timing(start: float, decode_s: float, result: BatchResult) -> Timing:
    return Timing(decode_ms=decode_s * 1e3, queue_ms=result.queue_s * 1e3,
                  inference_ms=result.inference_s * 1e3,
                  total_ms=(time.perf_counter() - start) * 1e3, batch_size=result.batch_size)


# --- image API -------------------------------------------------------------------------------


@images.post("/classify", responses=error_responses(400, 401, 408, 413, 415, 422, 503))
async def classify(
    service: AuthorizedServiceDep,
    file: Annotated[UploadFile, File(description="PNG, JPEG, WebP or BMP image")],
    top_k: TopK = 5,
    layers: Layers = True,
    filters: Filters = False,
) -> ClassifyResponse:
    """Classify one image and judge whether it is adversarial, with its computation path."""
    start = time.perf_counter()
    [decoded] = await decode_uploads(service, [file], named=False)
    decode_s = time.perf_counter() - start
    result = await analyze(service, torch.from_numpy(decoded.array)[None])  # (1, C, H, W)
    card = service.card
    body = image_result(card, result.analysis, 0, decoded, file.filename,
                        top_k=min(top_k, len(card.labels)), layers=layers,
                        filters=service.bundle.profile if filters else None)
    return ClassifyResponse(model=card.ref, timing=_timing(start, decode_s, result), **dict(body))


@images.post("/classify/batch", responses=error_responses(400, 401, 408, 413, 415, 422, 503))
async def classify_batch(
    service: AuthorizedServiceDep,
    files: Annotated[list[UploadFile], File(description="images, field name 'files' for each")],
    top_k: TopK = 5,
    layers: Layers = True,
    filters: Filters = False,
) -> BatchResponse:
    """Classify several images in one forward pass; results in upload order."""
    start = time.perf_counter()
    limit = service.settings.max_files
    if len(files) > limit:
        raise ApiError(400, "too_many_files", f"too many files: {len(files)}, at most {limit} "
                       f"per request")
    decoded = await decode_uploads(service, files, named=True)
    decode_s = time.perf_counter() - start
    batch = torch.from_numpy(np.stack([d.array for d in decoded]))  # (N, C, H, W)
    result = await analyze(service, batch)
    card = service.card
    k = min(top_k, len(card.labels))
    profile = service.bundle.profile if filters else None
    results = [image_result(card, result.analysis, i, d, f.filename, top_k=k, layers=layers,
                            filters=profile)
               for i, (d, f) in enumerate(zip(decoded, files, strict=True))]
    return BatchResponse(model=card.ref, results=results,
                         timing=_timing(start, decode_s, result))


# --- metrics ---------------------------------------------------------------------------------


@metrics_router.get("/metrics", response_class=Response,
                    responses={200: {"content": {"text/plain": {}}}, **error_responses(401)})
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics of this process."""
    return Response(metrics.render(), media_type=metrics.content_type)
