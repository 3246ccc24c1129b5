"""``benchmarks/baselines.py`` end to end on a tiny digits run (a subprocess: nothing imports
the script): every method on the same sets, one report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import fit_detector

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tiny_decoupled_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "detector"
    fit_detector.cli(["--checkpoint", str(tiny_decoupled_checkpoint), "--max-fit", "80",
                      "--max-eval", "40", "--max-profile", "300",
                      "--fit-attacks", "fgsm:0.2", "pgd:0.2", "--eval-attacks", "fgsm:0.2",
                      "--detector", "logistic", "--compare", "logistic", "--out", str(out),
                      "--threads", "1", "--quiet"])
    torch.set_num_threads(1)
    return out


@pytest.mark.slow
def test_every_method_on_the_same_sets(run):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "baselines.py"), "--run", str(run),
         "--threads", "1", "-q", "--mahalanobis-eps", "0", "0.002", "--mahalanobis-select", "30",
         "--dknn-train", "200", "--dknn-k", "10", "--lid-reference", "60", "--lid-k", "5",
         "--lid-batch", "20"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    content = json.loads((run / "baselines.json").read_text())
    methods = content["methods"]
    assert list(methods) == ["ours", "pooled", "mahalanobis", "lid", "dknn"]
    for res in methods.values():
        assert 0.0 <= res["attacks"]["FGSM eps=0.2"]["auroc"] <= 1.0
        assert 0.0 <= res["clean_fpr"] <= 1.0
    maha = methods["mahalanobis"]["details"]
    assert maha["noise"] == "lee" and maha["eps"] in (0.0, 0.002)
    assert maha["layers"][-1] == "penultimate"
    assert all(name.endswith(":input") for name in maha["layers"][:-1])
    dknn = methods["dknn"]["details"]
    assert dknn["k"] == 10 and dknn["train_images"] <= 200 and dknn["calibration_images"] > 0
    report = (run / "baselines.md").read_text()
    assert "Deep k-NN (Papernot & McDaniel 2018)" in report and "| dknn |" in report
