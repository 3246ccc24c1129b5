"""Optimisation recipes: schedules, airbench's rates, lookahead, augmentation, a smoke run."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector.models import create_model
from training.data import batches, with_benign_changes
from training.engine import evaluate, fit
from training.recipe import (
    AIRBENCH,
    BN_BIAS_LR_MULT,
    ONE_CYCLE,
    Augmentation,
    Lookahead,
    airbench_sgd,
    parameter_groups,
    whiten_bias_schedule,
)


def test_warmup_linear_schedule():
    total = 100  # warm-up: 23 steps from 0.2x to 1x, then linear to 0.07x
    assert AIRBENCH.lr_factor(0, total) == pytest.approx(0.2)
    assert AIRBENCH.lr_factor(23, total) == pytest.approx(1.0)
    assert AIRBENCH.lr_factor(100, total) == pytest.approx(0.07)
    mid = AIRBENCH.lr_factor(23 + 77 // 2, total)
    assert 0.07 < mid < 1.0
    factors = [AIRBENCH.lr_factor(s, total) for s in range(total + 1)]
    assert max(factors) == pytest.approx(1.0)


def test_airbench_rates_in_pytorch_terms():
    lr, wd = airbench_sgd(11.5, 0.0153, 0.85, 1024)
    assert lr == pytest.approx(1.5)
    assert wd == pytest.approx(0.0153 / 11.5)
    half_lr, half_wd = airbench_sgd(11.5, 0.0153, 0.85, 512)
    assert (half_lr, half_wd) == pytest.approx((0.75, wd))


def test_lookahead_moves_weights_to_the_average():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ahead = Lookahead(net)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ahead.update(0.0)  # decay 0: the average becomes the current weights
    assert torch.all(net.weight == 3.0)
    with torch.no_grad():
        net.weight.fill_(5.0)
    ahead.update(0.75)  # 3 + 0.25 (5 - 3)
    assert torch.allclose(net.weight, torch.full((1, 2), 3.5))
    ahead.update(1.0)
    assert torch.allclose(net.weight, torch.full((1, 2), 3.5))


def test_alternating_flips_flip_every_image_every_other_epoch():
    x = torch.arange(2 * 4 * 4, dtype=torch.uint8).view(1, 1, 4, 8).repeat(16, 1, 1, 1)[..., :4]
    x = x + torch.arange(16, dtype=torch.uint8).view(16, 1, 1, 1)  # distinct, not symmetric
    y = torch.arange(16)
    aug = Augmentation(translate=0, alternate_flip=True)

    def flipped(epoch):
        out = {}
        for xb, yb in batches(x, y, 5, shuffle=True, augment=aug, seed=7, epoch=epoch):
            for img, label in zip(xb, yb, strict=True):
                plain = x[label].float() / 255
                out[int(label)] = not torch.equal(img, plain)
                assert torch.equal(img, plain) or torch.equal(img, plain.flip(2))
        return out

    e0, e1, e2 = flipped(0), flipped(1), flipped(2)
    assert all(e0[i] != e1[i] for i in range(16))
    assert e0 == e2
    assert 0 < sum(e0.values()) < 16


def test_reflect_translation_keeps_border_pixels_real():
    x = torch.full((8, 3, 6, 6), 200, dtype=torch.uint8)
    aug = Augmentation(translate=2, padding="reflect")
    xb, _ = next(batches(x, torch.zeros(8, dtype=torch.int64), 8, augment=aug))
    assert torch.all(xb == 200 / 255)  # zero padding would shift in black pixels


def test_benign_changes_replace_the_given_share_of_a_batch():
    """share 0 keeps a batch, share 1 changes every image (labels kept, values in [0, 1]),
    a share in between about that share; the same seed draws the same changes."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 12, 12, generator=g) * 0.6 + 0.2  # no clipping at either end
    assert torch.equal(with_benign_changes(x, 0.0, torch.Generator().manual_seed(1)), x)
    every = with_benign_changes(x, 1.0, torch.Generator().manual_seed(1))
    changed = (every != x).flatten(1).any(1)
    assert changed.float().mean() > 0.95  # a JPEG round trip may leave an image as it was
    assert every.min() >= 0 and every.max() <= 1
    half = with_benign_changes(x, 0.5, torch.Generator().manual_seed(2))
    assert 0.35 < (half != x).flatten(1).any(1).float().mean() < 0.6
    assert torch.equal(half, with_benign_changes(x, 0.5, torch.Generator().manual_seed(2)))


def test_benign_augmentation_without_crops_or_flips():
    """An Augmentation of benign changes alone never translates or flips (digits: a mirrored
    digit is another symbol), and a share outside [0, 1] is refused."""
    x = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 255).to(
        torch.uint8)
    y = torch.arange(64)
    plain = next(batches(x, y, 64))[0]
    aug = Augmentation(translate=0, flip=False, benign=0.0)
    assert not aug.crops_or_flips
    assert torch.equal(next(batches(x, y, 64, augment=aug, seed=5))[0], plain)
    with pytest.raises(ValueError, match=r"1\.5"):
        Augmentation(benign=1.5)


def test_airbench_parameter_groups_and_whiten_schedule():
    model = create_model("airbench", widths=[8, 16, 16])
    groups = parameter_groups(model, 1e-3)
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in groups[1]["params"]} == bn_biases
    assert groups[1]["lr_mult"] == BN_BIAS_LR_MULT
    assert groups[1]["weight_decay"] == pytest.approx(1e-3 / BN_BIAS_LR_MULT)
    exclude = list(model.head.parameters())
    assert all(id(p) not in {id(q) for q in exclude}
               for g in parameter_groups(model, 1e-3, exclude) for p in g["params"])
    hook = whiten_bias_schedule(model, 2)
    hook(1)
    assert model.whiten.bias.requires_grad
    hook(2)
    assert not model.whiten.bias.requires_grad
    small = create_model("small_cnn", in_channels=1, width=4)
    assert len(parameter_groups(small, 1e-3)) == 1
    assert whiten_bias_schedule(small, 2) is None


@pytest.mark.parametrize("recipe", [ONE_CYCLE, AIRBENCH], ids=["one_cycle", "airbench"])
def test_short_airbench_run_learns(recipe):
    """A few epochs on a learnable toy problem (class = dominant colour) lower the loss."""
    torch.manual_seed(0)
    y = torch.randint(0, 3, (384,))
    x = torch.randint(0, 90, (384, 3, 16, 16), dtype=torch.uint8)
    x[torch.arange(384), y] += 120
    model = create_model("airbench", num_classes=3, widths=[8, 16, 16])
    before = evaluate(model, x, y)["loss"]

    def step(net, xb, yb):
        return {"total": F.cross_entropy(net(xb), yb, label_smoothing=recipe.label_smoothing)}

    lr = 0.2 if recipe is AIRBENCH else 0.05
    history = fit(model, x, y, step, parameter_groups(model, 5e-4), epochs=4, batch_size=64,
                  lr=lr, augment=True, recipe=recipe,
                  before_epoch=whiten_bias_schedule(model, 2))
    after = evaluate(model, x, y)
    assert history[-1]["total"] < history[0]["total"]
    assert after["loss"] < before
    assert after["accuracy"] > 0.9
    assert next(model.parameters()).is_contiguous()  # channels_last undone after training
