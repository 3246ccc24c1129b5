"""The same FastAPI app on Ray Serve: replicas, each with its own model, behind Serve's proxy.

Start it with one command (needs the ``ray`` extra: ``pip install -c constraints.txt -e
".[ray]"``)::

    PATHGUARD_BUNDLE=models/mnist/bundle PATHGUARD_REPLICAS=2 \\
        serve run service.ray_serve:build_app

Settings are the plain server's (:class:`service.config.Settings`: ``PATHGUARD_*`` variables
or ``.env``), read once by the builder and handed to every replica; ``serve run``'s
``key=value`` arguments override them (``serve run service.ray_serve:build_app replicas=2``).
``PATHGUARD_REPLICAS`` sets the number of replicas; with ``PATHGUARD_MAX_REPLICAS`` above it,
Serve autoscales between the two on the requests in flight per replica (target:
``max_batch_size``). Each replica is a Ray actor reserving ``inference_threads`` CPUs that runs
the app's lifespan once: it loads and verifies the bundle, picks the execution mode, warms up,
and batches concurrent requests with ``serve.batch`` (:mod:`service.serve_batching`) where the
plain server uses its micro-batcher. Routes, response bodies, errors, health and ``/metrics``
(per replica: each scrape is answered by one of them) are the plain server's. Serve's HTTP
proxy listens on ``PATHGUARD_HOST:PATHGUARD_PORT`` (default 127.0.0.1:8000) and sets the
connection limits and timeouts there itself; uvicorn's (``header_timeout``,
``keep_alive_timeout``, ``max_connections``, ``workers``) apply to the plain server only.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from detector.bundle import BundleError, load_bundle
from service.app import create_app
from service.config import Settings, bundle_help
from service.serve_batching import ServeBatcher

log = logging.getLogger("service")

DEPLOYMENT = "pathguard"


@serve.ingress()
class PathguardReplica:
    """One replica: the FastAPI app of :func:`service.app.create_app` with a Serve batcher.

    Ray Serve builds the app after the constructor (``__serve_build_asgi_app__``) and runs its
    lifespan, which loads the bundle once per replica.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        logging.getLogger("service").setLevel(settings.log_level.upper())
        logging.getLogger("detector").setLevel(settings.log_level.upper())

    def __serve_build_asgi_app__(self) -> FastAPI:
        batcher = partial(ServeBatcher, max_files=self._settings.max_files)
        # Serve's proxy parses HTTP in its own process: the replica's passes run in threads
        return create_app(self._settings.model_copy(update={"inference": "thread"}),
                          batcher=batcher)

    def check_health(self) -> None:
        """Serve's periodic replica health check: the app must still hold a ready model."""
        state = self.app.state.service  # type: ignore[attr-defined]
        if state is None or not state.ready:
            raise RuntimeError("the model is not loaded")


def deployment_options(settings: Settings) -> dict[str, Any]:
    """Ray Serve deployment options from ``settings``: replicas or autoscaling, CPUs per
    replica, requests a replica takes at once, graceful shutdown.

    ValueError naming the values if ``max_replicas`` is set below ``replicas``.
    """
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.inference_threads},
        # A replica takes as many requests as its queue holds images, so that they meet in its
        # batcher (and 503 comes from the same limit as on the plain server).
        "max_ongoing_requests": settings.max_queue,
        "graceful_shutdown_timeout_s": float(settings.shutdown_timeout),
    }
    if settings.max_replicas == 0 or settings.max_replicas == settings.replicas:
        options["num_replicas"] = settings.replicas
    elif settings.max_replicas < settings.replicas:
        raise ValueError(f"max_replicas ({settings.max_replicas}) must be 0 or at least "
                         f"replicas ({settings.replicas})")
    else:
        options["autoscaling_config"] = {
            "min_replicas": settings.replicas, "initial_replicas": settings.replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.max_batch_size}
    return options


def pathguard_app(settings: Settings) -> Application:
    """The Serve application of ``settings`` (the bundle path made absolute for the replicas)."""
    settings = settings.model_copy(update={"bundle": settings.bundle.resolve()})
    deployment = serve.deployment(PathguardReplica, name=DEPLOYMENT,
                                  **deployment_options(settings))
    return deployment.bind(settings)


def build_app(args: dict[str, str] | None = None) -> Application:
    """``serve run service.ray_serve:build_app [name=value ...]``: the application.

    Settings come from the environment and ``.env``, then ``args`` (setting names, any case).
    The bundle is loaded and verified here first, so a bad one fails the command with one
    message instead of failing every replica; Serve's HTTP proxy is started on the settings'
    host and port.
    """
    overrides = {k.lower(): v for k, v in (args or {}).items()}
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(map(repr, unknown))}; see "
                         "`python -m service --help`")
    settings = Settings(**overrides)
    try:
        load_bundle(settings.bundle)
    except BundleError as e:
        raise ValueError(bundle_help(settings.bundle, str(e))) from None
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return pathguard_app(settings)
