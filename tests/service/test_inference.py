"""Where forward passes run (service.inference): worker processes by default, or threads."""

from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
from fastapi.testclient import TestClient

from service.app import create_app


def _answer(make_settings, png: bytes, mode: str) -> tuple[dict, set[int]]:
    """The /classify answer for ``png`` in ``mode`` and the pids of the inference workers."""
    before = {p.pid for p in multiprocessing.active_children()}
    with TestClient(create_app(make_settings(inference=mode))) as client:
        workers = {p.pid for p in multiprocessing.active_children()} - before
        r = client.post("/classify", files={"file": ("d.png", png, "image/png")})
    assert r.status_code == 200, r.text
    return r.json(), workers


def test_worker_processes_answer_as_threads_do(make_settings, digit_png):
    answers = {}
    for mode in ("process", "thread"):
        answers[mode], workers = _answer(make_settings, digit_png, mode)
        assert len(workers) == (1 if mode == "process" else 0), mode
    process, thread = answers["process"], answers["thread"]
    for key in ("prediction", "adversarial", "path"):
        assert process[key] == thread[key], key


def test_default_is_one_worker_process(make_settings):
    settings = make_settings()
    assert (settings.inference, settings.inference_workers) == ("process", 1)


def test_a_dead_worker_makes_the_service_unready(make_settings, digit_png):
    """A killed worker fails the request with 503 inference_failed; the service then says it
    is not ready instead of failing every request alike."""
    before = {p.pid for p in multiprocessing.active_children()}
    with TestClient(create_app(make_settings())) as client:
        (worker,) = {p.pid for p in multiprocessing.active_children()} - before
        os.kill(worker, signal.SIGKILL)
        r = client.post("/classify", files={"file": ("d.png", digit_png, "image/png")})
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "inference_failed"
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/health/live").status_code == 200


def test_unknown_mode_is_refused(make_settings):
    with pytest.raises(ValueError, match="inference"):
        make_settings(inference="gpu")
