"""The adaptive attacks (evaluation.adaptive) and the benchmark script over them, on a tiny
digits bundle (fit_detector)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.analysis import score_paths
from detector.bundle import Bundle, load_bundle
from detector.features import PathBatch
from detector.paths import compute_path
from detector.stability import transformed
from detector.straight_through import straight_through_gates
from evaluation.adaptive.benchmark import attack_title, markdown_table
from evaluation.adaptive.judge import judge, quantize_towards
from evaluation.adaptive.objectives import class_margin, score_gap
from evaluation.adaptive.pgd import DetectorAwarePGD, PGDConfig
from evaluation.adaptive.square import detector_aware_margin
from evaluation.adaptive.surrogate import ShippedScore, fit_attack_surrogate
from evaluation.attacks import AttackSpec, Defence, craft
from training import fit_detector
from training.data import load_digits, to_float

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle_dir(tiny_decoupled_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Path:
    """A digits bundle from fit_detector: random forest on clean vs FGSM/PGD (eps 0.2),
    evaluated on FGSM and on both adaptive attacks (crafted after fitting)."""
    out = tmp_path_factory.mktemp("adaptive") / "detector"
    fit_detector.cli(["--checkpoint", str(tiny_decoupled_checkpoint), "--max-fit", "120",
                      "--max-eval", "10", "--max-profile", "400", "--fit-attacks", "fgsm:0.2",
                      "pgd:0.2", "--eval-attacks", "fgsm:0.2", "pgd-aware:0.2",
                      "square-aware:0.2", "--square-queries", "30", "--detector",
                      "random_forest", "--compare", "--out", str(out), "--threads", "1",
                      "--quiet"])
    torch.set_num_threads(1)
    return out / "bundle"


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    b = load_bundle(bundle_dir)
    b.model.requires_grad_(False)
    return b


@pytest.fixture(scope="module")
def logistic_bundle(tiny_decoupled_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                    ) -> Bundle:
    """A digits bundle whose detector (logistic regression) has an exact torch export."""
    out = tmp_path_factory.mktemp("adaptive_logistic") / "detector"
    fit_detector.cli(["--checkpoint", str(tiny_decoupled_checkpoint), "--max-fit", "120",
                      "--max-eval", "10", "--max-profile", "400", "--fit-attacks", "fgsm:0.2",
                      "pgd:0.2", "--eval-attacks", "fgsm:0.2", "--detector", "logistic",
                      "--compare", "--out", str(out), "--threads", "1", "--quiet"])
    torch.set_num_threads(1)
    b = load_bundle(out / "bundle")
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
    assert bundle.profile.stability  # the companion paths are part of the attacked path
    with torch.inference_mode():
        plain = bundle.record(x)
    xg = x.clone().requires_grad_(True)
    with straight_through_gates("semhash"):
        result = bundle.record(xg, ste="semhash")
    assert torch.equal(plain.logits, result.logits.detach())  # BPDA changes no forward value
    for a, b in [(plain, result), *((plain.companions[t], result.companions[t])
                                    for t in bundle.profile.stability)]:
        for name, bits in a.bits.items():
            assert torch.equal(bits, b.bits[name].detach())
    attacked = score_paths(bundle.profile, bundle.detector, result)
    served = score_paths(bundle.profile, bundle.detector, plain)
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
                paths = bundle.record(xg, ste="sigmoid")
        else:  # the hard bits carry no gradient; the gate logits (and logits) still do
            def keep(result):
                plain = PathBatch.from_result(result)
                return PathBatch(result.logits, plain.bits,
                                 {k: v.logits for k, v in result.layers.items()})
            paths = keep(compute_path(bundle.model, xg)).with_companions(
                {t: keep(compute_path(bundle.model, transformed(t, xg)))
                 for t in bundle.profile.stability})
        score = surrogate(bundle.profile.transform(paths))
        (g,) = torch.autograd.grad(score.sum(), xg)
        return g

    with_gates, without = grad(True), grad(False)
    assert with_gates.abs().sum() > 0
    assert (with_gates - without).abs().sum() > 0  # the gates' own gradient is part of it


def test_adaptive_pgd_stays_in_the_ball(bundle, images) -> None:
    x, y = images
    cfg = PGDConfig(eps=0.1, alpha=0.03, steps=5)
    res = DetectorAwarePGD(bundle, None, cfg, lambdas=[0.0], batch_size=7).run(x[:16], y[:16])
    assert (res.x_adv - x[:16]).abs().max() <= 0.1 + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    analysis = bundle.analyze(res.x_adv)
    broken = (analysis.predictions != y[:16].numpy()) & ~analysis.flagged
    np.testing.assert_array_equal(broken, res.success)
    q = quantize_towards(x[:16], res.x_adv)
    assert (q - x[:16]).abs().max() <= 0.1 + 1e-6
    assert torch.allclose(q * 255, (q * 255).round(), atol=1e-3)


def test_adaptive_pgd_on_the_grid_moves_in_whole_grid_steps(bundle, images) -> None:
    """--grid: every iterate on the 1/255 grid (what a PNG carries); a step below one grid unit
    would be rounded away at once, so it is refused."""
    x, y = images
    xq = (x[:16] * 255).round() / 255  # digits are on a 1/16 grid: move them onto 1/255
    cfg = PGDConfig(eps=0.1, alpha=8 / 255, steps=5, grid=True)
    res = DetectorAwarePGD(bundle, None, cfg, lambdas=[0.0]).run(xq, y[:16])
    assert torch.allclose(res.x_adv * 255, (res.x_adv * 255).round(), atol=1e-3)
    assert (res.x_adv - xq).abs().max() <= 0.1 + 1e-6
    assert (res.x_adv - xq).abs().max() >= 8 / 255 - 1e-6  # it does leave its start
    with pytest.raises(ValueError, match="at least 1/255"):
        PGDConfig(eps=4 / 255, alpha=2.5 * (4 / 255) / 100, steps=100, grid=True)
    PGDConfig(eps=4 / 255, alpha=2.5 * (4 / 255) / 100, steps=100)  # fine off the grid


def test_detector_aware_margin() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [3.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 0])
    scores = torch.tensor([0.01, 0.01, 0.9, 0.9])
    m = detector_aware_margin(logits, y, scores, threshold=0.5)
    assert m[0] == pytest.approx(2.0)  # correct, not flagged: the class margin
    assert m[1] == pytest.approx(-2.0)  # misclassified, not flagged: success (<= 0)
    assert m[2] == pytest.approx(math.log(9))  # misclassified but flagged: the score's log-odds
    assert m[3] == pytest.approx(2.0 + math.log(9))


def test_detector_aware_pgd_is_a_torchattacks_attack(bundle, images) -> None:
    """Called like any torchattacks attack: eval mode during the attack, the caller's mode
    restored, the adversarial images as the run's."""
    x, y = images
    cfg = PGDConfig(eps=0.1, alpha=0.03, steps=3)
    attack = DetectorAwarePGD(bundle, None, cfg, lambdas=[0.0])
    bundle.model.train()
    try:
        adv = attack(x[:8], y[:8])
        assert bundle.model.training
    finally:
        bundle.model.eval()
    torch.testing.assert_close(adv, attack.run(x[:8], y[:8]).x_adv, rtol=0, atol=0)
    with pytest.raises(ValueError, match="need a surrogate"):
        DetectorAwarePGD(bundle, None, cfg, lambdas=[0.0, 1.0])
    with pytest.raises(ValueError, match="lambdas"):
        DetectorAwarePGD(bundle, None, cfg, lambdas=[])
    with pytest.raises(ValueError, match="restarts"):
        DetectorAwarePGD(bundle, None, cfg, lambdas=[0.0], restarts=0)


