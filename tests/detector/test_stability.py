"""Path stability: the transforms, companion paths and the stability features (by hand); a
bundle that carries them end to end is tests/training/test_fit_detector.py's."""

import numpy as np
import pytest
import torch

from detector.features import LayerProfile, PathBatch, PathProfile
from detector.stability import (
    TRANSFORMS,
    check_transforms,
    default_transforms,
    transformed,
    with_companions,
)


def test_transforms_keep_shape_and_range():
    x = torch.rand(2, 3, 8, 8)
    for name in TRANSFORMS:
        y = transformed(name, x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        assert not torch.equal(y, x)


def test_shift_moves_one_pixel_right_and_down():
    x = torch.arange(16.0).view(1, 1, 4, 4) / 16
    y = transformed("shift", x)
    torch.testing.assert_close(y[0, 0, 1:, 1:], x[0, 0, :-1, :-1])
    torch.testing.assert_close(y[0, 0, 0, 1:], x[0, 0, 0, :-1])  # top edge repeated


def test_blur_keeps_constant_images_and_bits5_rounds_straight_through():
    flat = torch.full((1, 1, 5, 5), 0.3)
    torch.testing.assert_close(transformed("blur", flat), flat)
    x = torch.tensor([0.0, 0.02, 0.49, 1.0]).view(1, 1, 2, 2).requires_grad_()
    y = transformed("bits5", x)
    np.testing.assert_allclose(y.detach().flatten(), [0, 1 / 31, 15 / 31, 1], atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_mirror_flips_left_to_right_and_is_its_own_inverse():
    x = torch.rand(2, 3, 4, 5)
    y = transformed("mirror", x)
    torch.testing.assert_close(y[..., 0], x[..., -1])
    torch.testing.assert_close(transformed("mirror", y), x)


def test_mirror_shift_is_the_mirror_moved_one_pixel_right_and_down():
    x = torch.rand(2, 3, 4, 5)
    y = transformed("mirror_shift", x)
    torch.testing.assert_close(y[..., 1:, 1:], x.flip(-1)[..., :-1, :-1])
    torch.testing.assert_close(y, transformed("shift", transformed("mirror", x)))


def test_greyscale_puts_the_luminance_in_every_channel_and_refuses_grey_images():
    x = torch.rand(2, 3, 4, 5, requires_grad=True)
    y = transformed("greyscale", x)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(y[:, c], luma)
    y.sum().backward()  # differentiable: each channel's weight, three times
    torch.testing.assert_close(x.grad[:, 1], torch.full((2, 4, 5), 3 * 0.587))
    with pytest.raises(ValueError, match="greyscale transform needs colour images"):
        transformed("greyscale", torch.rand(1, 1, 4, 4))


def test_default_transforms_mirror_and_greyscale_only_where_asked():
    assert default_transforms(False, False) == ("shift", "blur", "bits5")
    assert default_transforms(True, False) == ("shift", "blur", "bits5", "mirror",
                                               "mirror_shift")
    assert default_transforms(False, True) == ("shift", "blur", "bits5", "greyscale")
    assert set(default_transforms(True, True)) <= set(TRANSFORMS)


def test_unknown_or_repeated_transforms_are_named():
    with pytest.raises(ValueError, match="'rotate'"):
        check_transforms(["shift", "rotate"])
    with pytest.raises(ValueError, match="given twice"):
        check_transforms(["shift", "shift"])
    with pytest.raises(ValueError, match="'rotate'"):
        transformed("rotate", torch.rand(1, 1, 4, 4))


def _paths(logits, a, b):
    return PathBatch(torch.tensor(logits), {"a": torch.tensor(a), "b": torch.tensor(b)},
                     {"a": torch.zeros(len(a), len(a[0])), "b": torch.zeros(len(b), len(b[0]))})


def test_stability_features_by_hand():
    profile = PathProfile({
        "a": LayerProfile(np.full((2, 2), 0.5), np.zeros((2, 2)), np.ones((2, 2)), 0.0, 1.0),
        "b": LayerProfile(np.full((2, 4), 0.5), np.zeros((2, 4)), np.ones((2, 4)), 0.0, 1.0),
    }, stability=("shift",))
    own = _paths([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0], [1, 1]], [[1.0, 1, 0, 0], [0, 0, 0, 0]])
    moved = _paths([[0.0, 2.0], [0.0, 1.0]], [[1.0, 1], [1, 1]], [[0.0, 1, 1, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="no companions"):
        profile.stability_stats(own)
    stats = profile.stability_stats(own.with_companions({"shift": moved}))
    p = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0)
    q = torch.softmax(torch.tensor([0.0, 2.0], dtype=torch.float64), 0)
    expected = [[float((p - q).abs().sum()), 1.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    np.testing.assert_allclose(stats.numpy(), expected, atol=1e-12)
    names = profile.feature_names()
    assert names[-4:] == ["stab_prob_l1[shift]", "stab_pred_change[shift]",
                          "stab_flips[shift][a]", "stab_flips[shift][b]"]
    features = profile.transform(own.with_companions({"shift": moved}))
    assert features.shape == (2, len(names))
    # companions follow take / concat
    both = PathBatch.concat([own.with_companions({"shift": moved})] * 2).take([1, 2])
    assert len(both.companions["shift"]) == 2


def test_with_companions_stacks_the_transforms_into_one_pass(tiny_decoupled_checkpoint):
    from detector.checkpoint import load_checkpoint
    from detector.paths import compute_path

    model, _ = load_checkpoint(tiny_decoupled_checkpoint)
    x = torch.rand(3, 1, 8, 8)
    calls = []
    hook = model.register_forward_pre_hook(lambda _, args: calls.append(args[0].shape[0]))
    with torch.inference_mode():
        paths = with_companions(model, x, PathBatch.from_result(compute_path(model, x)),
                                ["shift", "bits5"])
    hook.remove()
    assert calls == [1 * 3, 2 * 3]  # the images' own pass, then both copies in one
    assert set(paths.companions) == {"shift", "bits5"}
    with torch.inference_mode():  # each companion is its own copy's path, row for row
        for name in ("shift", "bits5"):
            alone = PathBatch.from_result(compute_path(model, transformed(name, x)))
            torch.testing.assert_close(paths.companions[name].logits, alone.logits)
            torch.testing.assert_close(paths.companions[name].gate_logits,
                                       alone.gate_logits)
