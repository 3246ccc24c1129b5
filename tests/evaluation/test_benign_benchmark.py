"""``benchmarks/benign.py`` end to end on digits checkpoints (a subprocess, as users run it):
clean and changed accuracy side by side, and its errors."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from evaluation.shifts import benign_shifts

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "benign.py"


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_accuracy_under_every_benign_change(tiny_base_checkpoint, tiny_decoupled_checkpoint,
                                            tmp_path):
    out = tmp_path / "benign.json"
    result = run("--checkpoint", tiny_base_checkpoint, "--checkpoint", tiny_decoupled_checkpoint,
                 "--n", 200, "--json", out)
    assert result.returncode == 0, result.stderr
    content = json.loads(out.read_text())
    assert content["images"] == 200
    changes = ["clean", *benign_shifts(torch.zeros(1, 1, 8, 8), 0)]
    for acc in content["accuracy"].values():
        assert list(acc) == changes
        assert all(0.0 <= a <= 1.0 for a in acc.values())
        assert acc["clean"] > 0.5  # trained on digits: far above chance (0.1)
    assert f"| {changes[1]} |" in result.stdout and "worst" in result.stdout


def test_errors_name_the_bad_value(tiny_base_checkpoint, tmp_path):
    missing = run("--checkpoint", tmp_path / "nowhere")
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    wrong = run("--checkpoint", tiny_base_checkpoint, "--dataset", "no-such-data")
    assert wrong.returncode == 2 and "no-such-data" in wrong.stderr
    bad_n = run("--checkpoint", tiny_base_checkpoint, "--n", "0")
    assert bad_n.returncode == 2 and "'0'" in bad_n.stderr
