"""The real server: ``python -m service`` in a subprocess, as an operator would start it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(bundle: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_")}
    env.update(PATHGUARD_BUNDLE=str(bundle), PATHGUARD_PORT=str(port),
               PATHGUARD_INFERENCE_THREADS="1", PATHGUARD_LOG_LEVEL="warning",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail("server not ready in time")


def test_server_serves_an_image(bundle_dir, digit_png, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "service"], cwd=tmp_path,
                            env=server_env(bundle_dir, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, proc)
        r = httpx.post(f"{url}/classify", files={"file": ("d.png", digit_png, "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["name"] == "digits"
        assert r.json()["adversarial"]["verdict"] in ("clean", "adversarial")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled


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
