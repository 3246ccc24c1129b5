"""Benign changes of clean images (evaluation.shifts): shapes, ranges, what each change does,
and the benign negatives for fitting."""

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from detector.checkpoint import load_checkpoint
from evaluation.sets import Sets, extract_paths, predict
from evaluation.shifts import (
    JPEG_QUALITIES,
    add_benign_negatives,
    add_noise_negatives,
    benign_shifts,
    brightness,
    contrast,
    jpeg,
    random_benign_changes,
    rotate,
    translate,
)
from training.data import load_dataset, to_float


@pytest.mark.parametrize("channels", [1, 3])
def test_every_change_keeps_shape_and_range(channels):
    x = torch.rand(4, channels, 8, 8)
    shifts = benign_shifts(x, seed=0)
    assert len(shifts) == 15
    assert sum(k.startswith("gaussian noise") for k in shifts) == 3
    assert [k for k in shifts if k.startswith("JPEG")] == [f"JPEG quality {q}"
                                                           for q in JPEG_QUALITIES]
    for label, v in shifts.items():
        assert v.shape == x.shape and v.dtype == torch.float32, label
        assert v.min() >= 0 and v.max() <= 1, label
        assert not torch.equal(v, x), label
    again = benign_shifts(x, seed=0)
    assert all(torch.equal(again[k], v) for k, v in shifts.items())  # seeded


def test_one_pixel_shift_really_shifts():
    x = torch.rand(2, 3, 6, 6)
    moved = translate(x, 1, 1)
    torch.testing.assert_close(moved[..., 1:, 1:], x[..., :-1, :-1], rtol=0, atol=0)
    torch.testing.assert_close(moved[..., 0, 1:], x[..., 0, :-1], rtol=0, atol=0)  # edge kept
    back = translate(x, -2, 1)
    torch.testing.assert_close(back[..., 1:, :-2], x[..., :-1, 2:], rtol=0, atol=0)
    torch.testing.assert_close(translate(x, 0, 0), x, rtol=0, atol=0)


def test_jpeg_changes_pixels_less_at_higher_quality():
    x = to_float(load_dataset("digits").x_test[:8])
    error = [(jpeg(x, q) - x).abs().mean().item() for q in (30, 90)]
    assert error[0] > error[1] > 0
    assert jpeg(x, [30] * 8).shape == x.shape


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_and_rotation_are_torchvisions(channels):
    x = torch.rand(3, channels, 8, 8)
    for f in (0.8, 1.2):
        torch.testing.assert_close(contrast(x, f), TF.adjust_contrast(x, f))
    torch.testing.assert_close(contrast(x, 1.0), x)
    torch.testing.assert_close(rotate(x, 90.0), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    reference = TF.rotate(x, 90.0, interpolation=InterpolationMode.BILINEAR)
    torch.testing.assert_close(rotate(x, 90.0), reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotate(x, 0.0), x, atol=1e-6, rtol=0)


def test_brightness_adds_and_clips():
    x = torch.tensor([0.0, 0.5, 0.95]).view(1, 1, 1, 3)
    assert brightness(x, 0.1).flatten().tolist() == pytest.approx([0.1, 0.6, 1.0])
    per_image = brightness(torch.zeros(2, 1, 2, 2), torch.tensor([0.1, 0.2]))
    assert per_image[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.2])


def test_random_benign_changes_are_seeded_and_in_range():
    x = torch.rand(30, 3, 8, 8)
    a, b = random_benign_changes(x, seed=4), random_benign_changes(x, seed=4)
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1
    assert (a != x).flatten(1).any(1).float().mean() > 0.9  # nearly every image changed


def test_reach_widens_the_strengths_and_one_keeps_them():
    """reach 1 is the default; reach 2 draws noise and brightness up to twice as strong, so
    on a flat grey image the mean change of a pixel grows (same seed, same kinds drawn)."""
    x = torch.full((400, 1, 8, 8), 0.5)
    assert torch.equal(random_benign_changes(x, seed=3, reach=1.0),
                       random_benign_changes(x, seed=3))
    change = [(random_benign_changes(x, seed=3, reach=r) - x).abs().mean((1, 2, 3))
              for r in (1.0, 2.0)]
    assert change[0].max() <= 0.12 + 1e-6 < change[1].max()
    assert (change[1] >= change[0] - 1e-6).float().mean() > 0.95


@pytest.mark.parametrize("reach", [0.0, -1.0, 3.5, float("nan")])
def test_bad_reach_is_refused(reach):
    with pytest.raises(ValueError, match="reach must be in"):
        random_benign_changes(torch.rand(2, 1, 4, 4), seed=0, reach=reach)


@pytest.fixture(scope="module")
def fit_sets(tiny_decoupled_checkpoint):
    model, _ = load_checkpoint(tiny_decoupled_checkpoint)
    data = load_dataset("digits")
    x, y = to_float(data.x_test[:40]), data.y_test[:40]
    keep = predict(model, x) == y
    return model, x[keep], y[keep]


def test_benign_negatives_keep_images_still_right_and_add_to_noise(fit_sets):
    model, x, y = fit_sets
    sets = Sets(x, y, extract_paths(model, x))
    add_benign_negatives(model, sets, seed=1)
    benign = sets.benign
    assert benign is not None and benign.attempts == len(y)
    assert 0 < len(benign.y) <= len(y) and len(benign.paths.logits) == len(benign.y)
    assert (predict(model, benign.x) == benign.y).all()
    np.testing.assert_array_equal(benign.y.numpy(), y[benign.image].numpy())
    n = len(benign.y)
    add_noise_negatives(model, sets, seed=2)  # both: the noise copies go after
    assert len(sets.benign.y) == n + len(y) and sets.benign.attempts == 2 * len(y)
    assert len(sets.benign.paths.logits) == len(sets.benign.y) == len(sets.benign.image)


def test_benign_negatives_in_copies(fit_sets):
    """copies=3: three changed copies of every image (those still classified right), each
    labelled with its source image."""
    model, x, y = fit_sets
    one, three = Sets(x, y, extract_paths(model, x)), Sets(x, y, extract_paths(model, x))
    add_benign_negatives(model, one, seed=1)
    add_benign_negatives(model, three, seed=1, copies=3)
    assert three.benign.attempts == 3 * len(y) and len(three.benign.y) > len(one.benign.y)
    np.testing.assert_array_equal(three.benign.y.numpy(), y[three.benign.image].numpy())
    assert np.bincount(three.benign.image, minlength=len(y)).max() == 3
    assert (predict(model, three.benign.x) == three.benign.y).all()
    copies = three.benign.x.view(len(three.benign.y), -1)
    assert len(torch.unique(copies, dim=0)) == len(copies)  # no two copies alike
    with pytest.raises(ValueError, match="copies must be >= 1, got 0"):
        add_benign_negatives(model, three, seed=1, copies=0)
