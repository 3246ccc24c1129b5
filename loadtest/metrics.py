"""Reading the server's Prometheus metrics (``GET /metrics``)."""

from __future__ import annotations

import re

import httpx


def metric_value(metrics_text: str, name: str, default: float = 0.0) -> float:
    """The value of the unlabelled sample ``name`` in Prometheus text (``default`` if absent)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics_text, flags=re.MULTILINE)
    return float(match.group(1)) if match else default


def forward_passes(url: str, timeout: float = 30.0) -> tuple[float, float]:
    """(images, forward passes) the server at base URL ``url`` has run so far: the sum and
    count of its ``pathguard_inference_batch_size`` histogram. Under Ray Serve each scrape
    reaches one replica."""
    text = httpx.get(f"{url}/metrics", timeout=timeout).text
    return (metric_value(text, "pathguard_inference_batch_size_sum"),
            metric_value(text, "pathguard_inference_batch_size_count"))
