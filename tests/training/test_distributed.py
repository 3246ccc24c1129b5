"""torchrun data parallelism (training.distributed): 2 real CPU processes on gloo vs 1 process.

The training set is the embedded digits data cut to 1,280 images, so that it divides into global
batches of 640 (no padding by the sampler); two steps keep the runs short and the comparison
within float32 rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.data import load_digits
from training.decouple import cli as decouple_cli
from training.distributed import Rank, local_batch_size
from training.train import cli as train_cli

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--epochs", "1", "--batch-size", "640", "--threads", "1", "-q"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits with 1,280 training images, as an .npz data set."""
    d = load_digits()
    path = tmp_path_factory.mktemp("ddp") / "digits1280.npz"
    np.savez(path, x_train=d.x_train[:1280, 0].numpy(), y_train=d.y_train[:1280].numpy(),
             x_test=d.x_test[:, 0].numpy(), y_test=d.y_test.numpy())
    return path


def torchrun(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m module args`` (bounded, 1 thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                         if p)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "weights.safetensors")


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def base_runs(dataset: Path) -> tuple[Path, Path]:
    """The same base training in one process and in two (torchrun)."""
    root = dataset.parent
    train_cli(["--dataset", str(dataset), "--lr", "0.05", "--out", str(root / "single"), *RUN])
    done = torchrun("training.train", "--dataset", str(dataset), "--lr", "0.05",
                    "--out", str(root / "ddp"), *RUN, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "single", root / "ddp"


def test_two_processes_train_the_single_process_weights(base_runs):
    single, ddp = base_runs
    a, b = weights(single), weights(ddp)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    assert metrics(ddp)["loss_curve"] == pytest.approx(metrics(single)["loss_curve"], rel=1e-5)
    assert metrics(ddp)["test_accuracy"] == metrics(single)["test_accuracy"]
    config = json.loads((ddp / "config.json").read_text())
    assert config["processes"] == 2 and config["batch_size"] == 640
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())


def test_decouple_under_torchrun(base_runs, dataset):
    single_base, _ = base_runs
    root = dataset.parent
    args = ["--dataset", str(dataset), "--base", str(single_base), *RUN]
    decouple_cli([*args, "--out", str(root / "dec_single")])
    done = torchrun("training.decouple", *args, "--out", str(root / "dec_ddp"), cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = metrics(root / "dec_single"), metrics(root / "dec_ddp")
    assert json.loads((root / "dec_ddp" / "config.json").read_text())["processes"] == 2
    assert (root / "dec_ddp" / "filter_states.png").is_file()
    # The gates' SemHash noise is drawn per rank (same distribution, other draws): close, not
    # equal; a wrong split (each rank on every image, or on half the steps) moves it far more.
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.03)
    assert two["active_fraction"] == pytest.approx(one["active_fraction"], abs=0.03)
    assert two["loss_curve"][0]["total"] == pytest.approx(one["loss_curve"][0]["total"],
                                                          rel=0.05)


def test_global_batch_must_divide():
    assert local_batch_size(640, Rank(1, 2)) == 320
    with pytest.raises(ValueError, match=r"--batch-size 63 .* processes \(2\)"):
        local_batch_size(63, Rank(0, 2))