def test_restarts_only_add_successes(bundle, images) -> None:
    """Restarts run on the inputs the first run left unbroken, from random points of the ball:
    what one run breaks stays broken (untouched), the others are attacked again, and every
    success is real. (Whether restarts break more depends on the model, not on this code: on
    the tiny digits bundle they rarely do.)"""
    x, y = images
    cfg = PGDConfig(eps=0.06, alpha=0.02, steps=4)
    one = DetectorAwarePGD(bundle, None, cfg, lambdas=[0.0]).run(x, y)
    three = DetectorAwarePGD(bundle, None, cfg, lambdas=[0.0], restarts=3).run(x, y)
    assert 0 < one.success.sum() < len(y)
    assert (three.success >= one.success).all()
    broken = torch.from_numpy(one.success)
    torch.testing.assert_close(three.x_adv[broken], one.x_adv[broken], rtol=0, atol=0)
    moved = (three.x_adv[~broken] - one.x_adv[~broken]).flatten(1).abs().amax(1)
    assert bool((moved > 0).all())  # every unbroken input was attacked again from elsewhere
    assert (three.x_adv - x).abs().max() <= 0.06 + 1e-6
    analysis = bundle.analyze(three.x_adv)
    np.testing.assert_array_equal((analysis.predictions != y.numpy()) & ~analysis.flagged,
                                  three.success)


