"""Optional API key: off by default; when set, required except for health (and metrics)."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app

KEY = "s3cret-key"
INFER = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                     "data": np.zeros(64).tolist()}]}


@pytest.fixture(scope="module")
def keyed(make_settings):
    with TestClient(create_app(make_settings(api_key=KEY))) as client:
        yield client


def protected(client: TestClient, digit_png: bytes, headers: dict[str, str]) -> list[int]:
    return [
        client.post("/classify", files={"file": ("d.png", digit_png)}, headers=headers)
        .status_code,
        client.post("/classify/batch", files={"files": ("d.png", digit_png)}, headers=headers)
        .status_code,
        client.get("/v2/models/digits", headers=headers).status_code,
        client.post("/v2/models/digits/infer", json=INFER, headers=headers).status_code,
    ]


def test_key_required_when_set(keyed, digit_png):
    assert protected(keyed, digit_png, {}) == [401] * 4
    assert protected(keyed, digit_png, {"X-API-Key": "wrong"}) == [401] * 4
    assert protected(keyed, digit_png, {"X-API-Key": KEY}) == [200] * 4
    r = keyed.post("/classify", files={"file": ("d.png", digit_png)})
    assert r.json()["code"] == "unauthorized" and "X-API-Key" in r.json()["error"]
    assert r.headers["WWW-Authenticate"] == "X-API-Key"


def test_health_and_metrics_stay_open(keyed):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/digits/ready", "/v2",
                 "/metrics", "/openapi.json"):
        assert keyed.get(path).status_code == 200, path


def test_metrics_key_optional(make_settings):
    with TestClient(create_app(make_settings(api_key=KEY, metrics_require_key=True))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200


def test_no_key_by_default(client, digit_png):
    assert protected(client, digit_png, {}) == [200] * 4


def test_openapi_declares_the_key(keyed):
    schemes = keyed.get("/openapi.json").json()["components"]["securitySchemes"]
    assert any(s.get("name") == "X-API-Key" for s in schemes.values())
