"""The training commands end to end on digits (tiny runs), and their error handling."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detector.checkpoint import WEIGHTS_FILE, load_checkpoint, load_class_heads, sha256
from detector.gating import gated_layers
from training import decouple as decouple_cmd
from training import train as train_cmd
from training.presets import PRESETS

ROOT = Path(__file__).resolve().parents[2]
RUN_FILES = {"weights.safetensors", "model.json", "config.json", "metrics.json"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "base"
    train_cmd.cli(["--dataset", "digits", "--epochs", "3", "--batch-size", "64",
                   "--out", str(out), "--quiet"])
    return out


@pytest.fixture(scope="module")
def decoupled_run(base_run):
    out = base_run.parent / "decoupled"
    decouple_cmd.cli(["--base", str(base_run), "--dataset", "digits", "--epochs", "1",
                      "--batch-size", "128", "--out", str(out), "--quiet"])
    return out


def test_train_writes_run_directory(base_run):
    assert {p.name for p in base_run.iterdir()} >= RUN_FILES
    config = json.loads((base_run / "config.json").read_text())
    assert config["command"] == "train"
    assert config["arch"] == "small_cnn"
    assert config["epochs"] == 3 and config["batch_size"] == 64
    metrics = json.loads((base_run / "metrics.json").read_text())
    assert len(metrics["loss_curve"]) == 3
    assert metrics["dense_macs_per_input"] > 0
    model, spec = load_checkpoint(base_run)
    assert spec.arch == "small_cnn" and spec.input_shape == (1, 8, 8) and not spec.decoupled
    assert len(spec.classes) == 10
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_training_lowers_the_loss(base_run):
    metrics = json.loads((base_run / "metrics.json").read_text())
    curve = metrics["loss_curve"]
    assert curve[-1] < 0.5 * curve[0]
    assert metrics["test_accuracy"] > 0.8  # ten classes: chance is 0.1


def test_decouple_writes_run_directory(decoupled_run, base_run):
    names = {p.name for p in decoupled_run.iterdir()}
    assert RUN_FILES | {"filter_states.json", "filter_states.png"} <= names
    assert (decoupled_run / "filter_states.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((decoupled_run / "config.json").read_text())
    assert config["command"] == "decouple" and config["base"] == str(base_run)
    assert config["base_sha256"] == sha256(base_run / WEIGHTS_FILE) and config["init"] is None
    assert config["epochs"] == 1
    # the digits preset: the paper's recipe, no distillation, gates not isolated
    assert config["loss_weights"]["distill"] == 0 and config["isolate_gates"] is False
    assert config["loss_weights"]["kl_detach"] is False
    model, spec = load_checkpoint(decoupled_run)
    assert spec.decoupled
    layers = list(gated_layers(model))
    assert layers == ["features.3", "features.7", "features.10"]
    states = json.loads((decoupled_run / "filter_states.json").read_text())
    assert list(states) == layers
    for name, s in states.items():
        assert s["filters"] == gated_layers(model)[name].conv.out_channels
        assert s["high_energy"] + s["dynamic"] + s["silent"] == s["filters"]
    metrics = json.loads((decoupled_run / "metrics.json").read_text())
    assert 0 < metrics["flops_fraction"] <= 1.01
    assert 0 <= metrics["active_fraction"] <= 1
    assert set(metrics["active_fraction_per_layer"]) == set(layers)
    assert {"total", "ce", "kl", "mi", "sparse"} <= set(metrics["loss_curve"][0])
    assert 0 <= metrics["test_accuracy"] <= 1 and 0 <= metrics["base_test_accuracy"] <= 1


def test_decouple_keeps_the_class_heads(decoupled_run):
    """The MI loss's q(y | z^l) heads are saved, one (K, C) weight per gated layer (that they
    learn is tests/training/test_losses.py's business: one epoch on digits barely moves them)."""
    model, spec = load_checkpoint(decoupled_run)
    heads = load_class_heads(decoupled_run)
    layers = gated_layers(model)
    assert heads is not None and set(heads) == set(layers)
    for name, weight in heads.items():
        assert weight.shape == (spec.num_classes, layers[name].conv.out_channels)
    assert load_class_heads(decoupled_run.parent / "base") is None


def test_decouple_with_distillation_and_gate_only_losses(base_run, tmp_path):
    out = tmp_path / "kd"
    decouple_cmd.cli(["--base", str(base_run), "--dataset", "digits", "--epochs", "1",
                      "--distill", "0.5", "--temperature", "2", "--isolate-gates",
                      "--kl-detach", "--out", str(out), "--quiet"])
    config = json.loads((out / "config.json").read_text())
    assert config["isolate_gates"] is True and config["loss_weights"]["kl_detach"] is True
    assert config["loss_weights"]["distill"] == 0.5
    assert config["loss_weights"]["temperature"] == 2.0
    curve = json.loads((out / "metrics.json").read_text())["loss_curve"]
    assert curve[0]["distill"] > 0


