"""benchmarks/load.py: its request mix, its verdict, and a short run against the real server.

The short run doubles as a check that every hostile request the load test sends still gets
the status and error code docs/SERVICE.md documents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.harness import serving
from benchmarks.load import (
    KINDS,
    Outcome,
    Payloads,
    main,
    multipart,
    plan,
    report,
    server_settings,
    summarize,
)


def kind(name: str) -> int:
    return next(i for i, k in enumerate(KINDS) if k.name == name)


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
    ok = [Outcome(kind("classify"), 200, None, 0.01, 1, 1),
          Outcome(kind("empty_file"), 400, "empty", 0.01)]
    good = _summary(ok)
    assert good.passed and good.valid["accuracy"] == 1.0
    assert good.valid["throughput_rps"] == 0.5
    failures = {
        "valid requests all 200": [Outcome(kind("classify"), 503, "overloaded", 0.01)],
        "no 5xx": [Outcome(kind("empty_file"), 500, "internal", 0.01)],
        "no transport errors": [Outcome(kind("gif"), 0, "ReadError", 0.01)],
        "invalid requests get their 4xx": [Outcome(kind("gif"), 400, "corrupt_image", 0.01)],
    }
    for name, extra in failures.items():
        s = _summary(ok + extra)
        assert not s.passed and not s.criteria[name]["passed"], name
    assert _summary(ok + failures["valid requests all 200"]).valid["overloaded_503"] == 1
    assert not _summary(ok, after_run=111.0).passed
    assert _summary(ok, after_run=109.0).passed
    assert not _summary(ok, alive=False).passed


@pytest.mark.slow
def test_short_run_against_the_real_server(bundle_dir, tmp_path, capsys):
    out = tmp_path / "load.json"
    status = main(["--bundle", str(bundle_dir), "--data", "digits", "--requests", "100",
                   "--warmup", "10", "--concurrency", "4", "--invalid-fraction", "0.6",
                   "--seed", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "load test PASSED" in text
    result = json.loads(out.read_text())
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
    s = summarize([Outcome(kind("classify"), 200, None, 0.01, 1, 1)], 1.0, config, machine,
                  rss, cpu, 0.10, True)
    assert s.passed and not any(name.startswith("RSS") for name in s.criteria)
    text = report(s)
    assert "RSS: not measured" in text and "at http://127.0.0.1:1" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--url", "127.0.0.1:8000"], "--url must be an http:// or https:// base URL, got "
                                  "'127.0.0.1:8000'"),
    (["--pid", "1"], "--pid 1: needs --url"),
])
def test_external_server_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_url_without_a_server_fails_naming_it(bundle_dir):
    with pytest.raises(SystemExit, match=r"--url http://127\.0\.0\.1:9/: no server"):
        main(["--url", "http://127.0.0.1:9/", "--bundle", str(bundle_dir), "--data", "digits",
              "--requests", "1"])


@pytest.mark.slow
def test_short_run_against_an_external_server(bundle_dir, tmp_path, capsys):
    out = tmp_path / "load.json"
    with serving(bundle_dir) as server:
        status = main(["--url", server.url, "--pid", str(server.pid), "--bundle",
                       str(bundle_dir), "--data", "digits", "--requests", "60", "--warmup",
                       "5", "--concurrency", "4", "--seed", "3", "--json", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    result = json.loads(out.read_text())
    assert result["config"]["url"] == server.url and result["valid"]["failed"] == 0
    assert result["rss"]["after_run"] > 0 and result["cpu"]["server_s"] > 0
    assert "RSS growth within 10%" in result["criteria"]
