"""Open Inference Protocol endpoints: health, metadata, readiness and exact-tensor inference."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from detector.bundle import load_bundle
from service.oip import OUTPUT_NAMES


def tensor(x: np.ndarray, **changes: object) -> dict:
    body = {"name": "input", "shape": list(x.shape), "datatype": "FP32",
            "data": x.reshape(-1).tolist()}
    body.update(changes)
    return {"inputs": [body]}


@pytest.fixture(scope="module")
def pixels(digits_test) -> np.ndarray:
    return (digits_test[0][:3].numpy() / np.float32(255)).astype(np.float32)  # (3, 1, 8, 8)


def test_health(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["name"] == "pathguard"


def test_model_metadata_and_ready(client):
    meta = client.get("/v2/models/digits").json()
    assert meta["name"] == "digits" and len(meta["versions"]) == 1
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["name"] for o in meta["outputs"]] == list(OUTPUT_NAMES)
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}


@pytest.mark.parametrize("path", ["/v2/models/cifar", "/v2/models/cifar/ready"])
def test_unknown_model(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["code"] == "unknown_model"
    assert "'cifar'" in r.json()["error"]


def test_infer_unknown_model_is_404(client, pixels):
    r = client.post("/v2/models/cifar/infer", json=tensor(pixels))
    assert r.status_code == 404


def test_infer_is_exact(client, pixels, bundle_dir):
    r = client.post("/v2/models/digits/infer", json={"id": "r1", **tensor(pixels)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_name"] == "digits" and body["id"] == "r1"
    bundle = load_bundle(bundle_dir)
    assert body["parameters"]["threshold"] == pytest.approx(bundle.detector.threshold_)
    assert body["parameters"]["target_fpr"] == bundle.manifest.detector.target_fpr
    assert "fpr_confidence" not in body["parameters"]  # a plain-quantile threshold
    out = {o["name"]: o for o in body["outputs"]}
    assert list(out) == list(OUTPUT_NAMES)
    expected = bundle.analyze(torch.from_numpy(pixels))
    assert out["probabilities"]["shape"] == [3, 10]
    np.testing.assert_allclose(np.reshape(out["probabilities"]["data"], (3, 10)),
                               expected.probs, rtol=1e-5, atol=1e-7)
    assert out["prediction"]["data"] == expected.predictions.tolist()
    assert out["prediction"]["datatype"] == "INT64"
    np.testing.assert_allclose(out["adversarial_score"]["data"], expected.scores, rtol=1e-5)
    assert out["flagged"]["data"] == expected.flagged.tolist()
    assert out["flagged"]["datatype"] == "BOOL"
    assert out["layer_anomaly"]["shape"] == [3, len(expected.layer_names)]
    assert out["layer_anomaly"]["parameters"]["layers"] == ",".join(expected.layer_names)


def test_infer_selected_outputs(client, pixels):
    body = {**tensor(pixels[:1]), "outputs": [{"name": "flagged"}, {"name": "prediction"}]}
    r = client.post("/v2/models/digits/infer", json=body)
    assert [o["name"] for o in r.json()["outputs"]] == ["flagged", "prediction"]
    body["outputs"] = [{"name": "logits"}]
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 400 and "logits" in r.json()["error"]


@pytest.mark.parametrize(("change", "words"), [
    ({"shape": [3, 1, 8]}, "input shape must be [N, 1, 8, 8]"),
    ({"shape": [3, 3, 8, 8]}, "input shape must be [N, 1, 8, 8]"),
    ({"shape": [2, 1, 8, 8]}, "needs 128 values, got 192"),
    ({"shape": [0, 1, 8, 8]}, "batch size N must be between 1 and 4"),
    ({"datatype": "FP64"}, "datatype must be FP32"),
    ({"name": "image"}, "unknown input 'image'"),
])
def test_infer_bad_tensor(client, pixels, change, words):
    r = client.post("/v2/models/digits/infer", json=tensor(pixels, **change))
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_tensor" and words in r.json()["error"]


def test_infer_too_many_images(client):
    r = client.post("/v2/models/digits/infer", json=tensor(np.zeros((5, 1, 8, 8), np.float32)))
    assert r.status_code == 400 and "between 1 and 4" in r.json()["error"]


@pytest.mark.parametrize(("value", "words"), [
    (2.0, "must be in [0, 1]"), (-0.5, "must be in [0, 1]"), (255.0, "range [0, 255]"),
    (math.nan, "NaN or infinite"), (math.inf, "NaN or infinite")])
def test_infer_bad_values(client, pixels, value, words):
    x = pixels[:1].copy()
    x[0, 0, 0, 0] = value
    # the standard library writes NaN / Infinity, which Python's JSON reader accepts
    r = client.post("/v2/models/digits/infer", content=json.dumps(tensor(x)),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]


@pytest.mark.parametrize("body", [
    {}, {"inputs": []}, {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "data": ["0.5"] * 64}]},
    {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                 "data": [True] * 64}]},
    {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                 "data": [[0.0] * 8] * 8}]},
])
def test_infer_malformed_body(client, body):
    r = client.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    assert r.json()["error"]


def test_infer_without_json_content_type(client, pixels):
    r = client.post("/v2/models/digits/infer", content=json.dumps(tensor(pixels)))
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    assert "Content-Type: application/json" in r.json()["error"]


def test_infer_not_json(client):
    r = client.post("/v2/models/digits/infer", content=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "bad_request"
    assert "not valid JSON at line 1, column 2" in r.json()["error"]


def test_openapi_shows_the_models(client):
    spec = client.get("/openapi.json").json()
    assert {"/classify", "/classify/batch", "/v2/models/{name}/infer", "/metrics",
            "/v2/health/ready"} <= set(spec["paths"])
    assert {"ClassifyResponse", "InferRequest", "InferResponse", "ErrorBody"} <= set(
        spec["components"]["schemas"])
