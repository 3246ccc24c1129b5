"""benchmarks/adaptive.py and benchmarks/surrogate.py on a tiny digits bundle (fit_detector)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.adaptive import (
    PGDConfig,
    adaptive_pgd,
    detector_aware_margin,
    fit_attack_surrogate,
    quantize_towards,
)
from benchmarks.adaptive import main as adaptive_main
from detector.analysis import score_paths
from detector.bundle import Bundle, load_bundle
from detector.features import PathBatch
from detector.paths import compute_path
from detector.straight_through import straight_through_gates
from training import fit_detector
from training.data import load_digits, to_float


@pytest.fixture(scope="module")
def bundle_dir(tiny_decoupled_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Path:
    """A digits bundle from fit_detector: random forest on clean vs FGSM/PGD (eps 0.2)."""
    out = tmp_path_factory.mktemp("adaptive") / "detector"
    fit_detector.cli(["--checkpoint", str(tiny_decoupled_checkpoint), "--max-fit", "120",
                      "--max-eval", "10", "--max-profile", "400", "--fit-attacks", "fgsm:0.2",
                      "pgd:0.2", "--eval-attacks", "fgsm:0.2", "--detector", "random_forest",
                      "--compare", "--out", str(out), "--threads", "1", "--quiet"])
    torch.set_num_threads(1)
    return out / "bundle"


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    b = load_bundle(bundle_dir)
    b.model.requires_grad_(False)
    return b


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    return to_float(data.x_test[:64]), data.y_test[:64]


def test_attack_path_scores_as_served_and_bpda_keeps_values(bundle, images) -> None:
    """The attacker's differentiable path (BPDA gates, straight-through bits) gives exactly the
    served pipeline's predictions, features and scores."""
    x, _ = images
    with torch.inference_mode():
        plain = compute_path(bundle.model, x)
    xg = x.clone().requires_grad_(True)
    with straight_through_gates("semhash"):
        result = compute_path(bundle.model, xg)
    assert torch.equal(plain.logits, result.logits.detach())  # BPDA changes no forward value
    for name, layer in plain.layers.items():
        assert torch.equal(layer.bits, result.layers[name].bits)
    attacked = score_paths(bundle.profile, bundle.detector,
                           PathBatch.from_result(result, ste="semhash"))
    served = score_paths(bundle.profile, bundle.detector, PathBatch.from_result(plain))
    torch.testing.assert_close(attacked.features.detach(), served.features, rtol=0, atol=0)
    analysis = bundle.analyze(x)
    np.testing.assert_array_equal(attacked.predictions.numpy(), analysis.predictions)
    np.testing.assert_allclose(attacked.scores.numpy(), analysis.scores, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(attacked.flagged.numpy(), analysis.flagged)
    # the features have a gradient with respect to the input, through bits and gate logits
    (g,) = torch.autograd.grad(attacked.features.sum(), xg)
    assert g.abs().sum() > 0


def test_gradients_flow_through_gates_and_surrogate(bundle, images) -> None:
    x, y = images
    cfg = PGDConfig(eps=0.2, alpha=0.05, steps=4)
    surrogate, history = fit_attack_surrogate(bundle, x[:32], y[:32], [cfg], [1.0],
                                              kind="mlp", rounds=0, seed=0)
    assert history[0]["points"] == 32 * 5 and 0.0 <= history[0]["holdout_accuracy"] <= 1.0

    def grad(bpda: bool) -> torch.Tensor:
        xg = x.clone().requires_grad_(True)
        if bpda:
            with straight_through_gates("sigmoid"):
                result = compute_path(bundle.model, xg)
        else:
            result = compute_path(bundle.model, xg)
        paths = PathBatch.from_result(result, ste="sigmoid" if bpda else None)
        if not bpda:  # the hard bits carry no gradient; the gate logits still do
            paths = PathBatch(result.logits, paths.bits,
                              {k: v.logits for k, v in result.layers.items()})
        score = surrogate(bundle.profile.transform(paths))
        (g,) = torch.autograd.grad(score.sum(), xg)
        return g

    with_gates, without = grad(True), grad(False)
    assert with_gates.abs().sum() > 0
    assert (with_gates - without).abs().sum() > 0  # the gates' own gradient is part of it


def test_adaptive_pgd_stays_in_the_ball(bundle, images) -> None:
    x, y = images
    cfg = PGDConfig(eps=0.1, alpha=0.03, steps=5)
    res = adaptive_pgd(bundle, None, x[:16], y[:16], cfg, [0.0], batch_size=7)
    assert (res.x_adv - x[:16]).abs().max() <= 0.1 + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    analysis = bundle.analyze(res.x_adv)
    broken = (analysis.predictions != y[:16].numpy()) & ~analysis.flagged
    np.testing.assert_array_equal(broken, res.success)
    q = quantize_towards(x[:16], res.x_adv)
    assert (q - x[:16]).abs().max() <= 0.1 + 1e-6
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-3)


def test_detector_aware_margin() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 0])
    scores = torch.tensor([0.01, 0.01, 0.9, 0.9])
    m = detector_aware_margin(logits, y, scores, threshold=0.5)
    assert m[0] == pytest.approx(2.0)  # correct, not flagged: the class margin
    assert m[1] == pytest.approx(-2.0)  # misclassified, not flagged: success (<= 0)
    assert m[2] == pytest.approx(math.log(9))  # misclassified but flagged: the score's log-odds
    assert m[3] == pytest.approx(2.0 + math.log(9))


def test_adaptive_beats_plain_pgd_end_to_end(bundle_dir, tmp_path) -> None:
    out = tmp_path / "adaptive.json"
    adaptive_main(["--bundle", str(bundle_dir), "--dataset", "digits", "--n", "40",
                   "--n-blackbox", "10", "--eps", "0.2", "--steps", "10",
                   "--surrogate-images", "30", "--square-queries", "20",
                   "--lambdas", "0", "1", "--json", str(out), "--quiet"])
    content = json.loads(out.read_text())
    assert content["n"] == 40 and content["n_blackbox"] == 10
    # evaluated images come from the half of the test split the detector was not fitted on
    perm = torch.randperm(450, generator=torch.Generator().manual_seed(0)).numpy()
    assert set(content["image_ids"]) <= set(perm[225:].tolist())
    assert set(content["surrogate_image_ids"]) <= set(perm[:225].tolist())
    (row,) = content["results"]
    attacks = row["attacks"]
    assert set(attacks) == {"pgd", "adaptive", "square", "square-aware"}
    for r in attacks.values():
        assert 0.0 <= r["evaded"] <= r["misclassified"] <= 1.0 and r["linf"] <= 0.2 + 1e-6
    assert attacks["adaptive"]["evaded"] >= attacks["pgd"]["evaded"]
    assert attacks["adaptive"]["evaded"] > 0
    assert attacks["adaptive"]["loop_vs_analyze_disagreements"] == 0
    assert sum(attacks["adaptive"]["by_lambda"].values()) == round(
        attacks["adaptive"]["evaded"] * 40)


def test_bad_values_exit_2(bundle_dir, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        adaptive_main(["--bundle", str(bundle_dir), "--dataset", "digits", "--eps", "0"])
    assert e.value.code == 2
    assert "--eps" in capsys.readouterr().err
