"""Service state on ``app.state`` and the typed dependencies routes use to reach it.

Dependencies are ``async def`` although they do not await: FastAPI runs plain ``def``
dependencies in a worker thread, a hop per dependency per request. The key dependencies
declare the API key for the OpenAPI schema; protected routes have already checked it before
their body was read (:mod:`service.auth`), and check it again here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from detector.bundle import Bundle
from detector.execution import ExecutionPlan
from service.auth import API_KEY_HEADER, check_key
from service.batching import Batcher
from service.config import Settings
from service.errors import ApiError, shorten
from service.limits import RateLimit
from service.metrics import Metrics
from service.results import ModelCard


@dataclass
class PerturbState:
    """The perturb demo's machinery (with ``PATHGUARD_PERTURB`` on): its rate limit, one
    crafting thread at a time, and the eps used when a request gives none."""

    rate: RateLimit
    limiter: anyio.CapacityLimiter
    default_eps: float


@dataclass
class ServiceState:
    """What the lifespan builds: the loaded bundle and the machinery around it."""

    settings: Settings
    bundle: Bundle
    card: ModelCard
    batcher: Batcher
    execution: ExecutionPlan
    decode_limiter: anyio.CapacityLimiter
    perturb: PerturbState | None = None
    ready: bool = False


def _service(request: Request) -> ServiceState:
    service: ServiceState | None = request.app.state.service
    if service is None or not service.ready:
        raise ApiError(503, "not_ready", "the model is not loaded yet; retry shortly",
                       headers={"Retry-After": "1"})
    return service


def _model(service: ServiceState, name: str) -> ServiceState:
    if name != service.card.name:
        shown = shorten(name, 60)
        raise ApiError(404, "unknown_model", f"unknown model {shown!r}; this server serves "
                       f"{service.card.name!r}")
    return service


_api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                        description="required when the server has PATHGUARD_API_KEY set")
ApiKey = Annotated[str | None, Security(_api_key)]


async def get_service(request: Request) -> ServiceState:
    """The loaded service; 503 while the model is not ready. No API key needed."""
    return _service(request)


async def get_model(request: Request, name: str) -> ServiceState:
    """The service, if ``name`` (a path parameter) is the served model; else 404."""
    return _model(_service(request), name)


async def get_authorized_service(request: Request, key: ApiKey) -> ServiceState:
    """As :func:`get_service`, after a 401 unless the API key is off or matches."""
    check_key(request.app.state.settings, key)
    return _service(request)


async def get_authorized_model(request: Request, name: str, key: ApiKey) -> ServiceState:
    """As :func:`get_model`, after a 401 unless the API key is off or matches."""
    check_key(request.app.state.settings, key)
    return _model(_service(request), name)


async def get_metrics_authorized(request: Request, key: ApiKey) -> Metrics:
    """The metrics; 401 if ``metrics_require_key`` is set and the key does not match."""
    settings: Settings = request.app.state.settings
    if settings.metrics_require_key:
        check_key(settings, key)
    return request.app.state.metrics


# One dependency per route keeps FastAPI's per-request dependency solving short.
ServiceDep = Annotated[ServiceState, Depends(get_service)]
ModelDep = Annotated[ServiceState, Depends(get_model)]
AuthorizedServiceDep = Annotated[ServiceState, Depends(get_authorized_service)]
AuthorizedModelDep = Annotated[ServiceState, Depends(get_authorized_model)]
MetricsDep = Annotated[Metrics, Depends(get_metrics_authorized)]
