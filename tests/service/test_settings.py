"""service.config and the app lifespan: settings sources, validation, start-up failures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from detector.bundle import BundleError
from service.app import create_app
from service.config import DEFAULT_BUNDLE, Settings


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch, tmp_path):
    """No PATHGUARD_* variables and no .env file from the developer's environment."""
    for k in [k for k in os.environ if k.startswith("PATHGUARD_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)


def test_defaults():
    s = Settings()
    assert s.bundle == DEFAULT_BUNDLE == Path("runs/digits/detector/bundle")
    assert s.api_key is None and s.micro_batch and s.inference_threads == 1


def test_environment_and_env_file(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("PATHGUARD_PORT=9001\nPATHGUARD_API_KEY=abc\nOTHER=1\n")
    monkeypatch.setenv("PATHGUARD_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("PATHGUARD_PORT", "9002")  # the environment wins over .env
    s = Settings()
    assert (s.port, s.max_batch_size, s.api_key.get_secret_value()) == (9002, 8, "abc")
    assert "abc" not in repr(s)


def test_empty_api_key_means_off(monkeypatch):
    monkeypatch.setenv("PATHGUARD_API_KEY", "")
    assert Settings().api_key is None


@pytest.mark.parametrize(("name", "value"), [
    ("PATHGUARD_PORT", "0"), ("PATHGUARD_INFERENCE_THREADS", "0"),
    ("PATHGUARD_ALPHA_BACKGROUND", "grey"), ("PATHGUARD_MAX_QUEUE", "2")])
def test_invalid_settings(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_missing_bundle_fails_start_up_with_help(make_settings, tmp_path):
    app = create_app(make_settings(bundle=tmp_path / "nowhere"))
    with pytest.raises(BundleError, match=r"training\.fit_detector"), TestClient(app):
        pass
    assert app.state.service is None


def test_tampered_bundle_is_refused(make_settings, bundle_dir, tmp_path):
    copy = shutil.copytree(bundle_dir, tmp_path / "bundle")
    with (copy / "profile.safetensors").open("ab") as f:
        f.write(b"\x00")
    with pytest.raises(BundleError, match="SHA-256"), TestClient(create_app(
            make_settings(bundle=copy))):
        pass


def test_lifespan_sets_threads_and_state(make_settings):
    app = create_app(make_settings(inference_threads=1, micro_batch=False))
    assert app.state.service is None  # nothing is loaded before the lifespan runs
    with TestClient(app) as client:
        assert torch.get_num_threads() == 1
        state = app.state.service
        assert state.ready and state.batcher.max_batch == 1
        assert client.get("/v2/health/ready").status_code == 200
    assert app.state.service is None


def test_every_setting_is_in_the_service_md_table():
    """Each setting has a row in docs/SERVICE.md's settings table, with its default."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "SERVICE.md").read_text()
    table = text.split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = {cell.strip("` ") for line in table.splitlines() if line.startswith("| `")
            for cell in line.split("|")[1].split("/")}
    missing = [name for name in Settings.model_fields
               if f"PATHGUARD_{name.upper()}" not in rows]
    assert not missing
    s = Settings()
    for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "max_connections"):
        default = getattr(s, name)
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        assert f"`PATHGUARD_{name.upper()}` | {shown} |" in table, name
