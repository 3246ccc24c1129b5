"""The load test (loadtest.load_test, run by benchmarks/load.py): its request mix, its verdict,
and a short run against the real server.

The short run doubles as a check that every hostile request the load test sends still gets
the status and error code docs/SERVICE.md documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.bodies import multipart
from loadtest.clients import Outcome
from loadtest.load_test import LoadTest, run_load_test, server_settings
from loadtest.request_mix import KINDS, Payloads, kind_index, plan
from loadtest.server import ServerError, serving
from loadtest.summary import report, summarize

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def arrays(digits_test) -> tuple[np.ndarray, np.ndarray]:
    """The digits test split as (450, 1, 8, 8) uint8 images and (450,) labels."""
    return digits_test[0].numpy(), digits_test[1].numpy()


def test_settings_follow_overrides():
    s = server_settings({"PATHGUARD_MAX_QUEUE": "64", "OTHER": "1"})
    assert s["max_queue"] == "64" and s["max_files"] == 32
    assert s["max_body_bytes"] == 8 * 1024 * 1024


def test_plan_mixes_valid_and_invalid_requests(digits_test):
    x, y = digits_test[0][:50].numpy(), digits_test[1][:50].numpy()
    rng = np.random.default_rng(0)
    payloads = Payloads(x, y, "digits", server_settings({"PATHGUARD_MAX_FILES": "3"}), rng)
    requests = plan(payloads, 2000, 0.2, rng)
    invalid = [p for p in requests if not KINDS[p.kind].valid]
    assert 0.17 < len(invalid) / len(requests) < 0.23
    assert {KINDS[p.kind].name for p in requests} >= {k.name for k in KINDS if k.weight >= 1}
    batch = next(p for p in requests if KINDS[p.kind].name == "classify_batch")
    assert len(batch.labels) == 4 and batch.body.count(b'name="files"') == 4
    too_many = next(p for p in requests if KINDS[p.kind].name == "too_many_files")
    assert too_many.body.count(b'name="files"') == 4  # max_files + 1
    assert all(not p.labels for p in invalid)


def test_multipart_encoding():
    body, ctype = multipart([("file", "a.png", b"\x89PNG", "image/png")], boundary="b")
    assert ctype == "multipart/form-data; boundary=b"
    assert body.startswith(b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
                           b"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n\x89PNG\r\n")
    assert body.endswith(b"--b--\r\n")


def _summary(outcomes: list[Outcome], after_run: float = 100.0, alive: bool = True):
    rss = {"after_start": 90.0, "after_warmup": 100.0, "peak": 120.0, "after_run": after_run}
    return summarize(outcomes, 2.0, {}, {}, rss, {}, 0.10, alive)


def test_criteria_catch_each_failure():
    ok = [Outcome(kind_index("classify"), 200, None, 0.01, 1, 1),
          Outcome(kind_index("empty_file"), 400, "empty", 0.01)]
    good = _summary(ok)
    assert good.passed and good.valid["accuracy"] == 1.0
    assert good.valid["throughput_rps"] == 0.5
    failures = {
        "valid requests all 200": [Outcome(kind_index("classify"), 503, "overloaded", 0.01)],
        "no 5xx": [Outcome(kind_index("empty_file"), 500, "internal", 0.01)],
        "no transport errors": [Outcome(kind_index("gif"), 0, "ReadError", 0.01)],
        "invalid requests get their 4xx": [Outcome(kind_index("gif"), 400, "corrupt_image", 0.01)],
    }
    for name, extra in failures.items():
        s = _summary(ok + extra)
        assert not s.passed and not s.criteria[name]["passed"], name
    assert _summary(ok + failures["valid requests all 200"]).valid["overloaded_503"] == 1
    assert not _summary(ok, after_run=111.0).passed
    assert _summary(ok, after_run=109.0).passed
    assert not _summary(ok, alive=False).passed


@pytest.mark.slow
def test_short_run_against_the_real_server(bundle_dir, digits_test):
    summary = run_load_test(bundle_dir, *arrays(digits_test), LoadTest(
        requests=100, warmup=10, concurrency=4, invalid_fraction=0.6, seed=1), source="digits")
    text = report(summary)
    assert summary.passed, text
    assert "load test PASSED" in text
    result = json.loads(json.dumps(summary.to_json()))
    assert result["passed"] and result["valid"]["failed"] == 0
    assert result["invalid"]["unexpected"] == 0
    assert sum(k["count"] for k in result["kinds"].values()) == 100
    assert len(result["kinds"]) >= 10  # most hostile kinds were sent
    assert result["rss"]["after_run"] > 0 and result["cpu"]["forward_passes"] > 0


def test_rss_criterion_left_out_when_not_measured():
    nan = float("nan")
    rss = {"after_start": nan, "after_warmup": nan, "peak": nan, "after_run": nan}
    cpu = {"server_s": nan, "client_s": 0.1, "images_per_pass": nan}
    machine = {"cpus": 2, "load_before": [0.0] * 3, "load_after": [0.0] * 3, "nice": 0}
    config = {"bundle": "b", "model": "m", "concurrency": 1, "url": "http://127.0.0.1:1"}
    s = summarize([Outcome(kind_index("classify"), 200, None, 0.01, 1, 1)], 1.0, config, machine,
                  rss, cpu, 0.10, True)
    assert s.passed and not any(name.startswith("RSS") for name in s.criteria)
    text = report(s)
    assert "RSS: not measured" in text and "at http://127.0.0.1:1" in text


@pytest.mark.parametrize(("options", "message"), [
    ({"url": "127.0.0.1:8000"}, "url must be an http:// or https:// base URL, got "
                                "'127.0.0.1:8000'"),
    ({"pid": 1}, "pid 1: needs url"),
    ({"invalid_fraction": 1.5}, "invalid_fraction must be in [0, 1], got 1.5"),
    ({"requests": 0}, "requests (0) and concurrency (64) must be >= 1"),
    ({"server_env": {"MAX_QUEUE": "8"}}, "PATHGUARD_* settings only, got ['MAX_QUEUE']"),
])
def test_options_are_checked(options, message):
    with pytest.raises(ValueError) as e:
        LoadTest(**options)
    assert message in str(e.value)


def test_script_refuses_bad_options_with_usage():
    """``python benchmarks/load.py`` (run as a user runs it) turns a bad option into argparse's
    exit status 2 and the message."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--url", "127.0.0.1:8000"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "url must be an http:// or https:// base URL" in proc.stderr
    assert proc.stderr.startswith("usage: load.py")


def test_url_without_a_server_fails_naming_it(bundle_dir, digits_test):
    with pytest.raises(ServerError, match=r"no server answers .* at http://127\.0\.0\.1:9/"):
        run_load_test(bundle_dir, *arrays(digits_test),
                      LoadTest(url="http://127.0.0.1:9/", requests=1))


@pytest.mark.slow
def test_short_run_against_an_external_server(bundle_dir, digits_test):
    with serving(bundle_dir) as server:
        summary = run_load_test(bundle_dir, *arrays(digits_test), LoadTest(
            requests=60, warmup=5, concurrency=4, seed=3, url=server.url, pid=server.pid))
    assert summary.passed, report(summary)
    result = summary.to_json()
    assert result["config"]["url"] == server.url and result["valid"]["failed"] == 0
    assert result["rss"]["after_run"] > 0 and result["cpu"]["server_s"] > 0
    assert "RSS growth within 10%" in result["criteria"]
