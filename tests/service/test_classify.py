"""POST /classify and /classify/batch: responses, query options and every bad-input case."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from detector.bundle import load_bundle
from service.app import create_app
from service.results import ModelCard
from service.schemas import Adversarial


def test_classify_matches_the_bundle(client, digit_png, digits_test, bundle_dir):
    r = client.post("/classify", files={"file": ("digit.png", digit_png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = load_bundle(bundle_dir).analyze(digits_test[0][:1].float() / 255)
    assert body["prediction"]["index"] == int(expected.predictions[0])
    assert body["prediction"]["label"] == str(int(expected.predictions[0]))
    assert body["prediction"]["confidence"] == pytest.approx(float(expected.probs[0].max()))
    assert len(body["prediction"]["top_k"]) == 5
    probs = [c["probability"] for c in body["prediction"]["top_k"]]
    assert probs == sorted(probs, reverse=True)
    adv = body["adversarial"]
    assert adv["score"] == pytest.approx(float(expected.scores[0]))
    assert adv["flagged"] == bool(expected.flagged[0])
    assert adv["verdict"] == ("adversarial" if adv["flagged"] else "clean")
    assert adv["threshold"] == pytest.approx(expected.threshold)
    assert adv["target_fpr"] == 0.05 and 0 <= adv["clean_fpr"] <= 1
    assert adv["fpr_confidence"] is None  # the fixture's threshold is the plain quantile
    path = body["path"]
    layers = path["layers"]
    assert {la["name"] for la in layers} == set(expected.layer_names)
    anomalies = [la["anomaly"] for la in layers]
    assert anomalies == sorted(anomalies, reverse=True)
    assert path["max_anomaly"] == pytest.approx(anomalies[0])
    assert all(0 <= la["open"] <= la["total"] for la in layers)
    assert path["open_fraction"] == pytest.approx(float(expected.open_fraction[0]))
    assert path["flops_fraction"] == pytest.approx(float(expected.flops_fraction[0]))
    assert body["input"] == {"filename": "digit.png", "format": "PNG", "width": 8, "height": 8,
                             "mode": "L", "resized": False, "converted": False, "lossy": False,
                             "model_input": [1, 8, 8], "note": None}
    assert body["model"]["name"] == "digits" and len(body["model"]["version"]) == 12
    assert body["timing"]["batch_size"] >= 1 and body["timing"]["total_ms"] > 0


def test_a_bounded_threshold_states_its_confidence(bundle_dir):
    """A bundle whose threshold bounds the clean FPR with a confidence (fit_detector
    --fpr-confidence) says so in every verdict; the schema keeps it a probability."""
    bundle = load_bundle(bundle_dir)
    point = dataclasses.replace(bundle.manifest.detector, fpr_confidence=0.95)
    bundle.manifest = dataclasses.replace(bundle.manifest, detector=point)
    card = ModelCard.from_bundle(bundle)
    assert card.fpr_confidence == 0.95
    verdict = dict(score=0.2, flagged=False, verdict="clean", threshold=card.threshold,
                   target_fpr=card.target_fpr, clean_fpr=card.clean_fpr)
    assert Adversarial(**verdict, fpr_confidence=card.fpr_confidence).fpr_confidence == 0.95
    with pytest.raises(ValueError, match="fpr_confidence"):
        Adversarial(**verdict, fpr_confidence=1.0)


def test_query_options(client, digit_png):
    r = client.post("/classify?top_k=50&layers=false", files={"file": ("d.png", digit_png)})
    assert r.status_code == 200, r.text
    assert len(r.json()["prediction"]["top_k"]) == 10  # capped at the number of classes
    assert r.json()["path"]["layers"] is None
    r = client.post("/classify?top_k=0", files={"file": ("d.png", digit_png)})
    assert r.status_code == 422 and "top_k" in r.json()["error"]


def test_resized_colour_jpeg_is_reported(client, encode):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    r = client.post("/classify", files={"file": ("c.jpg", encode(Image.fromarray(rgb), "JPEG"))})
    assert r.status_code == 200, r.text
    info = r.json()["input"]
    assert (info["format"], info["width"], info["height"], info["mode"]) == ("JPEG", 24, 32, "RGB")
    assert info["resized"] and info["converted"] and info["lossy"]
    assert "resized from 24x32 to 8x8" in info["note"] and "/v2/models/digits/infer" in info["note"]


def test_large_images_decode_off_the_event_loop(make_settings, encode):
    big = np.random.default_rng(0).integers(0, 256, (160, 160), dtype=np.uint8)  # > 128x128
    with TestClient(create_app(make_settings())) as c:
        r = c.post("/classify", files={"file": ("big.png", encode(Image.fromarray(big)))})
        assert r.status_code == 200, r.text
        assert r.json()["input"]["resized"]
        r = c.post("/classify", files={"file": ("big.png", encode(Image.fromarray(big))[:500])})
        assert r.status_code == 400 and r.json()["code"] == "corrupt_image"


def test_transparent_png(client, encode):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    r = client.post("/classify", files={"file": ("t.png", encode(Image.fromarray(rgba)))})
    assert r.status_code == 200 and r.json()["input"]["converted"]


def test_batch_is_one_forward_pass_in_upload_order(client, digits_test, encode, bundle_dir):
    x = digits_test[0][:3]
    files = [("files", (f"{i}.png", encode(Image.fromarray(x[i, 0].numpy())), "image/png"))
             for i in range(3)]
    r = client.post("/classify/batch?top_k=2", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["timing"]["batch_size"] == 3
    expected = load_bundle(bundle_dir).analyze(x.float() / 255)
    assert [res["input"]["filename"] for res in body["results"]] == ["0.png", "1.png", "2.png"]
    assert [res["prediction"]["index"] for res in body["results"]] == expected.predictions.tolist()
    np.testing.assert_allclose([res["adversarial"]["score"] for res in body["results"]],
                               expected.scores, rtol=1e-5)
    assert all(len(res["prediction"]["top_k"]) == 2 for res in body["results"])


def error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == code and body["error"]
    return body["error"]


@pytest.mark.parametrize(("data", "status", "code", "words"), [
    (b"", 400, "empty", "empty"),
    (b"just some text", 415, "not_an_image", "not an image"),
    (b"GIF89a" + b"\x00" * 30, 415, "unsupported_format", "GIF images are not supported"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", 400, "corrupt_image", "PNG"),
])
def test_bad_uploads(client, data, status, code, words):
    message = error(client.post("/classify", files={"file": ("x.png", data)}), status, code)
    assert words in message


def test_truncated_image(client, encode):
    data = encode(Image.fromarray(np.full((64, 64), 7, dtype=np.uint8)), "JPEG")
    message = error(client.post("/classify", files={"file": ("x.jpg", data[:200])}),
                    400, "corrupt_image")
    assert "truncated" in message


def test_image_dimensions_over_the_limit(client, encode):
    data = encode(Image.new("L", (101, 100)))  # 10100 pixels > 10000
    message = error(client.post("/classify", files={"file": ("x.png", data)}),
                    413, "image_too_large")
    assert "101x100" in message


def test_body_over_the_limit(client):
    message = error(client.post("/classify", files={"file": ("x.png", b"\x00" * 300_000)}),
                    413, "content_too_large")
    assert "200000 bytes" in message


def test_streamed_body_over_the_limit(client):
    def chunks():
        for _ in range(30):
            yield b"\x00" * 10_000
    r = client.post("/classify", content=chunks(),
                    headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "200000 bytes" in r.json()["error"]


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"files": {"image": ("d.png", b"123")}}, "file"),
    ({"content": b""}, "file"),
    ({"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}}, "file"),
])
def test_missing_field_is_explained(client, kwargs, field):
    message = error(client.post("/classify", **kwargs), 422, "validation_error")
    assert f"missing form field {field!r}" in message and "multipart/form-data" in message


def test_text_field_instead_of_file(client):
    message = error(client.post("/classify", data={"file": "not a file"}), 422,
                    "validation_error")
    assert "not a file upload" in message and "multipart/form-data" in message


def test_batch_errors_name_the_file(client, digit_png):
    files = [("files", ("good.png", digit_png)), ("files", ("bad.png", b"nope"))]
    message = error(client.post("/classify/batch", files=files), 415, "not_an_image")
    assert "files[1] ('bad.png')" in message
    message = error(client.post("/classify/batch", files={"file": ("d.png", digit_png)}),
                    422, "validation_error")
    assert "'files'" in message


def test_too_many_files(client, digit_png):
    files = [("files", (f"{i}.png", digit_png)) for i in range(5)]
    message = error(client.post("/classify/batch", files=files), 400, "too_many_files")
    assert "at most 4" in message


def test_malformed_multipart(client):
    r = client.post("/classify", content=b"--x\r\nContent-Disposition: form-data\r\n\r\n",
                    headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert 400 <= r.status_code < 500 and r.json()["error"]


def test_unknown_route_and_method(client):
    assert error(client.get("/nowhere"), 404, "not_found").startswith("no such endpoint")
    error(client.get("/classify"), 405, "method_not_allowed")


def test_overload_gives_503(make_settings, digit_png):
    # threads: the test holds the slot with a function of its own, which a process can't run
    app = create_app(make_settings(max_queue=1, max_files=1, inference="thread"))
    gate, started = threading.Event(), threading.Event()
    with TestClient(app) as client:
        service = app.state.service
        analyze = service.bundle.analyze

        def slow(x: torch.Tensor):
            started.set()
            gate.wait(10)
            return analyze(x)

        service.batcher._run = slow  # hold the only queue slot
        results = []
        first = threading.Thread(target=lambda: results.append(
            client.post("/classify", files={"file": ("d.png", digit_png)})))
        first.start()
        assert started.wait(10)
        message = error(client.post("/classify", files={"file": ("d.png", digit_png)}),
                        503, "overloaded")
        gate.set()
        first.join(10)
    assert "at capacity" in message
    assert results[0].status_code == 200


def test_every_execution_mode_serves_the_same_answer(client, make_settings, digit_png):
    """masked, sparse and the shared app's auto (timed at start-up) answer alike and say so."""
    files = {"file": ("d.png", digit_png, "image/png")}
    answers = {}
    for mode in ("masked", "sparse"):
        with TestClient(create_app(make_settings(execution=mode))) as mode_client:
            r = mode_client.post("/classify", files=files)
        assert r.status_code == 200, r.text
        answers[mode] = r.json()
        assert answers[mode]["path"]["execution"] == mode
    plan = client.app.state.service.execution
    assert set(plan.timings_ms) == {1, client.app.state.settings.max_batch_size}
    assert all(set(t) == {"masked", "sparse"} and min(t.values()) > 0
               for t in plan.timings_ms.values())
    auto = client.post("/classify", files=files).json()
    assert auto["path"]["execution"] == plan.single
    for answer in (answers["sparse"], auto):
        assert answer["prediction"]["index"] == answers["masked"]["prediction"]["index"]
        assert answer["adversarial"]["score"] == pytest.approx(
            answers["masked"]["adversarial"]["score"], abs=1e-5)
        assert answer["path"]["open_fraction"] == answers["masked"]["path"]["open_fraction"]
