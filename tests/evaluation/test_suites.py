"""The named evaluation suites, and every attack of the full suite crafted on a tiny model."""

import pytest
import torch

from detector.checkpoint import load_checkpoint
from detector.gating import decouple
from detector.models import create_model
from evaluation.attacks import AttackSpec, craft
from evaluation.catalogue import ADAPTIVE, CATALOGUE, FAMILIES
from evaluation.suites import (
    COLOUR,
    COLOUR_DEFAULT,
    GREY,
    GREY_DEFAULT,
    eval_suite,
    full_suite,
)
from training.data import load_dataset, to_float

FULL_GREY = [AttackSpec.parse(t) for t in full_suite(grey=True)]
FULL_COLOUR = [AttackSpec.parse(t) for t in full_suite(grey=False)]


def test_default_suite_is_the_fast_list():
    assert eval_suite("default", grey=True) == GREY_DEFAULT
    assert eval_suite("default", grey=False) == COLOUR_DEFAULT
    assert eval_suite("full", grey=False) == full_suite(grey=False)
    with pytest.raises(ValueError, match="unknown evaluation suite 'huge'; choose from default"):
        eval_suite("huge", grey=True)


@pytest.mark.parametrize(("specs", "grey"), [(FULL_GREY, True), (FULL_COLOUR, False)])
def test_full_suite_covers_the_catalogue_family_by_family(specs, grey):
    names = {s.name for s in specs}
    expected = {n for n, k in CATALOGUE.items()
                if k.family != ADAPTIVE and not (grey and k.colour_only)}
    assert names == expected
    assert len({s.label for s in specs}) == len(specs)  # no attack twice
    families = [s.family for s in specs]
    runs = list(dict.fromkeys(families))
    assert runs == [f for f in FAMILIES if f != ADAPTIVE]  # every family, in report order
    assert families == sorted(families, key=runs.index)  # contiguous groups
    strengths = GREY if grey else COLOUR
    for family in runs:  # its first attack at every strength, small ones included
        first = next(s for s in specs if s.family == family)
        if first.kind.takes_eps:
            expected_eps = strengths.l2 if first.kind.norm == "l2" else strengths.linf
            assert [s.eps_text for s in specs if s.name == first.name] == list(expected_eps)


def test_full_suite_gives_slow_attacks_fewer_images():
    share = {s.name: s.image_share for s in FULL_COLOUR}
    assert share["square"] == share["cw"] == share["deepfool"] == share["fab"] == 0.25
    assert share["pgd"] == share["fgsm"] == 1.0


@pytest.fixture(scope="module")
def digits(tiny_decoupled_checkpoint):
    model, _ = load_checkpoint(tiny_decoupled_checkpoint)
    data = load_dataset("digits")
    x, y = to_float(data.x_test[:16]), data.y_test[:16]
    keep = model(x).argmax(1) == y
    return model, x[keep][:2], y[keep][:2]


def _check(spec, model, x, y):
    adv = craft(spec, model, x, y, square_queries=10, progress=False)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    delta = (adv - x).flatten(1)
    if spec.eps is not None and spec.kind.norm == "linf":
        assert delta.abs().max() <= spec.eps + 1e-6
    elif spec.eps is not None:
        assert delta.norm(dim=1).max() <= spec.eps + 1e-4
    assert not model.training


@pytest.mark.parametrize("name", sorted({s.name for s in FULL_GREY}))
def test_every_full_suite_attack_crafts_in_range_and_budget(digits, name):
    """The suite's attack at its largest strength, on two digits images."""
    model, x, y = digits
    _check([s for s in FULL_GREY if s.name == name][-1], model, x, y)


@pytest.mark.parametrize("name", sorted(n for n, k in CATALOGUE.items() if k.colour_only))
def test_colour_only_attacks(name):
    model = decouple(create_model("small_cnn", in_channels=3)).eval()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    spec = AttackSpec.parse(f"{name}:8/255")
    _check(spec, model, x, y)
    with pytest.raises(ValueError, match=f"attack '{name}' works on colour images only"):
        craft(spec, model, x[:, :1], y, progress=False)


def test_attacks_take_images_in_any_memory_layout():
    """torchattacks' PGD-L2 views its perturbation flat, which fails on a channels-last batch
    (images decoded from HWC arrays); craft hands attacks contiguous batches."""
    model = decouple(create_model("small_cnn", in_channels=3)).eval()
    x, y = torch.rand(2, 8, 8, 3).permute(0, 3, 1, 2), torch.tensor([0, 1])
    assert not x.is_contiguous()
    _check(AttackSpec.parse("pgdl2:1"), model, x, y)
