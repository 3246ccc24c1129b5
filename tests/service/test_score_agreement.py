"""One scoring pipeline: on the committed bundles, the same image gets the same adversarial
score through the server, through ``Bundle.analyze`` and through the attacker's differentiable
path (straight-through gates and bits: :meth:`Bundle.record` and :meth:`Bundle.score_paths`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from detector.bundle import load_bundle
from detector.straight_through import straight_through_gates
from service.app import create_app
from service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p.parent for p in (ROOT / "models").glob("*/bundle/manifest.json"))


def png(image: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (lossless: the server decodes exactly this image)."""
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("bundle_dir", BUNDLES, ids=lambda p: p.parent.name)
def test_server_analyze_and_attack_path_give_one_score(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    c, h, w = bundle.spec.input_shape
    rng = np.random.default_rng(0)
    # smooth random images on the 1/255 grid: a low-resolution pattern upsampled, plus noise
    coarse = rng.integers(0, 256, (6, 4, 4, c)).astype(np.float32)
    big = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2),
                                          size=(h, w), mode="bilinear", align_corners=False)
    pixels = (big + torch.from_numpy(rng.normal(0, 12, big.shape).astype(np.float32)))
    pixels = pixels.clamp(0, 255).round().to(torch.uint8)  # (6, C, H, W)
    x = pixels.float() / 255.0

    analysis = bundle.analyze(x, execution="masked")
    xg = x.clone().requires_grad_(True)
    with straight_through_gates("sigmoid"):  # with the stability companions if any
        attacked = bundle.score_paths(bundle.record(xg, ste="sigmoid"))
    np.testing.assert_array_equal(attacked.predictions.numpy(), analysis.predictions)
    # an exported (logistic, MLP) detector scores with gradients: the attacker descends on them
    np.testing.assert_allclose(attacked.scores.detach().numpy(), analysis.scores, rtol=0,
                               atol=1e-5)

    settings = Settings(_env_file=None, bundle=bundle_dir, execution="masked",  # type: ignore[call-arg]
                        inference_threads=1, decode_workers=1)
    with TestClient(create_app(settings)) as client:
        for i, image in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
            r = client.post("/classify", files={"file": (f"{i}.png", png(image), "image/png")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["prediction"]["index"] == int(analysis.predictions[i])
            assert body["adversarial"]["score"] == pytest.approx(float(analysis.scores[i]),
                                                                 abs=1e-5)
