"""Data loading (digits, .npz), augmentation and batching."""

import numpy as np
import pytest
import torch

from training.data import (
    augment_crop_flip,
    batches,
    load_dataset,
    load_digits,
    load_npz,
    to_float,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_shapes_and_types(digits):
    assert digits.name == "digits"
    assert digits.x_train.shape == (1347, 1, 8, 8)
    assert digits.x_test.shape == (450, 1, 8, 8)
    assert digits.x_train.dtype == torch.uint8 and digits.x_test.dtype == torch.uint8
    assert digits.y_train.shape == (1347,) and digits.y_train.dtype == torch.int64
    assert digits.input_shape == (1, 8, 8)
    assert digits.classes == tuple(str(i) for i in range(10))
    assert int(digits.x_train.max()) == 255  # 0..16 scaled to 0..255
    assert int(digits.x_train.min()) == 0


def test_digits_split_is_stratified_and_fixed(digits):
    train = torch.bincount(digits.y_train, minlength=10)
    test = torch.bincount(digits.y_test, minlength=10)
    share = test.float() / (train + test).float()
    assert torch.all((share - 0.25).abs() < 0.01)
    again = load_digits()
    assert torch.equal(again.x_test, digits.x_test) and torch.equal(again.y_test, digits.y_test)


def test_load_dataset_digits():
    assert load_dataset("digits").x_train.shape == (1347, 1, 8, 8)


def write_npz(path, x_train, x_test, classes=None):
    rng = np.random.default_rng(0)
    arrays = {"x_train": x_train, "y_train": rng.integers(0, 3, len(x_train)),
              "x_test": x_test, "y_test": np.arange(len(x_test)) % 3}
    if classes is not None:
        arrays["classes"] = np.array(classes)
    np.savez(path, **arrays)
    return arrays


def test_npz_grey_nhw(tmp_path):
    rng = np.random.default_rng(1)
    arrays = write_npz(tmp_path / "grey.npz",
                       rng.integers(0, 256, (6, 5, 7), dtype=np.uint8),
                       rng.integers(0, 256, (9, 5, 7), dtype=np.uint8))
    data = load_dataset(str(tmp_path / "grey.npz"))
    assert data.name == "grey"
    assert data.x_train.shape == (6, 1, 5, 7) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (9, 1, 5, 7)
    assert data.input_shape == (1, 5, 7)
    assert np.array_equal(data.x_train[:, 0].numpy(), arrays["x_train"])
    assert torch.equal(data.y_train, torch.as_tensor(arrays["y_train"]))
    assert data.classes == ("0", "1", "2")  # from the labels when no names are stored
    # the test split is shuffled, but each image keeps its label
    pairs = {(arrays["x_test"][i].tobytes(), int(arrays["y_test"][i])) for i in range(9)}
    got = {(data.x_test[i, 0].numpy().tobytes(), int(data.y_test[i])) for i in range(9)}
    assert got == pairs


def test_npz_colour_nhwc(tmp_path):
    rng = np.random.default_rng(2)
    arrays = write_npz(tmp_path / "colour.npz",
                       rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8),
                       rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8),
                       classes=["cat", "dog", "emu"])
    data = load_npz(tmp_path / "colour.npz")
    assert data.x_train.shape == (4, 3, 6, 5)
    assert data.input_shape == (3, 6, 5)
    assert data.x_train.is_contiguous()
    assert np.array_equal(data.x_train.permute(0, 2, 3, 1).numpy(), arrays["x_train"])
    assert int(data.x_train[1, 2, 4, 3]) == int(arrays["x_train"][1, 4, 3, 2])
    assert data.classes == ("cat", "dog", "emu")


def test_npz_missing_arrays_raise(tmp_path):
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="y_train"):
        load_npz(tmp_path / "bad.npz")


def test_npz_wrong_dtype_raises(tmp_path):
    write_npz(tmp_path / "f.npz", np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        load_npz(tmp_path / "f.npz")


def test_unknown_dataset_raises_naming_it():
    with pytest.raises(ValueError, match="'no-such-data'"):
        load_dataset("no-such-data")


def test_missing_npz_raises_naming_it(tmp_path):
    path = str(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match=r"absent\.npz"):
        load_dataset(path)


def test_augment_keeps_shape_and_values_from_input():
    x = torch.arange(1, 2 * 3 * 6 * 6 + 1, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}  # 0 = padding
    for i in range(2):  # each sample is cropped from itself, all channels alike
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}
        # the same crop and flip for every channel: channel c + 1 = channel c + 36 off padding
        live = out[i, 0] != 0
        assert torch.equal(out[i, 0] == 0, out[i, 2] == 0)
        assert torch.all(out[i, 1][live] - out[i, 0][live] == 36)
        assert torch.all(out[i, 2][live] - out[i, 1][live] == 36)


def test_augment_without_padding_is_identity_or_flip():
    x = torch.rand(16, 1, 5, 5)
    out = augment_crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    flipped = 0
    for i in range(16):
        if torch.equal(out[i], x[i]):
            continue
        assert torch.equal(out[i], x[i].flip(2))
        flipped += 1
    assert 0 < flipped < 16
    assert torch.equal(out, augment_crop_flip(x, torch.Generator().manual_seed(0), pad=0))


def test_to_float_range():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    torch.testing.assert_close(to_float(x), torch.tensor([0.0, 128 / 255, 1.0]))


@pytest.mark.parametrize("augment", [False, True])
def test_batches_yield_float_in_unit_interval(digits, augment):
    x, y = digits.x_test[:100], digits.y_test[:100]
    got = list(batches(x, y, 32, shuffle=True, augment=augment, seed=3))
    assert [len(yb) for _, yb in got] == [32, 32, 32, 4]
    for xb, yb in got:
        assert xb.dtype == torch.float32
        assert xb.shape[1:] == (1, 8, 8)
        assert xb.min() >= 0 and xb.max() <= 1
        assert yb.dtype == torch.int64
    labels = torch.cat([yb for _, yb in got])
    assert torch.equal(labels.sort().values, y.sort().values)  # every sample once


def test_batches_unshuffled_keep_order(digits):
    x, y = digits.x_test[:10], digits.y_test[:10]
    xb, yb = next(batches(x, y, 10))
    assert torch.equal(yb, y)
    torch.testing.assert_close(xb, x.float() / 255)
