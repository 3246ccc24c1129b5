"""The real server: ``python -m service`` in a subprocess, as an operator would start it."""

from __future__ import annotations

import os
import signal

import httpx

from loadtest.server import serving
from service.__main__ import main


def test_server_serves_an_image(bundle_dir, digit_png):
    with serving(bundle_dir, ready_timeout=60.0) as server:
        r = httpx.post(f"{server.url}/classify",
                       files={"file": ("d.png", digit_png, "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "digits"
        assert r.json()["adversarial"]["verdict"] in ("clean", "adversarial")
        status = server.stop(timeout=20)
    assert status in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


def test_server_without_bundle_exits_with_help(monkeypatch, tmp_path, caplog):
    """``python -m service`` is ``raise SystemExit(main())``; run main() in-process (a second
    subprocess would add seconds of imports for the same code path)."""
    for k in [k for k in os.environ if k.startswith("PATHGUARD_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATHGUARD_BUNDLE", str(tmp_path / "missing"))
    assert main([]) == 2
    message = caplog.text
    assert "bundle directory not found" in message and str(tmp_path / "missing") in message
    assert "python -m training.fit_detector" in message and "PATHGUARD_BUNDLE" in message


def test_invalid_settings_exit_with_message(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATHGUARD_PORT", "http")
    assert main([]) == 2
    assert "invalid settings" in capsys.readouterr().err
