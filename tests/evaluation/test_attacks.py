"""Attack specs and crafting through torchattacks on a tiny decoupled digits model."""

import pytest
import torch

from detector.checkpoint import load_checkpoint
from evaluation.attacks import ATTACKS, AttackSpec, craft
from evaluation.catalogue import CATALOGUE, FAMILIES
from training.data import load_dataset, to_float


@pytest.mark.parametrize(("text", "name", "eps", "label"), [
    ("fgsm:0.3", "fgsm", 0.3, "FGSM eps=0.3"),
    ("PGD:8/255", "pgd", 8 / 255, "PGD eps=8/255"),
    (" bim:1 ", "bim", 1.0, "BIM eps=1"),
    ("square:0.05", "square", 0.05, "SQUARE eps=0.05"),
    ("cw", "cw", None, "CW"),
    ("DeepFool", "deepfool", None, "DEEPFOOL"),
    ("pgdl2:2", "pgdl2", 2.0, "PGDL2 eps=2"),  # an L2 budget may exceed 1
    ("square:8/255@1/4", "square", 8 / 255, "SQUARE eps=8/255"),  # the share is not labelled
    ("fab@0.5", "fab", None, "FAB"),
])
def test_parse_valid_specs(text, name, eps, label):
    spec = AttackSpec.parse(text)
    assert spec.name == name
    assert spec.eps == (pytest.approx(eps) if eps is not None else None)
    assert spec.label == label
    assert AttackSpec.parse(spec.text) == spec


def test_image_share_caps_the_images():
    spec = AttackSpec.parse("cw@1/4")
    assert spec.image_share == 0.25 and spec.text == "cw@1/4"
    assert [spec.images(n) for n in (0, 1, 3, 8, 10)] == [0, 1, 1, 2, 3]
    assert AttackSpec.parse("cw").images(10) == 10


@pytest.mark.parametrize(("text", "match"), [
    ("foo", r"unknown attack 'foo'; choose from .*fgsm"),
    ("foo:0.1", "unknown attack 'foo:0.1'"),
    ("fgsm", r"attack 'fgsm' needs a strength, e\.g\. fgsm:0\.3"),
    ("pgd:", "attack 'pgd' needs a strength"),
    ("cw:0.1", "attack 'cw' takes no eps, got 'cw:0.1'"),
    ("pgd:abc", "bad strength in attack 'pgd:abc'"),
    ("pgd:1/0", "bad strength in attack 'pgd:1/0'"),
    ("pgd:0", r"strength of 'pgd:0' must be in \(0, 1\], got 0\.0"),
    ("fgsm:1.5", r"strength of 'fgsm:1.5' must be in \(0, 1\], got 1\.5"),
    ("fgsm:-8/255", r"must be in \(0, 1\]"),
    ("pgdl2:0", r"L2 strength of 'pgdl2:0' must be > 0, got 0\.0"),
    ("cw@0", r"image share of 'cw@0' must be in \(0, 1\], got 0\.0"),
    ("pgd:0.1@3/2", r"image share of 'pgd:0.1@3/2' must be in \(0, 1\]"),
    ("pgd:0.1@x", "bad image share in attack 'pgd:0.1@x'"),
])
def test_parse_invalid_specs_name_the_value(text, match):
    with pytest.raises(ValueError, match=match):
        AttackSpec.parse(text)


def test_every_listed_attack_parses():
    for name in ATTACKS:
        spec = AttackSpec.parse(f"{name}:0.1" if CATALOGUE[name].takes_eps else name)
        assert spec.name == name and spec.family in FAMILIES


@pytest.fixture(scope="module")
def model_and_images(tiny_decoupled_checkpoint):
    model, _ = load_checkpoint(tiny_decoupled_checkpoint)
    data = load_dataset("digits")
    x, y = to_float(data.x_test[:32]), data.y_test[:32]
    keep = model(x).argmax(1) == y
    return model, x[keep], y[keep]


@pytest.mark.parametrize("text", ["fgsm:0.2", "pgd:0.1", "bim:0.15", "square:0.2"])
def test_craft_stays_in_range_and_in_the_eps_ball(model_and_images, text):
    model, x, y = model_and_images
    spec = AttackSpec.parse(text)
    adv = craft(spec, model, x, y, batch_size=10, square_queries=20, progress=False)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (adv - x).abs().max() <= spec.eps + 1e-6
    assert (adv != x).any()
    assert not model.training


@pytest.mark.parametrize("text", ["fgsm:0.3", "pgd:0.3"])
def test_gradient_attacks_fool_the_model(model_and_images, text):
    model, x, y = model_and_images  # all correctly classified
    adv = craft(AttackSpec.parse(text), model, x, y, progress=False)
    with torch.no_grad():
        accuracy = (model(adv).argmax(1) == y).float().mean().item()
    assert accuracy < 0.5


def test_craft_is_reproducible_with_a_seed(model_and_images):
    model, x, y = model_and_images
    spec = AttackSpec.parse("pgd:0.1")  # random start
    a = craft(spec, model, x, y, seed=3, progress=False)
    b = craft(spec, model, x, y, seed=3, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_craft_on_no_images_returns_an_empty_copy(model_and_images):
    model, x, y = model_and_images
    adv = craft(AttackSpec.parse("fgsm:0.1"), model, x[:0], y[:0], progress=False)
    assert adv.shape == (0, *x.shape[1:])


@pytest.mark.parametrize("text", ["fgsm:0.2", "pgd:0.1"])
def test_fgsm_and_pgd_are_torchattacks_bit_for_bit(model_and_images, text):
    """training's FGSM and PGD are detector.perturb's (torch only, so the server can use them
    without the train extra); they give torchattacks' images exactly, random start included,
    so results crafted with torchattacks before are reproduced."""
    import torchattacks

    model, x, y = model_and_images
    spec = AttackSpec.parse(text)
    ours = craft(spec, model, x, y, seed=5, progress=False)
    reference = (torchattacks.FGSM(model, eps=spec.eps) if spec.name == "fgsm" else
                 torchattacks.PGD(model, eps=spec.eps, alpha=spec.eps / 8, steps=20,
                                  random_start=True))
    torch.manual_seed(5)
    torch.testing.assert_close(ours, reference(x, y).clamp(0, 1), rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
