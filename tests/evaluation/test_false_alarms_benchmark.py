"""``benchmarks/false_alarms.py`` end to end on a digits bundle (a subprocess, as users run it):
false alarms under the evaluated changes and past them, on held-out images, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluation.protocol import split_by_image
from evaluation.shifts import benign_shifts, beyond_shifts
from training import fit_detector

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "false_alarms.py"


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def bundle(tiny_decoupled_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A digits bundle from fit_detector, evaluated on the first 20 images of its split's
    evaluation half."""
    out = tmp_path_factory.mktemp("false_alarms") / "detector"
    fit_detector.cli(["--checkpoint", str(tiny_decoupled_checkpoint), "--max-fit", "120",
                      "--max-eval", "20", "--max-profile", "400", "--fit-attacks", "fgsm:0.2",
                      "--eval-attacks", "fgsm:0.2", "--benign-negatives", "--out", str(out),
                      "--threads", "1", "--quiet"])
    return out / "bundle"


def test_false_alarms_at_and_past_the_evaluated_changes(bundle, tmp_path):
    out = tmp_path / "fa.json"
    result = run("--bundle", bundle, "--skip", 20, "--n", 100, "--json", out)
    assert result.returncode == 0, result.stderr
    content = json.loads(out.read_text())
    _, evaluation = split_by_image(450, 0)  # digits: 450 test images
    assert content["image_ids"] == evaluation[20:120].tolist()  # never fitted or evaluated
    r = content["bundles"][str(bundle)]
    x = torch.zeros(1, 1, 8, 8)
    assert list(r["evaluated"]["changes"]) == list(benign_shifts(x, 0))
    assert list(r["beyond"]["changes"]) == list(beyond_shifts(x, 0))
    clean = r["clean"]["changes"]["clean"]
    assert clean["accuracy_drop"] == 0 and clean["accuracy"] > 0.5  # far above chance
    for group in ("evaluated", "beyond"):
        for m in r[group]["changes"].values():
            assert m["accuracy_clean"] == clean["accuracy"] and m["n"] <= 100
            assert m["flagged"] is None or 0.0 <= m["flagged"] <= 1.0
        worst = r[group]["worst"]
        assert worst is None or r[group]["changes"][worst["change"]]["within_tolerance"]
    assert "| gamma 1.4 | beyond |" in result.stdout and "beyond: " in result.stdout


def test_errors_name_the_bad_value(bundle, tmp_path):
    missing = run("--bundle", tmp_path / "nowhere")
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    empty = run("--bundle", bundle, "--skip", 5000)
    assert empty.returncode == 2 and "past --skip 5000" in empty.stderr
    zero = run("--bundle", bundle, "--n", 0)
    assert zero.returncode == 2 and "must be > 0, got '0'" in zero.stderr
    assert "Traceback" not in missing.stderr + empty.stderr + zero.stderr
