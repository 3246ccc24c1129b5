"""``training.fit_detector`` end to end on a tiny digits subset, and its command-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bundle import load_bundle
from detector.manifest import FORMAT_VERSION
from training import fit_detector

ROOT = Path(__file__).resolve().parents[2]
EVAL_LABELS = ("FGSM eps=0.2", "DEEPFOOL")


def tiny_args(checkpoint, out, *extra):
    return ["--checkpoint", str(checkpoint), "--max-fit", "60", "--max-eval", "60",
            "--max-profile", "300", "--fit-attacks", "fgsm:0.2", "pgd:0.2",
            "--eval-attacks", "fgsm:0.2", "deepfool", "--detector", "logistic",
            "--compare", "logistic",
            "--square-queries", "50", "--out", str(out), "--threads", "1", "--quiet", *extra]


@pytest.fixture(scope="module")
def run(tiny_decoupled_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit_detector") / "detector"
    fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, out))
    torch.set_num_threads(1)
    return out


def test_writes_all_outputs(run):
    assert {p.name for p in run.iterdir()} >= {"bundle", "metrics.json", "report.md", "roc.png",
                                              "adversarial.npz"}
    assert (run / "bundle" / "manifest.json").is_file()
    assert (run / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert report.startswith("# Detector report: small_cnn-digits")
    assert all(label in report for label in EVAL_LABELS)


def test_metrics_cover_each_eval_attack(run, tiny_decoupled_checkpoint):
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["checkpoint"] == str(tiny_decoupled_checkpoint)
    # clean accuracy on the whole test split, the number the decoupling reported
    decoupled = json.loads((tiny_decoupled_checkpoint / "metrics.json").read_text())
    assert metrics["clean_accuracy"] == pytest.approx(decoupled["test_accuracy"])
    assert metrics["config"]["fit_attacks"] == ["FGSM eps=0.2", "PGD eps=0.2"]
    assert 0 < metrics["n_fit_images"] <= 60 and 0 < metrics["n_eval_images"] <= 60
    attacks = metrics["evaluation"]["attacks"]
    assert list(attacks) == list(EVAL_LABELS)
    assert attacks["FGSM eps=0.2"]["fitted"] and not attacks["DEEPFOOL"]["fitted"]
    assert attacks["FGSM eps=0.2"]["family_fitted"] and not attacks["DEEPFOOL"]["family_fitted"]
    assert attacks["DEEPFOOL"]["family"] == "minimal perturbation"
    assert metrics["config"]["eval_suite"] is None  # attacks named explicitly
    unseen = metrics["evaluation"]["worst_unseen_family"]
    assert unseen["auroc_attack"] == "DEEPFOOL" and unseen["families"] == ["minimal perturbation"]
    for m in attacks.values():
        assert m["n_adv"] > 0 and 0.0 <= m["auroc"] <= 1.0
    assert attacks["FGSM eps=0.2"]["auroc"] > 0.8  # a fitted attack on a tiny model is easy
    assert set(metrics["variants"]) == {"logistic"}
    assert metrics["variants"]["logistic"]["auroc"]["DEEPFOOL"] == attacks["DEEPFOOL"]["auroc"]
    assert metrics["evaluation"]["worst"]["auroc"] == min(m["auroc"] for m in attacks.values())


def test_bundle_loads_and_matches_the_metrics(run):
    bundle = load_bundle(run / "bundle")
    metrics = json.loads((run / "metrics.json").read_text())
    assert bundle.name == metrics["name"] == "small_cnn-digits"
    assert bundle.detector.threshold_ == metrics["threshold"]
    assert bundle.manifest.metrics["auroc"] == {
        k: v["auroc"] for k, v in metrics["evaluation"]["attacks"].items()}
    # the bundle flags the evaluation clean images at the rate the metrics report
    arrays = np.load(run / "adversarial.npz")
    clean = torch.from_numpy(arrays["eval_clean_x"])
    analysis = bundle.analyze(clean)
    np.testing.assert_array_equal(analysis.predictions, arrays["eval_clean_y"])
    assert analysis.flagged.mean() == pytest.approx(metrics["evaluation"]["clean_fpr"],
                                                    abs=1.5 / len(clean))


def test_reuse_attacks_refits_on_the_same_sets(run, tiny_decoupled_checkpoint, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    (out / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, out, "--reuse-attacks"))
    first = json.loads((run / "metrics.json").read_text())
    second = json.loads((out / "metrics.json").read_text())
    assert second["config"]["reused_attacks"] and not first["config"]["reused_attacks"]
    for label, m in first["evaluation"]["attacks"].items():
        assert second["evaluation"]["attacks"][label]["n_adv"] == m["n_adv"]
        assert second["evaluation"]["attacks"][label]["auroc"] == pytest.approx(m["auroc"])


@pytest.mark.parametrize("heads", ["fit", "none"])
def test_class_heads_and_feature_group_ablation(run, tiny_decoupled_checkpoint, tmp_path, heads):
    """--class-heads picks the class evidence source; --ablation and '-GROUP' variants refit the
    detector without a feature group on the same sets."""
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    args = tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks", "--ablation",
                     "--class-heads", heads)
    args[args.index("--compare") + 1] = "logistic-prediction-bits"
    fit_detector.cli(args)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["class_heads"] == heads
    groups = ["bits", "gate_logits", "prediction", "stability"] + (
        ["class_evidence"] if heads == "fit" else [])
    assert set(metrics["variants"]) == {"logistic", "logistic-prediction-bits",
                                        *(f"logistic-{g}" for g in groups)}
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.profile.has_heads == (heads == "fit")
    assert bundle.detector.n_features_in_ == len(bundle.profile.feature_names())
    assert "logistic-prediction-bits" in (tmp_path / "report.md").read_text()


def test_stability_features_on_by_default_off_or_chosen_on_request(
        run, tiny_decoupled_checkpoint, tmp_path):
    bundle = load_bundle(run / "bundle")
    assert bundle.manifest.detector.stability_transforms == ("shift", "blur", "bits5")
    assert bundle.manifest.format_version == FORMAT_VERSION == 2
    names = bundle.profile.feature_names()
    assert "stab_prob_l1[blur]" in names and bundle.detector.n_features_in_ == len(names)
    images = torch.rand(2, *bundle.spec.input_shape)
    assert bundle.analyze(images).scores.shape == (2,)
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks",
                               "--stability"))
    plain = load_bundle(tmp_path / "bundle")
    assert plain.manifest.detector.stability_transforms == ()
    assert not any(n.startswith("stab_") for n in plain.profile.feature_names())
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["stability"] == []
    # mirror is left out of the default for digits (a mirrored digit is another symbol) but
    # can be asked for by name
    fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks",
                               "--stability", "mirror"))
    mirrored = load_bundle(tmp_path / "bundle")
    assert mirrored.manifest.detector.stability_transforms == ("mirror",)
    assert "stab_pred_change[mirror]" in mirrored.profile.feature_names()
    assert mirrored.analyze(images).scores.shape == (2,)


def test_variant_leaving_out_a_missing_group_is_refused(run, tiny_decoupled_checkpoint, tmp_path,
                                                         capsys):
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    args = tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks", "--class-heads",
                     "none")
    args[args.index("--compare") + 1] = "logistic-class_evidence"
    with pytest.raises(SystemExit) as e:
        fit_detector.cli(args)
    assert e.value.code == 2
    assert "['class_evidence'] that this profile does not have" in capsys.readouterr().err


def test_class_heads_checkpoint_needs_kept_heads(run, tiny_decoupled_checkpoint, tmp_path,
                                                 capsys):
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("model.json", "weights.safetensors"):
        (ckpt / f).write_bytes((tiny_decoupled_checkpoint / f).read_bytes())
    args = tiny_args(ckpt, tmp_path, "--reuse-attacks", "--class-heads", "checkpoint")
    with pytest.raises(SystemExit) as e:
        fit_detector.cli(args)
    assert e.value.code == 2
    assert "kept no class heads" in capsys.readouterr().err


def test_reuse_attacks_refuses_other_attacks(run, tiny_decoupled_checkpoint, tmp_path, capsys):
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    args = tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks")
    args[args.index("deepfool")] = "cw"
    with pytest.raises(SystemExit) as e:
        fit_detector.cli(args)
    assert e.value.code == 2
    assert "--reuse-attacks" in capsys.readouterr().err


@pytest.mark.parametrize("change", [("--max-fit", "50"), ("--seed", "1")])
def test_reuse_attacks_refuses_other_images(run, tiny_decoupled_checkpoint, tmp_path, capsys,
                                            change):
    """Sets crafted on other clean images would let the threshold or evaluation images overlap
    the fitted ones: refused, naming the option."""
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    with pytest.raises(SystemExit) as e:
        fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks",
                                   *change))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--reuse-attacks" in err and "images" in err
    assert not (tmp_path / "bundle").exists()


def test_adversarial_archive(run):
    arrays = np.load(run / "adversarial.npz")
    labels = [str(arrays[f"eval_adv{i}_label"]) for i in range(2)]
    assert labels == list(EVAL_LABELS)
    for prefix in ("fit", "eval"):
        x = arrays[f"{prefix}_clean_x"]
        assert x.shape[1:] == (1, 8, 8) and x.dtype == np.float32
        assert len(arrays[f"{prefix}_clean_y"]) == len(x)
    fgsm = arrays["eval_adv0_x"]
    assert fgsm.min() >= 0 and fgsm.max() <= 1 and len(arrays["eval_adv0_y"]) == len(fgsm)


def test_threshold_images_set_the_threshold_with_the_held_out_ones(
        run, tiny_decoupled_checkpoint, tmp_path):
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks",
                               "--threshold-images", "100", "--fpr-confidence", "0.9"))
    first = json.loads((run / "metrics.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert first["n_threshold_images"] == 0 and first["config"]["threshold_images"] == 0
    assert metrics["config"]["threshold_images"] == 100
    assert 50 < metrics["n_threshold_images"] <= 100  # the correctly classified ones
    assert metrics["threshold"] != first["threshold"]
    assert metrics["threshold_clean_fpr"] <= 0.05
    # the same fitted scorer: only the threshold moved
    for label, m in first["evaluation"]["attacks"].items():
        assert metrics["evaluation"]["attacks"][label]["auroc"] == pytest.approx(m["auroc"])
    assert load_bundle(tmp_path / "bundle").detector.threshold_ == metrics["threshold"]
    report = (tmp_path / "report.md").read_text()
    assert f"and {metrics['n_threshold_images']} further clean images" in report
    # the bound is recorded where a user reads the operating point
    assert metrics["config"]["fpr_confidence"] == 0.9 and "with confidence 0.9" in report
    assert load_bundle(tmp_path / "bundle").manifest.detector.fpr_confidence == 0.9


@pytest.mark.parametrize(("extra", "message"), [
    (["--fit-attacks", "foo:0.1"], "unknown attack 'foo:0.1'"),
    (["--eval-attacks", "pgd:2"], r"strength of 'pgd:2' must be in (0, 1]"),
    (["--eval-attacks", "fgsm:x"], "bad strength in attack 'fgsm:x'"),
    (["--target-fpr", "0.7"], "--target-fpr must be in (0, 0.5), got 0.7"),
    (["--threshold-images", "-1"], "must be >= 0, got '-1'"),
    (["--threshold-images", "100000"], "--threshold-images 100000: the fitting half has"),
    (["--fpr-confidence", "1"], "must be in (0, 1), got '1'"),
    (["--fpr-confidence", "0.9"], "--fpr-confidence 0.9 at --target-fpr 0.05 needs at least 45 "
                                  "held-out clean images"),
    (["--stability", "greyscale"], "--stability greyscale needs colour images; digits has 1"),
    (["--compare", "svm"], "bad --compare variant 'svm'"),
    (["--compare", "logistic+foo"], "bad --compare variant 'logistic+foo'"),
])
def test_bad_values_exit_2_naming_them(tiny_decoupled_checkpoint, tmp_path, capsys, extra,
                                       message):
    with pytest.raises(SystemExit) as exc:
        fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path / "out", *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_base_checkpoint_is_refused(tiny_base_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        fit_detector.cli(tiny_args(tiny_base_checkpoint, tmp_path / "out"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {tiny_base_checkpoint} is not decoupled" in err
    assert "Traceback" not in err


def test_missing_checkpoint_is_refused(tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit) as exc:
        fit_detector.cli(tiny_args(missing, tmp_path / "out"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"checkpoint file not found: {missing}" in err and "Traceback" not in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--max-fit", "0"], "must be > 0, got '0'"),
    (["--max-fit", "2.5"], "--max-fit: not an integer: '2.5'"),
    (["--negative-reach", "x"], "--negative-reach: not a number: 'x'"),
    (["--detector", "svm"], "invalid choice: 'svm'"),
    (["--negative-reach", "4"], "--negative-reach: must be <= 3, got '4'"),
    (["--benign-negatives", "0"], "--benign-negatives: must be > 0, got '0'"),
    (["--negative-reach", "nan"], "--negative-reach: must be finite, got 'nan'"),
])
def test_argparse_errors_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        fit_detector.cli(tiny_args(tmp_path / "ckpt", tmp_path / "out", *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "training.fit_detector", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "--checkpoint" in result.stdout and "--eval-attacks" in result.stdout
    assert result.stdout.startswith("usage: python -m training.fit_detector")


def test_noise_negatives(run, tiny_decoupled_checkpoint, tmp_path):
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks",
                               "--noise-negatives"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["noise_negatives"]
    assert 0.0 <= metrics["evaluation"]["clean_fpr"] <= 0.2


def test_reuse_attacks_without_sets_is_an_error(tiny_decoupled_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks"))
    assert e.value.code == 2
    assert "adversarial.npz not found" in capsys.readouterr().err


def test_benign_changes_are_reported(run):
    metrics = json.loads((run / "metrics.json").read_text())
    benign = metrics["evaluation"]["benign"]
    assert len(benign) == 15 and "shift 1 px right and down" in benign
    for m in benign.values():
        # over all 60 evaluation images; n: those right before (the evaluated ones) and after
        assert m["accuracy_clean"] == pytest.approx(metrics["n_eval_images"] / 60)
        assert 0.0 <= m["accuracy"] <= 1.0 and m["n"] <= metrics["n_eval_images"]
        assert m["flagged"] is None or 0.0 <= m["flagged"] <= 1.0
    worst = metrics["evaluation"]["worst_benign"]
    assert worst is None or benign[worst["change"]]["within_tolerance"]
    report = (run / "report.md").read_text()
    assert "within 2 points" in report and "attack families not fitted on" in report


def test_benign_negatives(run, tiny_decoupled_checkpoint, tmp_path):
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    fit_detector.cli(tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks",
                               "--benign-negatives", "2", "--noise-negatives",
                               "--negative-reach", "1.5"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["benign_negatives"] == 2 and metrics["config"]["noise_negatives"]
    assert metrics["config"]["negative_reach"] == 1.5
    assert 0.0 <= metrics["evaluation"]["clean_fpr"] <= 0.2


def test_eval_suite_chooses_the_attacks(run, tiny_decoupled_checkpoint, tmp_path, capsys):
    """Without --eval-attacks, --eval-suite full asks for its attacks (refused here by
    --reuse-attacks, whose sets hold others: cheap proof of what was asked for)."""
    (tmp_path / "adversarial.npz").write_bytes((run / "adversarial.npz").read_bytes())
    args = tiny_args(tiny_decoupled_checkpoint, tmp_path, "--reuse-attacks", "--eval-suite",
                     "full")
    i = args.index("--eval-attacks")
    del args[i:i + 3]
    with pytest.raises(SystemExit) as e:
        fit_detector.cli(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'FGSM eps=0.02', 'FGSM eps=0.05'" in err and "'SPSA eps=0.3'" in err
