"""GET /metrics: per-app Prometheus registry with request, inference and verdict metrics."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.app import create_app


def sample(text: str, metric: str, **labels: str) -> float:
    """The value of one sample line of the exposition ``text`` (0 if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(metric):
            continue
        m = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == metric:
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                return float(m.group(3))
    return 0.0


def test_metrics_count_requests_inference_and_verdicts(make_settings, digit_png):
    with TestClient(create_app(make_settings())) as client:
        for _ in range(3):
            assert client.post("/classify", files={"file": ("d.png", digit_png)}).status_code \
                == 200
        assert client.post("/classify", files={"file": ("d.png", b"")}).status_code == 400
        assert client.get("/v2/models/nope").status_code == 404
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    route = {"route": "/classify", "method": "POST"}
    assert sample(text, "pathguard_http_requests_total", status="200", **route) == 3
    assert sample(text, "pathguard_http_requests_total", status="400", **route) == 1
    assert sample(text, "pathguard_http_requests_total", route="/v2/models/{name}",
                  status="404") == 1
    assert sample(text, "pathguard_http_request_duration_seconds_count", status="200",
                  **route) == 3
    assert sample(text, "pathguard_inference_duration_seconds_count") == 3
    assert sample(text, "pathguard_inference_batch_size_sum") == 3
    verdicts = (sample(text, "pathguard_verdicts_total", verdict="clean")
                + sample(text, "pathguard_verdicts_total", verdict="adversarial"))
    assert verdicts == 3
    assert sample(text, "pathguard_queue_images") == 0
    assert sample(text, "pathguard_model_info", name="digits") == 1


def test_apps_have_separate_registries(make_settings, digit_png):
    first, second = create_app(make_settings()), create_app(make_settings())
    with TestClient(first) as a, TestClient(second) as b:
        a.post("/classify", files={"file": ("d.png", digit_png)})
        text_a, text_b = a.get("/metrics").text, b.get("/metrics").text
    labels = {"route": "/classify", "method": "POST", "status": "200"}
    assert sample(text_a, "pathguard_http_requests_total", **labels) == 1
    assert sample(text_b, "pathguard_http_requests_total", **labels) == 0
