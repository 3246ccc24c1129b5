"""The FastAPI app factory and its lifespan: load + verify the bundle, warm up, then serve.

``create_app(settings)`` builds a fresh app with its own metrics registry and no model; the
lifespan (run by uvicorn or ``with TestClient(app)``) loads the bundle, sets torch's thread
count, picks the execution mode (``PATHGUARD_EXECUTION=auto`` times masked and sparse execution
here, see :mod:`detector.execution`), starts the inference workers (processes or threads,
:mod:`service.inference`) and warms them up, starts the micro-batcher, and only then marks the
service ready. State lives on ``app.state``: ``settings``, ``metrics`` and ``service``
(:class:`~service.deps.ServiceState`, ``None`` outside the lifespan).
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from importlib.metadata import PackageNotFoundError, version

import anyio
import torch
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from PIL import Image

from detector.analysis import Analysis
from detector.bundle import Bundle, BundleError, load_bundle
from detector.execution import ExecutionPlan, fixed_plan, plan_execution
from service.batching import BatcherFactory, MicroBatcher
from service.config import Settings, bundle_help
from service.deps import PerturbState, ServiceState
from service.errors import install_error_handlers
from service.imaging import decode_image
from service.inference import inference_pool
from service.limits import BodyLimits, RateLimit
from service.metrics import Metrics, RequestMetricsMiddleware
from service.oip_routes import health, v2, v2_keyed
from service.openapi import install_schemas
from service.perturb import perturb_router, suggested_eps
from service.results import ModelCard
from service.routes import images, metrics_router
from service.schemas import InferRequest
from service.web import page

log = logging.getLogger("service")

DESCRIPTION = """Adversarial-example detection from the computation paths of a decoupled
(gated) CNN: each image gets a class prediction, a calibrated adversarial score with the
bundle's threshold and the false-positive rate it was set at, and the per-layer path report.
"""


def _package_version() -> str:
    try:
        return version("pathguard")
    except PackageNotFoundError:
        return "0+unknown"


def create_app(settings: Settings | None = None, bundle: Bundle | None = None, *,
               batcher: BatcherFactory = MicroBatcher) -> FastAPI:
    """A new app; ``settings`` default to the environment / ``.env`` (:class:`Settings`).

    ``bundle``: the already loaded and verified bundle of ``settings.bundle``; if None, the
    lifespan loads it. ``batcher``: what merges concurrent requests into forward passes (the
    in-process :class:`MicroBatcher`; Ray Serve replicas pass one built on ``serve.batch``).
    """
    settings = settings if settings is not None else Settings()
    metrics = Metrics()
    # No redirects: Starlette's trailing-slash redirect builds its URL from the Host header.
    app = FastAPI(title="pathguard", description=DESCRIPTION, version=_package_version(),
                  lifespan=_lifespan, redirect_slashes=False)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.preloaded = bundle
    app.state.batcher_factory = batcher
    install_error_handlers(app)
    routers = (page, images, *((perturb_router,) if settings.perturb else ()), health, v2,
               v2_keyed, metrics_router)
    for router in routers:
        app.include_router(router)
    _answer_head(app, routers)
    install_schemas(app, InferRequest)
    app.add_middleware(BodyLimits, max_bytes=settings.max_body_bytes,
                       timeout_s=settings.body_timeout)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app


def _answer_head(app: FastAPI, routers: tuple[APIRouter, ...]) -> None:
    """HEAD on every GET route of ``routers``, as HTTP requires (the server drops the body),
    left out of the OpenAPI schema."""
    for route in (r for router in routers for r in router.routes):
        if isinstance(route, APIRoute) and "GET" in route.methods:
            app.router.add_api_route(
                route.path, route.endpoint, methods=["HEAD"], include_in_schema=False,
                response_class=route.response_class, dependencies=route.dependencies,
                route_class_override=type(route))


def _max_batch(settings: Settings) -> int:
    """The largest batch one forward pass runs: the micro-batcher's limit, or 1 without it."""
    return settings.max_batch_size if settings.micro_batch else 1