def test_adaptive_attacks_by_name_need_the_defence(bundle, images) -> None:
    x, y = images
    for text in ("pgd-aware:0.1", "square-aware:0.1"):
        spec = AttackSpec.parse(text)
        assert spec.adaptive and spec.label == text.upper().replace(":", " eps=")
        with pytest.raises(ValueError, match="is adaptive: it attacks a fitted detector"):
            craft(spec, bundle.model, x[:4], y[:4], progress=False)
    with pytest.raises(ValueError, match="needs fitting-side images"):
        craft(AttackSpec.parse("pgd-aware:0.1"), bundle.model, x[:4], y[:4], progress=False,
              defence=Defence(bundle))
    assert not AttackSpec.parse("pgd:0.1").adaptive


@pytest.mark.parametrize(("text", "attacked"), [("pgd-aware:0.2", "logistic_bundle"),
                                                ("square-aware:0.2", "bundle")])
def test_adaptive_attacks_by_name_stay_in_the_ball(request, images, text, attacked) -> None:
    """By name through evaluation.attacks: the same attacks, against the defence's bundle
    (pgd-aware with a fitted surrogate is exercised by the fit_detector fixture)."""
    bundle = request.getfixturevalue(attacked)
    x, y = images
    defence = Defence(bundle, x[32:48], y[32:48])  # fitting images: not the attacked ones
    spec = AttackSpec.parse(text)
    adv = craft(spec, bundle.model, x[:12], y[:12], batch_size=5, square_queries=20,
                progress=False, defence=defence)
    assert adv.shape == x[:12].shape
    assert (adv - x[:12]).abs().max() <= 0.2 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    verdict = judge(bundle, x[:12], adv, y[:12])
    assert 0.0 <= verdict["evaded"] <= verdict["misclassified"] <= 1.0


def test_shipped_score_is_the_real_verdict_with_a_gradient(bundle, logistic_bundle,
                                                           images) -> None:
    """Where the detector is exact in torch the attack descends on its own score: > 0 exactly
    when the real pipeline flags; trees have no such score."""
    assert ShippedScore.of(bundle) is None  # random forest
    shipped = ShippedScore.of(logistic_bundle)
    assert shipped is not None
    x, y = images
    xg = x.clone().requires_grad_(True)
    with straight_through_gates("semhash"):
        paths = logistic_bundle.record(xg, ste="semhash")
    scored = logistic_bundle.score_paths(paths)
    score = shipped(scored.features)
    np.testing.assert_array_equal((score > 0).numpy(), logistic_bundle.analyze(x).flagged)
    (g,) = torch.autograd.grad(score.sum(), xg)
    assert g.abs().sum() > 0
    # by name, pgd-aware needs no fitting images when the score ships
    adv = craft(AttackSpec.parse("pgd-aware:0.2"), logistic_bundle.model, x[:8], y[:8],
                progress=False, defence=Defence(logistic_bundle))
    assert (adv - x[:8]).abs().max() <= 0.2 + 1e-6


