"""Ray Serve deployment (service.ray_serve): a real single-node Ray on loopback, 2 replicas.

One Ray cluster per module (start-up is the slow part): the same requests go to the plain
app (in-process) and to Serve's HTTP proxy, and the bodies must match but for timings.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install -e '.[ray]'")

import httpx
import ray
from ray import serve

from loadtest.load_test import LoadTest, run_load_test
from loadtest.server import free_port
from loadtest.summary import report
from service.app import create_app
from service.config import Settings
from service.ray_serve import DEPLOYMENT, build_app, deployment_options, pathguard_app

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = 2


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _without_timing(body: object) -> object:
    """The body with every ``timing`` entry removed (it differs from run to run)."""
    if isinstance(body, dict):
        return {k: _without_timing(v) for k, v in body.items() if k != "timing"}
    if isinstance(body, list):
        return [_without_timing(v) for v in body]
    return body


@pytest.fixture(scope="module")
def settings(make_settings: Callable[..., Settings]) -> Settings:
    # masked execution: `auto` may time the modes differently in each process
    return make_settings(execution="masked", replicas=REPLICAS, max_files=4, max_queue=64)


@pytest.fixture(scope="module")
def serve_url(settings: Settings) -> Iterator[str]:
    """Serve's proxy URL with the app deployed on a fresh local Ray; all of it shut down after."""
    ray.init(address="local", num_cpus=REPLICAS, include_dashboard=False,
             log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(pathguard_app(settings), name=DEPLOYMENT, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def plain(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def pngs(digits_test) -> list[bytes]:
    return [_png(digits_test[0][i, 0].numpy()) for i in range(6)]


def test_replicas_are_running(serve_url):
    status = serve.status().applications[DEPLOYMENT]
    assert status.status == "RUNNING"
    replicas = status.deployments[DEPLOYMENT].replica_states
    assert replicas.get("RUNNING") == REPLICAS, replicas


def test_same_bodies_as_the_plain_server(serve_url, plain, pngs):
    with httpx.Client(base_url=serve_url, timeout=30.0) as ray_client:
        for png in pngs[:3]:
            files = {"file": ("d.png", png, "image/png")}
            a, b = plain.post("/classify?top_k=3", files=files), ray_client.post(
                "/classify?top_k=3", files=files)
            assert (a.status_code, b.status_code) == (200, 200), b.text
            assert _without_timing(b.json()) == _without_timing(a.json())
        files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:4])]
        a, b = plain.post("/classify/batch", files=files), ray_client.post(
            "/classify/batch", files=files)
        assert (a.status_code, b.status_code) == (200, 200), b.text
        assert _without_timing(b.json()) == _without_timing(a.json())
        for path in ("/v2/health/ready", "/v2/models/digits", "/nowhere"):
            a, b = plain.get(path), ray_client.get(path)
            assert (b.status_code, b.json()) == (a.status_code, a.json())
        bad = {"file": ("x.png", b"not an image", "image/png")}
        a, b = plain.post("/classify", files=bad), ray_client.post("/classify", files=bad)
        assert b.status_code == a.status_code == 415 and b.json() == a.json()


def test_concurrent_requests_are_batched_and_metered(serve_url, pngs):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=serve_url, timeout=60.0) as c:
            return await asyncio.gather(*(
                c.post("/classify?layers=false",
                       files={"file": ("d.png", pngs[i % len(pngs)], "image/png")})
                for i in range(40)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 40
    sizes = [r.json()["timing"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes  # serve.batch merged concurrent requests
    metrics = httpx.get(f"{serve_url}/metrics", timeout=30.0)
    assert metrics.status_code == 200
    assert "pathguard_inference_batch_size_count" in metrics.text
    assert 'route="/classify"' in metrics.text


def test_holds_the_load_benchmark(serve_url, bundle_dir, digits_test):
    """The load test (benchmarks/load.py --url) pointed at the 2 replicas: no failed valid
    request, no 5xx."""
    x, y = digits_test[0].numpy(), digits_test[1].numpy()
    summary = run_load_test(bundle_dir, x, y, LoadTest(
        url=serve_url, requests=120, warmup=10, concurrency=4, seed=2,
        server_env={"PATHGUARD_MAX_FILES": "4", "PATHGUARD_MAX_QUEUE": "64"}))
    assert summary.passed, report(summary)
    result = summary.to_json()
    assert result["valid"]["failed"] == 0 and result["invalid"]["unexpected"] == 0
    assert not any(s.startswith("5") for s in result["statuses"]), result["statuses"]
    assert sum(k["count"] for k in result["kinds"].values()) == 120


def test_deployment_options_from_settings(make_settings):
    fixed = deployment_options(make_settings(replicas=3, inference_threads=2, max_queue=64))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    assert fixed["max_ongoing_requests"] == 64
    scaled = deployment_options(make_settings(replicas=1, max_replicas=4, max_batch_size=8))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "initial_replicas": 1,
                                            "max_replicas": 4, "target_ongoing_requests": 8}
    with pytest.raises(ValueError, match=r"max_replicas \(2\).*replicas \(3\)"):
        deployment_options(make_settings(replicas=3, max_replicas=2))


def test_builder_refuses_bad_arguments(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no .env
    with pytest.raises(ValueError, match="'replcas'"):
        build_app({"replcas": "2"})
    with pytest.raises(ValueError, match=r"(?s)nowhere.*training\.fit_detector"):
        build_app({"bundle": str(tmp_path / "nowhere")})