def run_error(cli, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(("argv", "named"), [
    (["--dataset", "no-such-data"], "no-such-data"),
    (["--dataset", "missing/file.npz"], "missing/file.npz"),
    (["--arch", "resnet18"], "resnet18"),
    (["--arch", "alexnet"], "alexnet"),
    (["--epochs", "0"], "'0'"),
    (["--batch-size", "-3"], "'-3'"),
    (["--lr", "fast"], "'fast'"),
    (["--device", "tpu9"], "tpu9"),
    (["--precision", "fp16"], "fp16"),
    (["--recipe", "adam"], "adam"),
    (["--widths", "8", "16", "16"], "small_cnn"),  # airbench's option on the digits preset
    (["--widths", "8", "0", "16"], "'0'"),
    (["--arch", "airbench"], "airbench"),  # 8x8 digits are too small for it
    (["--whiten-eps", "0.1"], "small_cnn"),  # airbench's option on the digits preset
    (["--whiten-eps", "0"], "'0'"),
    (["--adversarial-eps", "2"], "'2'"),
    (["--adversarial-eps", "8/0"], "'8/0'"),
    (["--adversarial-check", "0"], "'0'"),
    (["--adversarial-eps", "0.1", "--adversarial-method", "free"], "'free'"),
    (["--benign-augment", "1.5"], "'1.5'"),
    (["--benign-augment", "nan"], "'nan'"),
    pytest.param(["--device", "cuda"], "cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_train_errors_exit_2_naming_the_value(argv, named, capsys, tmp_path):
    err = run_error(train_cmd.cli, [*argv, "--out", str(tmp_path / "out"), "-q"], capsys)
    assert named in err
    assert not (tmp_path / "out").exists()


def test_train_in_bfloat16(tmp_path):
    """bf16 autocast trains (the weights stay float32) and is recorded in the config."""
    out = tmp_path / "bf16"
    train_cmd.cli(["--epochs", "2", "--batch-size", "64", "--precision", "bf16",
                   "--out", str(out), "--quiet"])
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["precision"] == "bf16" and config["device"] == "cpu"
    assert metrics["loss_curve"][-1] < 0.5 * metrics["loss_curve"][0]
    model, _ = load_checkpoint(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_train_with_benign_augmentation(tmp_path):
    """--benign-augment trains on benign changes of the images and is recorded in the config;
    the digits preset leaves it off."""
    out = tmp_path / "benign"
    train_cmd.cli(["--epochs", "2", "--batch-size", "64", "--benign-augment", "1",
                   "--out", str(out), "--quiet"])
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["benign_augment"] == 1.0
    assert metrics["loss_curve"][-1] < 0.7 * metrics["loss_curve"][0]
    assert metrics["test_accuracy"] > 0.5


def test_presets_augment_mnist_with_benign_changes():
    assert PRESETS["mnist"].benign_augment == 0.5
    assert PRESETS["digits"].benign_augment == PRESETS["cifar10"].benign_augment == 0.0


def test_train_continues_from_init_with_its_width(tmp_path):
    """--init starts from an earlier run's weights (its width kept); --width builds small_cnn."""
    first, second = tmp_path / "first", tmp_path / "second"
    train_cmd.cli(["--epochs", "2", "--batch-size", "64", "--width", "8", "--out", str(first),
                   "-q"])
    model, spec = load_checkpoint(first)
    assert spec.arch_kwargs == {"width": 8}
    assert model.classifier.in_features == 16  # the last layers have twice the width
    first_metrics = json.loads((first / "metrics.json").read_text())
    train_cmd.cli(["--epochs", "1", "--batch-size", "64", "--lr", "0.01", "--init", str(first),
                   "--out", str(second), "-q"])
    config = json.loads((second / "config.json").read_text())
    metrics = json.loads((second / "metrics.json").read_text())
    assert config["init"] == str(first) and config["arch_kwargs"] == {"width": 8}
    assert config["init_sha256"] == sha256(first / WEIGHTS_FILE)  # which weights it started from
    # the run starts where the first ended: its loss starts below the first run's start
    assert metrics["init_test_accuracy"] == pytest.approx(first_metrics["test_accuracy"])
    assert metrics["loss_curve"][0] < first_metrics["loss_curve"][0]
    assert load_checkpoint(second)[1].arch_kwargs == {"width": 8}


def test_train_init_of_other_width_exit_2(base_run, capsys, tmp_path):
    err = run_error(train_cmd.cli, ["--init", str(base_run), "--width", "16", "--out",
                                    str(tmp_path / "out"), "-q"], capsys)
    assert str(base_run) in err and "{'width': 16}" in err
    assert not (tmp_path / "out").exists()


def test_train_init_refuses_decoupled_and_other_shapes(decoupled_run, capsys, tmp_path):
    err = run_error(train_cmd.cli, ["--init", str(decoupled_run), "-q"], capsys)
    assert "decoupled" in err and str(decoupled_run) in err
    err = run_error(train_cmd.cli, ["--init", str(ROOT / "models/mnist/base"), "-q"], capsys)
    assert "(1, 28, 28)" in err and "(1, 8, 8)" in err
    err = run_error(train_cmd.cli, ["--arch", "resnet20", "--width", "8", "--dataset",
                                    "digits", "-q"], capsys)
    assert "--width" in err and "resnet20" in err


def test_train_too_small_images_message(capsys, tmp_path):
    err = run_error(train_cmd.cli, ["--arch", "resnet18", "--out", str(tmp_path), "-q"], capsys)
    assert "8x8" in err and "too small" in err
    assert err.startswith("python -m training.train: error:")


@pytest.mark.parametrize(("argv", "named"), [
    (["--target", "1.5"], "1.5"),
    (["--target", "-0.1"], "-0.1"),
    (["--distill", "1.5"], "1.5"),
    (["--temperature", "0"], "'0'"),
    (["--epochs", "0"], "'0'"),
    (["--dataset", "no-such-data"], "no-such-data"),
    (["--recipe", "adam"], "adam"),
    (["--adversarial-eps", "0"], "'0'"),
    (["--gate-init-logit", "nan"], "'nan'"),
    (["--lr", "inf"], "'inf'"),
    (["--benign-augment", "-0.1"], "'-0.1'"),
])
def test_decouple_errors_exit_2_naming_the_value(argv, named, capsys, base_run, tmp_path):
    err = run_error(decouple_cmd.cli,
                    ["--base", str(base_run), *argv, "--out", str(tmp_path / "out"), "-q"],
                    capsys)
    assert named in err
    assert not (tmp_path / "out").exists()


def test_decouple_continues_from_init(decoupled_run, base_run, tmp_path):
    """--init continues a decoupled run: its gates and weights, not fresh gates."""
    out = tmp_path / "again"
    decouple_cmd.cli(["--base", str(base_run), "--init", str(decoupled_run), "--dataset",
                      "digits", "--epochs", "1", "--batch-size", "128", "--lr", "0.002",
                      "--out", str(out), "-q"])
    before = json.loads((decoupled_run / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["init"] == str(decoupled_run)
    # the run starts from the decoupled network as saved (its test accuracy), not fresh gates
    assert metrics["init_test_accuracy"] == pytest.approx(before["test_accuracy"])
    assert (gated_layers(load_checkpoint(out)[0]).keys()
            == gated_layers(load_checkpoint(decoupled_run)[0]).keys())
    assert load_class_heads(out).keys() == load_class_heads(decoupled_run).keys()


def test_decouple_init_must_be_a_matching_decoupled_run(decoupled_run, base_run, capsys,
                                                        tmp_path):
    err = run_error(decouple_cmd.cli, ["--base", str(base_run), "--init", str(base_run),
                                       "--out", str(tmp_path / "out"), "-q"], capsys)
    assert "not decoupled" in err and str(base_run) in err
    err = run_error(decouple_cmd.cli, ["--base", str(base_run), "--init", str(decoupled_run),
                                       "--reduction", "2", "--out", str(tmp_path / "out"),
                                       "-q"], capsys)
    assert "reduction 4" in err and "reduction 2" in err
    err = run_error(decouple_cmd.cli, ["--base", str(base_run), "--init", str(decoupled_run),
                                       "--gate-input-norm", "--out", str(tmp_path / "out"),
                                       "-q"], capsys)
    assert "input norm False" in err and "input norm True" in err
    assert not (tmp_path / "out").exists()


def test_decouple_with_standardised_gate_input(base_run, tmp_path):
    out = tmp_path / "norm"
    decouple_cmd.cli(["--base", str(base_run), "--dataset", "digits", "--epochs", "1",
                      "--batch-size", "128", "--gate-input-norm", "--out", str(out), "-q"])
    model, spec = load_checkpoint(out)
    assert spec.gate_input_norm
    assert json.loads((out / "config.json").read_text())["gate_input_norm"] is True
    norms = [g.control.norm for g in gated_layers(model).values()]
    assert norms and all(n is not None and n.num_batches_tracked > 0 for n in norms)


def test_decouple_missing_base_dir(capsys, tmp_path):
    missing = tmp_path / "no-base"
    err = run_error(decouple_cmd.cli, ["--base", str(missing), "-q"], capsys)
    assert str(missing) in err


def test_decouple_refuses_decoupled_base(capsys, decoupled_run, tmp_path):
    err = run_error(decouple_cmd.cli,
                    ["--base", str(decoupled_run), "--out", str(tmp_path), "-q"], capsys)
    assert "already decoupled" in err and str(decoupled_run) in err


def test_decouple_refuses_base_of_other_shape(capsys, base_run, tmp_path):
    import numpy as np

    np.savez(tmp_path / "big.npz", x_train=np.zeros((4, 12, 12), np.uint8),
             y_train=np.arange(4) % 2, x_test=np.zeros((2, 12, 12), np.uint8),
             y_test=np.arange(2))
    err = run_error(decouple_cmd.cli, ["--base", str(base_run), "--dataset",
                                       str(tmp_path / "big.npz"), "-q"], capsys)
    assert "(1, 12, 12)" in err and "(1, 8, 8)" in err


def test_train_help_subprocess():
    result = subprocess.run([sys.executable, "-m", "training.train", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "usage: python -m training.train" in result.stdout
    assert "--dataset" in result.stdout and "--epochs" in result.stdout