def test_fit_detector_evaluates_adaptive_attacks_after_fitting(bundle_dir: Path) -> None:
    """--eval-attacks pgd-aware/square-aware: measured like every other attack, against the
    bundled detector, listed in metrics.json, the report and the manifest's summary; not
    stored in adversarial.npz (they depend on the fitted detector)."""
    run = bundle_dir.parent
    metrics = json.loads((run / "metrics.json").read_text())
    attacks = metrics["evaluation"]["attacks"]
    assert list(attacks) == ["FGSM eps=0.2", "PGD-AWARE eps=0.2", "SQUARE-AWARE eps=0.2"]
    for label in ("PGD-AWARE eps=0.2", "SQUARE-AWARE eps=0.2"):
        m = attacks[label]
        assert m["adaptive"] and not m["fitted"] and 0.0 <= m["success"] <= 1.0
        assert label in (run / "report.md").read_text()
    assert metrics["config"]["eval_attacks"] == list(attacks)
    measured = {k: v["auroc"] for k, v in attacks.items() if v.get("n_adv", 0) > 0}
    assert metrics["evaluation"]["worst"]["auroc"] == min(measured.values())
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(manifest["metrics"]["auroc"]) == set(attacks)
    with np.load(run / "adversarial.npz") as f:
        labels = {str(f[k]) for k in f.files if k.startswith("eval_adv") and k.endswith("_label")}
    assert labels == {"FGSM eps=0.2"}


