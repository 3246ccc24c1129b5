"""The web page's server side: its files, /ui/config, samples, per-filter paths, /perturb and
its rate limit, and the command-line flags of ``python -m service``."""

from __future__ import annotations

import base64
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.__main__ import build_parser
from service.app import create_app
from service.config import Settings
from service.limits import RateLimit
from service.web import CSP, SAMPLES_DIR, sample_sets


def test_page_and_its_files_are_served_with_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP and "script-src 'self'" in CSP
    assert '<script src="/ui/app.js"' in r.text and "<script>" not in r.text  # no inline code
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        r = client.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
    assert client.head("/").status_code == 200


@pytest.mark.parametrize("path", ["/ui/index.html.bak",
                                  "/ui/samples/%2e%2e%2fapp.js", "/ui/page", "/ui/samples/x.png"])
def test_nothing_else_is_served(client, path):
    r = client.get(path)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def test_config_lists_the_samples_of_the_served_data_set(client):
    config = client.get("/ui/config").json()
    assert config["key_required"] is False
    assert config["perturb"]["enabled"] is False  # off by default
    assert [s["label"] for s in config["samples"]] == [str(c) for c in range(10)]  # digits
    r = client.get(config["samples"][3]["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_every_shipped_sample_set_is_complete():
    sets = {s.name: (shape, labels, s) for shape, labels, s in sample_sets()}
    assert set(sets) >= {"digits", "mnist", "cifar10"}
    assert sets["cifar10"][0] == (3, 32, 32) and sets["mnist"][0] == (1, 28, 28)
    for shape, labels, samples in sets.values():
        assert sorted(samples.files.values()) == sorted(labels)
        for name in samples.files:
            with Image.open(SAMPLES_DIR / samples.name / name) as im:
                assert (len(im.getbands()), im.height, im.width) == shape, name


def test_samples_are_classified_as_their_class(client):
    """The samples are test images the committed bundles get right; the tiny test bundle
    (1 epoch) gets most of them."""
    config = client.get("/ui/config").json()
    right = 0
    for s in config["samples"]:
        png = client.get(s["url"]).content
        r = client.post("/classify", files={"file": ("s.png", png, "image/png")})
        right += r.json()["prediction"]["label"] == s["label"]
    assert right >= 6


def test_filters_give_the_path_of_every_layer(client, digit_png, bundle_dir):
    r = client.post("/classify?filters=true", files={"file": ("d.png", digit_png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    layers = body["path"]["layers"]
    assert sorted(layer["depth"] for layer in layers) == list(range(len(layers)))
    predicted = body["prediction"]["index"]
    from detector.bundle import load_bundle

    profile = load_bundle(bundle_dir).profile
    for layer in layers:
        f = layer["filters"]
        assert len(f["open"]) == len(f["class_frequency"]) == layer["total"]
        assert sum(f["open"]) == layer["open"]
        expected = np.asarray(profile.layers[layer["name"]].freq[predicted], dtype=np.float64)
        np.testing.assert_allclose(f["class_frequency"], expected, atol=5e-5)
    plain = client.post("/classify", files={"file": ("d.png", digit_png, "image/png")}).json()
    assert all(layer["filters"] is None for layer in plain["path"]["layers"])


def test_perturb_is_not_served_by_default(client, digit_png):
    r = client.post("/perturb", files={"file": ("d.png", digit_png, "image/png")})
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    assert "/perturb" not in client.get("/openapi.json").json()["paths"]


@pytest.fixture(scope="module")
def perturb_client(make_settings):
    app = create_app(make_settings(perturb=True, perturb_per_minute=5, perturb_max_eps=0.3,
                                   api_key="k"))
    with TestClient(app, headers={"X-API-Key": "k"}) as c:
        yield c


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_perturb_returns_both_analyses_and_the_image(perturb_client, digit_png, attack):
    r = perturb_client.post(f"/perturb?attack={attack}&eps=0.25&filters=true",
                            files={"file": ("d.png", digit_png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    a = body["attack"]
    assert a["name"] == attack and a["eps"] == 0.25 and 0 < a["linf"] <= 0.25
    assert a["attacked_class"]["index"] == body["original"]["prediction"]["index"]
    assert a["prediction_changed"] == (body["perturbed"]["prediction"]["index"]
                                       != a["attacked_class"]["index"])
    assert body["perturbed"]["path"]["layers"][0]["filters"] is not None
    assert body["image"].startswith("data:image/png;base64,")
    png = base64.b64decode(body["image"].split(",", 1)[1])
    again = perturb_client.post("/classify", files={"file": ("p.png", png, "image/png")}).json()
    assert again["adversarial"]["score"] == pytest.approx(body["perturbed"]["adversarial"]["score"])
    assert again["prediction"]["index"] == body["perturbed"]["prediction"]["index"]
    assert again["prediction"]["confidence"] == pytest.approx(
        body["perturbed"]["prediction"]["confidence"], abs=1e-5)


def test_perturb_checks_its_input(perturb_client, digit_png):
    files = {"file": ("d.png", digit_png, "image/png")}
    r = perturb_client.post("/perturb?eps=0.5", files=files)
    assert r.status_code == 422 and "limit of 0.3" in r.json()["error"]
    r = perturb_client.post("/perturb?attack=cw", files=files)
    assert r.status_code == 422 and r.json()["code"] == "validation_error"
    r = perturb_client.post("/perturb", files={"file": ("x.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and r.json()["code"] == "not_an_image"
    r = perturb_client.post("/perturb", files=files, headers={"X-API-Key": "wrong"})
    assert r.status_code == 401


def test_perturb_is_rate_limited(make_settings, digit_png):
    app = create_app(make_settings(perturb=True, perturb_per_minute=2))
    with TestClient(app) as c:
        config = c.get("/ui/config").json()["perturb"]
        assert config["enabled"] and config["per_minute"] == 2 and config["attacks"] == ["fgsm",
                                                                                         "pgd"]
        codes = [c.post("/perturb?attack=fgsm&eps=0.1",
                        files={"file": ("d.png", digit_png, "image/png")}) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert codes[2].json()["code"] == "rate_limited"
    assert 1 <= int(codes[2].headers["Retry-After"]) <= 30


def test_rate_limit_refills_over_time():
    now = [0.0]
    limit = RateLimit(6, clock=lambda: now[0])  # one every 10 s, bursts of 6
    assert [limit.take() for _ in range(6)] == [0.0] * 6
    assert limit.take() == pytest.approx(10.0)
    now[0] = 5.0
    assert limit.take() == pytest.approx(5.0)
    now[0] = 10.0
    assert limit.take() == 0.0


def test_flags_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATHGUARD_PORT", "9001")
    monkeypatch.setenv("PATHGUARD_HOST", "0.0.0.0")
    args = build_parser().parse_args(["--port", "9100", "--bundle", "b", "--log-level",
                                      "debug"])
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    s = Settings(**overrides)
    assert (s.port, s.host, str(s.bundle), s.log_level) == (9100, "0.0.0.0", "b", "debug")


def test_bad_flag_values_exit_with_a_message(monkeypatch, tmp_path, capsys):
    from service.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["--port", "http"]) == 2
    assert "invalid settings" in capsys.readouterr().err
    assert main(["--bundle", str(tmp_path / "missing")]) == 2
    assert "PATHGUARD_PORT" not in os.environ or os.environ["PATHGUARD_PORT"] != "http"


def test_a_bundle_may_ship_its_own_samples(make_settings, bundle_dir, tmp_path, digit_png):
    import json
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bundle)
    (bundle / "samples").mkdir()
    (bundle / "samples" / "mine.png").write_bytes(digit_png)
    index = {"input_shape": [1, 8, 8], "labels": ["x"], "images": [{"file": "mine.png",
                                                                     "label": "2"}]}
    (bundle / "samples" / "index.json").write_text(json.dumps(index))
    with TestClient(create_app(make_settings(bundle=bundle))) as c:
        samples = c.get("/ui/config").json()["samples"]
        assert samples == [{"label": "2", "url": "/ui/samples/mine.png"}]
        assert c.get("/ui/samples/mine.png").content == digit_png
        assert c.get("/ui/samples/0.png").status_code == 404  # the package's are not offered
    index["images"].append({"file": "../manifest.json", "label": "3"})
    (bundle / "samples" / "index.json").write_text(json.dumps(index))
    with TestClient(create_app(make_settings(bundle=bundle))) as c:  # refused: package set
        samples = c.get("/ui/config").json()["samples"]
        assert len(samples) == 10 and c.get("/ui/samples/0.png").status_code == 200