def _batch_sizes(settings: Settings) -> list[int]:
    """The batch sizes the server runs: 1 and the largest."""
    return sorted({1, _max_batch(settings)})


async def _plan(bundle: Bundle, settings: Settings) -> ExecutionPlan:
    """The configured execution mode, or for ``auto`` the faster one measured here (in a
    thread of this process, with the inference threads' torch settings)."""
    if settings.execution != "auto":
        return fixed_plan(settings.execution)
    plan = await anyio.to_thread.run_sync(partial(
        plan_execution, bundle.analyze, bundle.spec.input_shape, _batch_sizes(settings)))
    log.info("execution auto: %s", plan.describe())
    return plan


async def _warm_up(run: Callable[[torch.Tensor], Analysis], input_shape: tuple[int, ...],
                   executor: Executor, settings: Settings) -> None:
    """Run the model at batch sizes 1 and max in every inference worker, and one decode."""
    c, h, w = input_shape
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(executor, run, torch.zeros(n, c, h, w))
            for _ in range(2 * settings.inference_workers) for n in _batch_sizes(settings)]
    await asyncio.gather(*jobs)
    png = io.BytesIO()
    Image.new("L" if c == 1 else "RGB", (w, h)).save(png, "PNG")
    decode_image(png.getvalue(), channels=c, size=(h, w), max_pixels=h * w)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    torch.set_num_threads(settings.inference_threads)
    try:
        bundle = app.state.preloaded or await anyio.to_thread.run_sync(load_bundle,
                                                                        settings.bundle)
    except BundleError as e:
        message = bundle_help(settings.bundle, str(e))
        log.error("%s", message)
        raise BundleError(message) from None
    async with AsyncExitStack() as stack:
        plan = await _plan(bundle, settings)
        executor, run = inference_pool(settings.inference, bundle, plan,
                                       settings.inference_workers, settings.inference_threads)
        stack.callback(executor.shutdown, wait=True)
        await _warm_up(run, bundle.spec.input_shape, executor, settings)
        batcher = app.state.batcher_factory(
            run, executor,
            max_batch=_max_batch(settings),
            max_wait_s=settings.batch_wait_ms / 1e3, max_pending=settings.max_queue,
            workers=settings.inference_workers, on_batch=metrics.observe_batch)
        await batcher.start()
        stack.push_async_callback(batcher.close)
        card = ModelCard.from_bundle(bundle)
        metrics.model.labels(card.name, card.version).set(1)
        metrics.track_queue(lambda: batcher.pending)
        state = ServiceState(settings=settings, bundle=bundle, card=card, batcher=batcher,
                             execution=plan,
                             decode_limiter=anyio.CapacityLimiter(settings.decode_workers))
        if settings.perturb:
            state.perturb = PerturbState(
                rate=RateLimit(settings.perturb_per_minute), limiter=anyio.CapacityLimiter(1),
                default_eps=suggested_eps(bundle, settings.perturb_max_eps))
        app.state.service = state
        state.ready = True
        log.info("ready: model %s version %s from %s (input %s, %d classes, threshold %.3f at "
                 "target FPR %.3f%s; inference in %d %s(s) of %d torch thread(s), "
                 "micro-batching %s; perturb demo %s)",
                 card.name, card.version, settings.bundle, "x".join(map(str, card.input_shape)),
                 len(card.labels), card.threshold, card.target_fpr,
                 "" if card.fpr_confidence is None
                 else f" with confidence {card.fpr_confidence:g}",
                 settings.inference_workers, settings.inference, settings.inference_threads,
                 f"up to {settings.max_batch_size}" if settings.micro_batch else "off",
                 f"on, {settings.perturb_per_minute}/min" if settings.perturb else "off")
        try:
            yield
        finally:
            state.ready = False
            app.state.service = None
            log.info("shutting down")
