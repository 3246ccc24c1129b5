"""Prometheus metrics of one app, in the app's own registry (no global state).

Exposed at ``GET /metrics`` (names below carry the ``pathguard_`` prefix):

- ``http_requests_total{route, method, status}`` and
  ``http_request_duration_seconds{route, method, status}``: every request, by route template
  (``unmatched`` for unknown paths) and method (``other`` for non-standard ones), so the label
  values form a closed set whatever clients send;
- ``inference_duration_seconds``: one forward pass with the detector (a micro-batch);
- ``inference_batch_size``: images per forward pass;
- ``verdicts_total{verdict}``: images judged ``clean`` or ``adversarial``;
- ``queue_images``: images queued or running now;
- ``model_info{name, version}``: 1 for the served model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from detector.analysis import Analysis

NAMESPACE = "pathguard"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: Methods counted under their own name; any other is counted as ``other``.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class Metrics:
    """The service's collectors in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        self.requests = Counter("http_requests", "HTTP requests by route template, method "
                                "and status", ["route", "method", "status"], namespace=ns,
                                registry=r)
        self.latency = Histogram("http_request_duration_seconds", "HTTP request latency",
                                 ["route", "method", "status"], namespace=ns, registry=r,
                                 buckets=_LATENCY_BUCKETS)
        self.inference = Histogram("inference_duration_seconds", "One forward pass with the "
                                   "detector (a micro-batch)", namespace=ns, registry=r,
                                   buckets=_LATENCY_BUCKETS)
        self.batch_size = Histogram("inference_batch_size", "Images per forward pass",
                                    namespace=ns, registry=r, buckets=_BATCH_BUCKETS)
        self.verdicts = Counter("verdicts", "Images judged clean or adversarial",
                                ["verdict"], namespace=ns, registry=r)
        self.queue = Gauge("queue_images", "Images queued or in a forward pass", namespace=ns,
                           registry=r)
        self.model = Gauge("model_info", "The served model", ["name", "version"],
                           namespace=ns, registry=r)

    def observe_batch(self, analysis: Analysis, seconds: float) -> None:
        """Record one forward pass of ``len(analysis.scores)`` images."""
        n = len(analysis.scores)
        flagged = int(analysis.flagged.sum())
        self.inference.observe(seconds)
        self.batch_size.observe(n)
        if flagged:
            self.verdicts.labels("adversarial").inc(flagged)
        if n - flagged:
            self.verdicts.labels("clean").inc(n - flagged)

    def track_queue(self, pending: Callable[[], float]) -> None:
        """Read the queue gauge from ``pending()`` at each scrape."""
        self.queue.set_function(pending)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)


def request_labels(scope: Scope, status: int) -> tuple[str, str, str]:
    """(route, method, status) labels from a closed set: the route's template or
    ``unmatched``, a standard method or ``other``, the status code. Client-chosen paths and
    method names never become label values (each would be a new series)."""
    route = scope.get("route")
    template = getattr(route, "path", None) or "unmatched"
    method = scope["method"] if scope["method"] in METHODS else "other"
    return template, method, str(status)


class RequestMetricsMiddleware:
    """ASGI middleware counting and timing every HTTP request by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            labels = request_labels(scope, status)
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
