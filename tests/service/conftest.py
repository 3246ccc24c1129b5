"""Fixtures: a tiny bundle built once per session (no committed binaries), apps and clients."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from detector.bundle import save_bundle
from detector.checkpoint import load_checkpoint
from detector.estimator import PathDetector
from detector.features import PathBatch, PathProfile
from detector.paths import compute_path, network_macs
from service.app import create_app
from service.config import Settings


def _select(paths: PathBatch, keep: np.ndarray) -> PathBatch:
    return PathBatch(paths.logits[keep], {k: v[keep] for k, v in paths.bits.items()},
                     {k: v[keep] for k, v in paths.gate_logits.items()})


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits bundle: small_cnn trained and decoupled for 1 epoch each, a PathProfile of
    clean training paths and a PathDetector of clean vs FGSM (eps 0.2) test paths."""
    import torchattacks

    from training.data import load_digits, to_float
    from training.decouple import cli as decouple_cli
    from training.train import cli as train_cli

    root = tmp_path_factory.mktemp("digits")
    common = ["--threads", "1", "-q"]
    train_cli(["--epochs", "1", "--out", str(root / "base"), *common])
    decouple_cli(["--epochs", "1", "--base", str(root / "base"), "--out", str(root / "dec"),
                  *common])
    model, spec = load_checkpoint(root / "dec")
    data = load_digits()
    x_train, y_train = to_float(data.x_train), data.y_train.numpy()
    with torch.no_grad():
        train_paths = PathBatch.from_result(compute_path(model, x_train))
    correct = train_paths.logits.argmax(1) == y_train
    profile = PathProfile.fit(_select(train_paths, correct), y_train[correct], spec.num_classes)
    x, y = to_float(data.x_test), data.y_test
    adv = torchattacks.FGSM(model, eps=0.2)(x, y)
    with torch.no_grad():
        clean = PathBatch.from_result(compute_path(model, x))
        attacked = PathBatch.from_result(compute_path(model, adv))
    features = np.concatenate([profile.transform(clean), profile.transform(attacked)])
    labels = np.r_[np.zeros(len(x)), np.ones(len(x))]
    groups = np.r_[np.arange(len(x)), np.arange(len(x))]
    detector = PathDetector(random_state=0).fit(features, labels, groups=groups)
    return save_bundle(root / "bundle", name="digits", model=model, spec=spec, profile=profile,
                       detector=detector, network_macs=network_macs(model, spec.input_shape))


@pytest.fixture(scope="session")
def digits_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits test split: (450, 1, 8, 8) uint8 images and (450,) labels."""
    from training.data import load_digits

    data = load_digits()
    return data.x_test, data.y_test


@pytest.fixture(scope="session")
def make_settings(bundle_dir: Path) -> Callable[..., Settings]:
    """Settings for the test bundle, ignoring the environment's .env file."""
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"bundle": bundle_dir, "inference_threads": 1,
                                     "decode_workers": 1, **overrides}
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]
    return make


#: Limits of the shared test app, small enough to hit in tests.
LIMITS = {"max_files": 4, "max_queue": 64, "max_image_pixels": 10_000, "max_body_bytes": 200_000}


@pytest.fixture(scope="module")
def app(make_settings: Callable[..., Settings]) -> FastAPI:
    return create_app(make_settings(**LIMITS))


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    """A client of the module's app, lifespan run (model loaded) for the whole module."""
    with TestClient(app) as c:
        yield c


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="session")
def encode() -> Callable[..., bytes]:
    """encode(image, fmt="PNG", **save_options) -> the file's bytes."""
    return _encode


@pytest.fixture(scope="session")
def digit_png(digits_test: tuple[torch.Tensor, torch.Tensor]) -> bytes:
    """The first test digit as an 8x8 grey PNG (lossless: the exact model input)."""
    return _encode(Image.fromarray(digits_test[0][0, 0].numpy()))