@pytest.mark.parametrize(("option", "attack", "message"), [
    ("--fit-attacks", "pgd-aware:0.2", "--fit-attacks: adaptive attacks"),
    ("--adaptive-positives", "pgd:0.2", "--adaptive-positives takes adaptive attacks only"),
])
def test_fit_detector_refuses_adaptive_attacks_where_they_cannot_go(
        tiny_decoupled_checkpoint, tmp_path, capsys, option, attack, message) -> None:
    with pytest.raises(SystemExit) as e:
        fit_detector.cli(["--checkpoint", str(tiny_decoupled_checkpoint), option, attack,
                          "--out", str(tmp_path / "out"), "--quiet"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fit_detector_fits_on_adaptive_positives(tiny_decoupled_checkpoint, tmp_path,
                                                 images) -> None:
    """--adaptive-positives: a first fit is attacked adaptively on the fitting images, its
    examples join the positives, the detector is fitted again, and the evaluation's adaptive
    attack attacks the refitted one."""
    out = tmp_path / "detector"
    fit_detector.cli(["--checkpoint", str(tiny_decoupled_checkpoint), "--max-fit", "80",
                      "--max-eval", "20", "--max-profile", "300", "--fit-attacks", "fgsm:0.2",
                      "--adaptive-positives", "pgd-aware:0.2", "--eval-attacks", "fgsm:0.2",
                      "pgd-aware:0.2", "--detector", "logistic", "--compare", "--stability",
                      "--name", "digits-hardened", "--out", str(out), "--threads", "1",
                      "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["adaptive_positives"] == ["PGD-AWARE eps=0.2"]
    positives = metrics["n_fit_positives"]
    assert positives["PGD-AWARE eps=0.2 vs first fit"] > 0 and positives["FGSM eps=0.2"] > 0
    first, final = load_bundle(out / "first_fit_bundle"), load_bundle(out / "bundle")
    assert first.name == final.name == metrics["name"] == "digits-hardened"  # --name
    x, _ = images
    assert not np.allclose(first.analyze(x).scores, final.analyze(x).scores)  # fitted again
    assert "PGD-AWARE eps=0.2" in metrics["evaluation"]["attacks"]
    assert metrics["evaluation"]["attacks"]["PGD-AWARE eps=0.2"]["family_fitted"]
    with np.load(out / "adversarial.npz") as f:
        labels = {str(f[k]) for k in f.files if k.startswith("fit_adv") and k.endswith("_label")}
    assert labels == {"FGSM eps=0.2"}


def test_adaptive_beats_plain_pgd_end_to_end(bundle_dir, tmp_path) -> None:
    """python benchmarks/adaptive.py, run as a user runs it."""
    out = tmp_path / "adaptive.json"
    subprocess.run([sys.executable, "benchmarks/adaptive.py", "--bundle", str(bundle_dir),
                    "--dataset", "digits", "--n", "40", "--n-blackbox", "10", "--eps", "1/5",
                    "--steps", "10", "--surrogate-images", "30", "--square-queries", "20",
                    "--lambdas", "0", "1", "--restarts", "2", "--json", str(out),
                    "--plot", str(tmp_path / "curve.png"), "--quiet"],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    content = json.loads(out.read_text())
    assert content["n"] == 40 and content["n_blackbox"] == 10
    assert content["config"]["restarts"] == 2 and content["config"]["surrogate"] == "mlp"
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    either = set(attacks["adaptive"]["evaded_ids"]) | set(attacks["pgd"]["evaded_ids"])
    assert row["white_box_union"] == pytest.approx(len(either) / 40)
    assert row["white_box_union_up_to_eps"] == row["white_box_union"]  # one budget
    assert attacks["adaptive"]["evaded"] > 0
    assert attacks["adaptive"]["loop_vs_analyze_disagreements"] == 0
    assert sum(attacks["adaptive"]["by_lambda"].values()) == round(
        attacks["adaptive"]["evaded"] * 40)


@pytest.mark.parametrize(("surrogate", "named"), [("mlp", "surrogate"),
                                                  ("shipped", "shipped score"),
                                                  ("auto", "shipped score")])
def test_the_adaptive_attack_is_named_by_the_detector_term_it_descended(surrogate, named) -> None:
    """Plot legends and tables say whether the attack used the shipped score or a stand-in
    ("auto" in files written before the benchmark recorded its resolution: the shipped one)."""
    attack = {"evaded": 0.5, "misclassified": 0.6, "evaded_8bit": 0.1}
    content = {"config": {"surrogate": surrogate}, "n": 10, "n_blackbox": 5,
               "clean_flagged": 0.05, "threshold": 0.5,
               "results": [{"eps": 0.1, "attacks": {"pgd": attack, "adaptive": attack}}]}
    assert named in attack_title("adaptive", content)
    assert attack_title("pgd", content) == "PGD (non-adaptive)"
    assert f"adaptive PGD (BPDA + {named})" in markdown_table(content)
    assert "adaptive or plain PGD" not in markdown_table(content)
    content["results"][0]["white_box_union"] = 0.55
    table = markdown_table(content)
    assert "adaptive or plain PGD" in table and "| 0.550 |" in table
    head, rule = table.splitlines()[:2]
    assert head.count("|") == rule.count("|")
    content["config"]["lambdas"] = [0.0]  # no detector term: the detector only stops it
    assert "stopping rule" in attack_title("adaptive", content)


@pytest.mark.parametrize(("extra", "named"), [(["--eps", "0"], "--eps"),
                                              (["--plot", "."], "--plot")])
def test_bad_values_exit_2(bundle_dir, extra, named) -> None:
    done = subprocess.run([sys.executable, "benchmarks/adaptive.py", "--bundle",
                           str(bundle_dir), "--dataset", "digits", *extra],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    assert named in done.stderr


def test_objectives_by_hand() -> None:
    margin, best = class_margin(torch.tensor([[2.0, 0.5, 1.0], [0.0, 3.0, 1.0]]),
                                torch.tensor([0, 2]))
    torch.testing.assert_close(margin, torch.tensor([1.0, -2.0]))
    torch.testing.assert_close(best, torch.tensor([2, 1]))
    gap = score_gap(torch.tensor([0.2, 0.5, 0.9, 0.0, 1.0]), 0.5)
    assert gap.dtype == torch.float64
    torch.testing.assert_close(gap[:3], torch.tensor([math.log(0.25), 0.0, math.log(9.0)],
                                                     dtype=torch.float64))
    assert gap[3] < -20 and gap[4] > 20  # clamped, finite
