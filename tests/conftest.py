"""Shared test setup: one CPU thread and a fixed seed so the suite is fast and repeatable."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- tiny digits checkpoints for the detection tests (built once per session) -----------------


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory):
    """An undecoupled small_cnn trained one epoch on digits (a base run directory)."""
    from training import train as train_cmd

    out = tmp_path_factory.mktemp("tiny_runs") / "base"
    train_cmd.cli(["--dataset", "digits", "--epochs", "1", "--out", str(out), "--quiet",
                   "--threads", "1"])
    torch.set_num_threads(1)
    return out


@pytest.fixture(scope="session")
def tiny_decoupled_checkpoint(tiny_base_checkpoint):
    """The base run decoupled for one epoch: a gated small_cnn on digits (1, 8, 8), 10 classes."""
    from training import decouple as decouple_cmd

    out = tiny_base_checkpoint.parent / "decoupled"
    decouple_cmd.cli(["--base", str(tiny_base_checkpoint), "--dataset", "digits",
                      "--epochs", "1", "--batch-size", "128", "--out", str(out), "--quiet",
                      "--threads", "1"])
    torch.set_num_threads(1)
    return out
