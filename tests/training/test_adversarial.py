"""Fast adversarial training: the FGSM-RS batches, the PGD check, and the commands' option."""

import argparse
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from detector.checkpoint import load_checkpoint
from training import decouple as decouple_cmd
from training import train as train_cmd
from training.adversarial import (
    AdversarialTraining,
    FastAdversarial,
    clean_and_pgd_accuracy,
    pgd_accuracy,
)
from training.data import load_dataset, to_float

EPS = 0.1


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return to_float(data.x_test[:256]), data.y_test[:256]


@pytest.fixture(scope="module")
def adversarial_base(tmp_path_factory):
    out = tmp_path_factory.mktemp("adv") / "base"
    train_cmd.cli(["--dataset", "digits", "--epochs", "2", "--adversarial-eps", str(EPS),
                   "--adversarial-check", "128", "--out", str(out), "-q", "--threads", "1"])
    return out


@pytest.mark.parametrize(("method", "reach"), [("fgsm-rs", 1.0), ("n-fgsm", 3.0)])
def test_single_step_attacks_stay_in_their_ball_and_the_image_range(tiny_base_checkpoint, digits,
                                                                   method, reach):
    model, _ = load_checkpoint(tiny_base_checkpoint)
    x, y = digits
    adv = FastAdversarial(EPS, method).perturb(model.eval(), x, y)
    assert adv.shape == x.shape
    assert float((adv - x).abs().max()) <= reach * EPS + 1e-6
    if method == "n-fgsm":  # no projection: some pixels move further than eps
        assert float((adv - x).abs().max()) > EPS + 1e-3
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - x).abs().mean()) > EPS / 4  # moved, not a copy
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y)
        adv_loss = F.cross_entropy(model(adv), y)
    assert adv_loss > clean_loss


def test_pgd_check_is_at_most_clean_accuracy(tiny_base_checkpoint, digits):
    model, _ = load_checkpoint(tiny_base_checkpoint)
    x, y = digits
    with torch.no_grad():
        clean = float((model.eval()(x).argmax(1) == y).float().mean())
    robust = pgd_accuracy(model, x, y, EPS, steps=5)
    assert 0.0 <= robust < clean


@pytest.mark.parametrize(("eps", "method"), [(0.0, "n-fgsm"), (1.5, "fgsm-rs"), (0.1, "pgd")])
def test_fast_adversarial_rejects_bad_settings(eps, method):
    with pytest.raises(ValueError, match="adversarial"):
        FastAdversarial(eps, method)


def test_adversarial_training_records_its_check_and_resists_pgd(adversarial_base,
                                                               tiny_base_checkpoint, digits):
    metrics = json.loads((adversarial_base / "metrics.json").read_text())
    config = json.loads((adversarial_base / "config.json").read_text())
    assert config["adversarial_eps"] == pytest.approx(EPS)
    assert config["adversarial_method"] == "n-fgsm"
    assert len(metrics["pgd_accuracy_curve"]) == 2
    assert 0.0 <= metrics["pgd_test_accuracy"] <= 1.0
    assert metrics["best_epoch"] in (0, 1, 2)  # 0: the final weights scored best
    curve = zip(metrics["check_accuracy_curve"], metrics["pgd_accuracy_curve"], strict=True)
    kept = metrics["clean_check_accuracy"] + metrics["pgd_check_accuracy"]
    assert kept >= max(clean + robust for clean, robust in curve) - 1e-9
    if metrics["best_epoch"]:
        epoch = metrics["best_epoch"] - 1
        assert metrics["pgd_check_accuracy"] == metrics["pgd_accuracy_curve"][epoch]
        assert metrics["clean_check_accuracy"] == metrics["check_accuracy_curve"][epoch]
    x, y = digits
    robust, _ = load_checkpoint(adversarial_base)
    plain, _ = load_checkpoint(tiny_base_checkpoint)
    assert pgd_accuracy(robust, x, y, EPS) > pgd_accuracy(plain, x, y, EPS) + 0.1


