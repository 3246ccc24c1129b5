"""Hostile uploads: every file of the hostile corpus (loadtest.hostile_corpus) gets its expected
answer, the server stays healthy afterwards, and mutated images never crash the decoder."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest.hostile_check import problems, upload
from loadtest.hostile_corpus import CORPUS, HostileFile, digit_png
from loadtest.image_bytes import colour, encode, grey
from service.app import create_app
from service.config import Settings
from service.imaging import ImageDecodeError, decode_image


@pytest.fixture(scope="module")
def hostile_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """A client of an app with the default limits (8 MiB bodies, 4096 x 4096 pixels)."""
    with TestClient(create_app(make_settings())) as client:
        yield client


def post(client: TestClient, item: HostileFile, data: bytes) -> tuple[int, object]:
    body, content_type = upload(item, data)
    r = client.post("/classify", content=body, headers={"Content-Type": content_type})
    assert r.headers["content-type"] == "application/json", r.text[:200]
    return r.status_code, r.json()


def test_corpus_is_large_and_varied() -> None:
    names = [f.name for f in CORPUS]
    assert len(names) == len(set(names)) >= 30
    statuses = {f.status for f in CORPUS}
    assert statuses == {200, 400, 413, 415}
    assert all((f.status == 200) == (f.code is None) for f in CORPUS)


@pytest.mark.parametrize("item", CORPUS, ids=lambda f: f.name)
def test_hostile_upload_gets_its_answer(hostile_client: TestClient, item: HostileFile) -> None:
    status, body = post(hostile_client, item, item.make())
    assert not problems(item, status, body)
    if item.reference is not None:
        ref_status, ref = post(hostile_client, HostileFile("reference.png", "", digit_png, 200),
                               item.reference())
        assert ref_status == 200
        assert isinstance(body, dict) and isinstance(ref, dict)
        assert body["prediction"] == ref["prediction"]
        assert body["adversarial"]["score"] == pytest.approx(ref["adversarial"]["score"],
                                                             abs=1e-6)
    assert hostile_client.get("/v2/health/ready").json() == {"ready": True}


def test_server_is_healthy_after_the_corpus(hostile_client: TestClient) -> None:
    """Runs after the corpus (same module app): ready, still classifies, and no 5xx ever."""
    assert hostile_client.get("/v2/health/ready").status_code == 200
    r = hostile_client.post("/classify", files={"file": ("d.png", digit_png(), "image/png")})
    assert r.status_code == 200 and r.json()["input"]["format"] == "PNG"
    metrics = hostile_client.get("/metrics").text
    route_counts = re.findall(r'pathguard_http_requests_total\{[^}]*route="/classify"[^}]*'
                              r'status="(\d+)"[^}]*\} (\S+)', metrics)
    statuses = {s for s, _ in route_counts}
    assert {"200", "400", "413", "415"} <= statuses
    assert not {s for s in statuses if s.startswith("5")}
    assert sum(float(n) for _, n in route_counts) >= len(CORPUS)


def test_script_writes_the_corpus(tmp_path: Path) -> None:
    """``python benchmarks/hostile_corpus.py DIR`` (run as a user runs it) writes every file."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "hostile_corpus.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {f.name for f in CORPUS} | {"expected.json"}
    assert (tmp_path / "empty.png").stat().st_size == 0
    assert (tmp_path / "too_big_body.png").stat().st_size == 9 << 20
    assert f"wrote {len(CORPUS)} files" in proc.stdout


#: Valid images of every allowed format to mutate.
SEEDS = (encode(colour(12, 10), "PNG"), encode(grey().convert("1"), "PNG"),
         encode(colour(12, 10).convert("P"), "PNG", transparency=3),
         encode(colour(12, 10), "JPEG"), encode(colour(12, 10), "JPEG", progressive=True),
         encode(colour(12, 10), "WEBP"), encode(colour(12, 10).convert("RGBA"), "WEBP",
                                                lossless=True),
         encode(colour(12, 10), "BMP"), encode(grey().convert("P"), "BMP", compression=1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(SEEDS),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                      min_size=1, max_size=6),
       cut=st.floats(0.05, 1.0), channels=st.sampled_from([1, 3]))
def test_mutated_images_decode_or_fail_cleanly(seed: bytes, edits: list[tuple[float, int]],
                                               cut: float, channels: int) -> None:
    """Byte edits and truncation of valid images: a typed ImageDecodeError or a valid array,
    never another exception (which the server would turn into a 500)."""
    data = bytearray(seed[:max(1, int(len(seed) * cut))])
    for where, value in edits:
        data[int(where * len(data))] = value
    try:
        out = decode_image(bytes(data), channels=channels, size=(8, 8), max_pixels=4096 * 4096)
    except ImageDecodeError as e:
        assert str(e)
        return
    assert out.array.shape == (channels, 8, 8) and out.array.dtype == np.float32
    assert np.isfinite(out.array).all() and 0.0 <= out.array.min() <= out.array.max() <= 1.0
