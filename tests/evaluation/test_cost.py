"""evaluation.cost: the detector's path -> score step timed next to the network's forward pass
in one run, and its size, on a tiny decoupled digits network; ``benchmarks/detector_cost.py``
on a bundle of it, as users run it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bundle import save_bundle
from detector.checkpoint import load_checkpoint
from detector.estimator import PathDetector
from detector.features import PathProfile
from detector.paths import network_macs
from evaluation.cost import detector_costs, detector_size
from evaluation.sets import extract_paths
from training.data import load_dataset, to_float


@pytest.fixture(scope="module")
def fitted(tiny_decoupled_checkpoint):
    model, spec = load_checkpoint(tiny_decoupled_checkpoint)
    data = load_dataset("digits")
    x = to_float(data.x_train[:200])
    profile = PathProfile.fit(extract_paths(model, x), data.y_train[:200].numpy(),
                              spec.num_classes).with_stability(("shift",))
    noisy = (x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    X = torch.cat([profile.transform(extract_paths(model, v, stability=("shift",)))
                   for v in (x, noisy)]).numpy()
    y = np.r_[np.zeros(len(x)), np.ones(len(x))]
    detectors = {m: (profile, PathDetector(model=m, random_state=0).fit(X, y))
                 for m in ("logistic", "random_forest", "hist_gb")}
    return model, spec, x[:4], detectors


def test_costs_are_measured_side_by_side(fitted):
    model, _, images, detectors = fitted
    threads = torch.get_num_threads()
    costs = detector_costs(model, images, detectors, repeats=5)
    assert torch.get_num_threads() == threads  # restored
    assert set(costs) == {"logistic", "random_forest", "hist_gb"}
    assert costs["logistic"].exported and costs["random_forest"].exported
    assert not costs["hist_gb"].exported
    for cost in costs.values():
        assert cost.score_us > 0 and cost.network_us > 0 and cost.stability_us > 0
        assert cost.score_ratio == pytest.approx(cost.score_us / cost.network_us)
    assert costs["logistic"].network_us == costs["random_forest"].network_us  # one measurement


def test_size_is_the_compressed_detector(fitted):
    *_, detectors = fitted
    small, large = (detector_size(detectors[m][1]) for m in ("logistic", "random_forest"))
    assert 0 < small < large


def benchmark_runner(fitted, directory: Path, script: str):
    """A function running ``benchmarks/<script>`` on a digits bundle of the fitted random forest
    saved under ``directory``, returning the finished process."""
    model, spec, _, detectors = fitted
    profile, detector = detectors["random_forest"]
    bundle = save_bundle(directory / "bundle", name="digits", model=model, spec=spec,
                         profile=profile, detector=detector,
                         network_macs=network_macs(model, spec.input_shape))
    path = Path(__file__).resolve().parents[2] / "benchmarks" / script

    def run(*argv: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(path), "--bundle", str(bundle),
                               *map(str, argv)], capture_output=True, text=True, timeout=300)
    return run


def test_benchmark_prints_the_ratio_per_run_and_names_bad_values(fitted, tmp_path):
    run = benchmark_runner(fitted, tmp_path, "detector_cost.py")

    result = run("--dataset", "digits", "--images", 3, "--rounds", 3, "--runs", 2)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2"]
    for _, score, network, ratio, stability in rows:
        assert float(score) > 0 and float(network) > 0 and float(stability) > 0
        assert float(ratio) == pytest.approx(float(score) / float(network), rel=0.05, abs=2e-3)
    bad = run("--dataset", "digits", "--rounds", 0)
    assert bad.returncode == 2 and "--rounds: must be > 0, got '0'" in bad.stderr


def test_memory_format_benchmark_prints_both_layouts_and_names_bad_values(fitted, tmp_path):
    run = benchmark_runner(fitted, tmp_path, "memory_format.py")

    result = run("--dataset", "digits", "--rounds", 3)
    assert result.returncode == 0, result.stderr
    rows = [line.split(" | ") for line in result.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "32"]
    for _, nchw, nhwc, ratio in rows:
        assert float(nchw) > 0 and float(nhwc) > 0
        assert float(ratio) == pytest.approx(float(nhwc) / float(nchw), rel=0.05, abs=2e-3)
    bad = run("--dataset", "digits", "--threads", 0)
    assert bad.returncode == 2 and "--threads: must be > 0, got '0'" in bad.stderr