def test_decouple_with_adversarial_batches(adversarial_base, tmp_path):
    out = tmp_path / "dec"
    decouple_cmd.cli(["--base", str(adversarial_base), "--dataset", "digits", "--epochs", "1",
                      "--batch-size", "128", "--adversarial-eps", "1/10",
                      "--adversarial-check", "64", "--out", str(out), "-q", "--threads", "1"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert "pgd_accuracy" in metrics["loss_curve"][0]
    assert 0.0 <= metrics["pgd_test_accuracy"] <= 1.0
    assert json.loads((out / "config.json").read_text())["adversarial_eps"] == pytest.approx(0.1)


def test_keep_best_restores_the_best_epoch(tiny_base_checkpoint, digits):
    """The weights kept at the best check (clean + PGD accuracy) are restored when the final
    ones score lower."""
    model, _ = load_checkpoint(tiny_base_checkpoint)
    x, y = digits
    run = AdversarialTraining(FastAdversarial(EPS), x[:64], y[:64], torch.arange(64))
    hook = run.monitor(model)
    first = hook(0)
    assert first["pgd_accuracy"] > 0.0 and first["check_accuracy"] > 0.5
    assert run.best_epoch == 0
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.0)  # a collapsed network: chance at best
    chosen = run.keep_best(model)
    assert chosen == {"clean_check_accuracy": first["check_accuracy"],
                      "pgd_check_accuracy": first["pgd_accuracy"], "best_epoch": 1}
    clean, robust = clean_and_pgd_accuracy(model, x[:64], y[:64], EPS)
    assert clean == first["check_accuracy"]
    assert robust == pytest.approx(first["pgd_accuracy"], abs=0.05)


def test_keep_best_prefers_clean_accuracy_over_a_pgd_difference_in_the_noise(
        tiny_base_checkpoint, digits):
    """An epoch a little more robust but much less accurate than the final weights is not
    kept (the old rule, PGD accuracy alone, kept it)."""
    model, _ = load_checkpoint(tiny_base_checkpoint)
    x, y = digits
    run = AdversarialTraining(FastAdversarial(EPS), x[:64], y[:64], torch.arange(64))
    clean, robust = run.check(model)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    run.best_clean, run.best_pgd, run.best_epoch = clean - 0.2, robust + 0.01, 0
    run.best_state = {k: torch.zeros_like(v) for k, v in final.items()}
    assert run.keep_best(model)["best_epoch"] == 0
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())


def test_adversarial_check_must_leave_training_images(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_cmd.cli(["--dataset", "digits", "--adversarial-eps", "0.1", "--adversarial-check",
                       "100000", "--out", str(tmp_path / "out"), "-q"])
    assert e.value.code == 2
    assert "--adversarial-check 100000 leaves no training images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_check_images_are_drawn_across_a_class_sorted_split():
    """A training split sorted by class (ImageFolder's order) still gives a check on every
    class; the check images are left out of training, the others keep their order."""
    data = load_dataset("digits")
    order = torch.argsort(data.y_train, stable=True)
    data = replace(data, x_train=data.x_train[order], y_train=data.y_train[order])
    args = argparse.Namespace(adversarial_eps=EPS, adversarial_method="fgsm-rs",
                              adversarial_check=200)
    run = AdversarialTraining.from_args(args, data)
    assert set(run.y_check.tolist()) == set(range(10))
    torch.testing.assert_close(run.x_check, to_float(data.x_train[run.check_ids]))
    x, y = run.training_images(data.x_train, data.y_train)
    assert len(y) == len(data.y_train) - 200
    kept = sorted(set(range(len(data.y_train))) - set(run.check_ids.tolist()))
    assert torch.equal(x, data.x_train[kept]) and torch.equal(y, data.y_train[kept])
    again = AdversarialTraining.from_args(args, data)  # train and decouple hold out the same
    assert torch.equal(again.check_ids, run.check_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_check_runs_on_the_models_device(tiny_base_checkpoint, digits):
    """Check images stay on the CPU while the model trains on the GPU."""
    model, _ = load_checkpoint(tiny_base_checkpoint)
    x, y = digits
    on_cpu = clean_and_pgd_accuracy(model, x, y, EPS)
    on_gpu = clean_and_pgd_accuracy(model.cuda(), x, y, EPS)
    assert on_gpu[0] == pytest.approx(on_cpu[0], abs=0.01)
