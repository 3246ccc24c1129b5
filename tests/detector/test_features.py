"""Path features (PathProfile, prediction_stats) on a small hand-built path: 2 layers, 3 classes.

The features are torch; the expected values are computed by hand (loops over Python floats).
"""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from detector.features import (
    GLOBAL_STATS,
    LAYER_STATS,
    LayerProfile,
    PathBatch,
    PathProfile,
    prediction_stats,
)

# Layer "a" has 3 filters, layer "b" 2; K = 3 classes.
FREQ_A = np.array([[0.9, 0.2, 0.6], [0.1, 0.8, 0.3], [0.5, 0.5, 0.7]])
FREQ_B = np.array([[0.7, 0.4], [0.2, 0.9], [0.6, 0.1]])
MEAN_A = np.array([[1.0, -1.0, 0.5], [-1.0, 1.0, -0.5], [0.0, 0.0, 2.0]])
MEAN_B = np.array([[0.5, -0.5], [-2.0, 1.0], [1.0, -1.0]])
VAR_A = np.array([[1.0, 2.0, 0.5], [0.25, 1.0, 1.0], [4.0, 1.0, 2.0]])
VAR_B = np.array([[1.0, 0.5], [2.0, 1.0], [1.0, 3.0]])


@pytest.fixture
def profile():
    return PathProfile({
        "a": LayerProfile(FREQ_A, MEAN_A, VAR_A, anomaly_mean=0.5, anomaly_std=2.0),
        "b": LayerProfile(FREQ_B, MEAN_B, VAR_B, anomaly_mean=1.0, anomaly_std=0.5),
    })


@pytest.fixture
def paths():
    """Four inputs; predicted classes 0, 1, 2, 0."""
    return PathBatch(
        logits=torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, -1.0], [0.5, 0.0, 1.5], [1.0, 0.9, 0.0]]),
        bits={"a": torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 1, 0]]),
              "b": torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 1]])},
        gate_logits={"a": torch.tensor([[1.2, -0.8, 0.4], [-1.5, 0.7, -0.2], [0.3, 0.1, 2.5],
                                        [-0.9, 1.1, -0.6]]),
                     "b": torch.tensor([[0.6, -0.3], [-1.8, 1.4], [0.9, -1.2], [0.2, 0.1]])},
    )


def hand_nll(bits, freq):
    """Mean Bernoulli NLL over filters, written as a loop."""
    terms = [math.log(f) if b else math.log(1 - f) for b, f in zip(bits, freq, strict=True)]
    return -sum(terms) / len(bits)


def hand_dist(g, mean, var):
    return sum((gi - m) ** 2 / v for gi, m, v in zip(g, mean, var, strict=True)) / len(g)


def test_layer_stats_shapes(profile, paths):
    stats = profile.layer_stats(paths, np.array([0, 1, 2, 0]))
    assert set(stats) == set(LAYER_STATS)
    for value in stats.values():
        assert value.shape == (4, 2)
        assert value.dtype == torch.float64 and torch.isfinite(value).all()


@pytest.mark.parametrize("classes", [[0, 1, 2, 0], [2, 2, 1, 1]])
def test_bit_nll_and_logit_dist_match_hand_computation(profile, paths, classes):
    stats = profile.layer_stats(paths, np.array(classes))
    layers = {"a": (FREQ_A, MEAN_A, VAR_A), "b": (FREQ_B, MEAN_B, VAR_B)}
    for j, (name, (freq, mean, var)) in enumerate(layers.items()):
        bits, g = paths.bits[name].tolist(), paths.gate_logits[name].double().numpy()
        for i, k in enumerate(classes):
            assert stats["bit_nll"][i, j] == pytest.approx(hand_nll(bits[i], freq[k]))
            assert stats["logit_dist"][i, j] == pytest.approx(hand_dist(g[i], mean[k], var[k]))
            nll_all = [hand_nll(bits[i], freq[c]) for c in range(3)]
            dist_all = [hand_dist(g[i], mean[c], var[c]) for c in range(3)]
            assert stats["bit_excess"][i, j] == pytest.approx(nll_all[k] - min(nll_all))
            assert stats["logit_excess"][i, j] == pytest.approx(dist_all[k] - min(dist_all))
            assert stats["margin"][i, j] == pytest.approx(np.abs(g[i]).mean())
            assert stats["open"][i, j] == pytest.approx(sum(bits[i]) / len(bits[i]))


def test_first_input_bit_nll_by_hand(profile, paths):
    # input 0, class 0, layer a: bits (1, 0, 1) under freq (0.9, 0.2, 0.6)
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6)) / 3
    assert profile.layer_stats(paths, np.array([0, 0, 0, 0]))["bit_nll"][0, 0] == pytest.approx(
        expected)


def test_excess_is_nonnegative_and_zero_for_the_best_class(profile, paths):
    any_class = profile.layer_stats(paths, np.array([1, 0, 0, 2]))
    assert (any_class["bit_excess"] >= 0).all() and (any_class["logit_excess"] >= 0).all()
    for j, name in enumerate(("a", "b")):
        freq = {"a": FREQ_A, "b": FREQ_B}[name]
        best = np.array([np.argmin([hand_nll(b, freq[c]) for c in range(3)])
                         for b in paths.bits[name].tolist()])
        stats = profile.layer_stats(paths, best)
        np.testing.assert_allclose(stats["bit_excess"][:, j], 0.0, atol=1e-12)
    # input 0 (bits a = 1,0,1) is explained best by class 0, worse by class 1
    worse = profile.layer_stats(paths, np.array([1, 1, 1, 1]))["bit_excess"][0, 0]
    assert worse > 0.5


def test_hamming_counts_filters_off_the_typical_path(profile, paths):
    # typical paths (freq > 0.5): a: class0 (1,0,1), class1 (0,1,0), class2 (0,0,1)
    #                             b: class0 (1,0),   class1 (0,1),   class2 (1,0)
    stats = profile.layer_stats(paths, np.array([0, 1, 2, 0]))
    np.testing.assert_allclose(stats["hamming"][:, 0], [0.0, 0.0, 2 / 3, 1.0])
    np.testing.assert_allclose(stats["hamming"][:, 1], [0.0, 0.0, 0.0, 0.5])


def test_anomaly_standardises_logit_dist(profile, paths):
    stats = profile.layer_stats(paths, np.array([0, 1, 2, 0]))
    z = profile.anomaly(stats)
    np.testing.assert_allclose(z[:, 0], (stats["logit_dist"][:, 0] - 0.5) / 2.0)
    np.testing.assert_allclose(z[:, 1], (stats["logit_dist"][:, 1] - 1.0) / 0.5)


@pytest.mark.parametrize("raw", [False, True])
def test_transform_matches_feature_names(profile, paths, raw):
    prof = PathProfile(profile.layers, include_raw=raw)
    features = prof.transform(paths)
    names = prof.feature_names()
    n_stats = len(LAYER_STATS) * 2 + len(GLOBAL_STATS)
    assert features.dtype == torch.float32
    assert features.shape == (4, len(names))
    assert len(names) == n_stats + (2 * (3 + 2) if raw else 0)
    assert len(set(names)) == len(names)
    # columns are what their names say, against the predicted class (logits argmax: 0, 1, 2, 0)
    stats = prof.layer_stats(paths, np.array([0, 1, 2, 0]))
    col = {n: features[:, i] for i, n in enumerate(names)}
    np.testing.assert_allclose(col["bit_nll[a]"], stats["bit_nll"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(col["logit_dist[b]"], stats["logit_dist"][:, 1], rtol=1e-6)
    np.testing.assert_allclose(col["confidence"], prediction_stats(paths.logits)[:, 0],
                               rtol=1e-6)
    if raw:
        np.testing.assert_array_equal(col["bit[a][2]"], paths.bits["a"][:, 2])
        np.testing.assert_array_equal(col["gate_logit[b][1]"], paths.gate_logits["b"][:, 1])
    else:
        assert not any(n.startswith(("bit[", "gate_logit[")) for n in names)


def test_fit_learns_smoothed_frequencies_and_class_means(paths):
    labels = np.array([0, 1, 1, 0])
    prof = PathProfile.fit(paths, labels, num_classes=3, smoothing=1.0)
    a = prof.layers["a"]
    # class 0 = inputs 0 and 3: bits a (1,0,1), (0,1,0) -> (1+1)/(2+2) each
    np.testing.assert_allclose(a.freq[0], [0.5, 0.5, 0.5])
    # class 1 = inputs 1 and 2: bits (0,1,0), (1,1,1) -> (1, 2, 1) + 1 over 4
    np.testing.assert_allclose(a.freq[1], [0.5, 0.75, 0.5])
    np.testing.assert_allclose(a.mean[1], paths.gate_logits["a"][[1, 2]].mean(0), rtol=1e-6)
    # class 2 has no examples: falls back to all-class statistics
    np.testing.assert_allclose(a.freq[2], (paths.bits["a"].sum(0) + 1) / 6)
    np.testing.assert_allclose(a.mean[2], paths.gate_logits["a"].mean(0), rtol=1e-6)
    assert (a.var > 0).all() and ((a.freq > 0) & (a.freq < 1)).all()
    # the anomaly scale is logit_dist's mean and std on the fitting paths
    dist = prof.layer_stats(paths, labels)["logit_dist"]
    for j, lp in enumerate(prof.layers.values()):
        assert lp.anomaly_mean == pytest.approx(dist[:, j].mean())
        assert lp.anomaly_std == pytest.approx(float(dist[:, j].std(unbiased=False)) + 1e-6)


def test_fitted_anomaly_is_a_z_score_on_clean_paths():
    rng = np.random.default_rng(0)
    n = 300
    labels = rng.integers(0, 3, n)
    g = rng.normal(labels[:, None], 1.0, size=(n, 4))
    paths = PathBatch(logits=np.eye(3)[labels], bits={"x": (g > 1).astype(np.float32)},
                      gate_logits={"x": g.astype(np.float32)})
    prof = PathProfile.fit(paths, labels, num_classes=3)
    z = prof.anomaly(prof.layer_stats(paths, labels))
    assert z.shape == (n, 1)
    assert z.mean() == pytest.approx(0.0, abs=1e-6)
    assert z.std(unbiased=False) == pytest.approx(1.0, abs=1e-3)
    # a path far from its class's typical gate logits is anomalous
    far = PathBatch(logits=np.eye(3)[[0]], bits={"x": np.ones((1, 4), np.float32)},
                    gate_logits={"x": np.full((1, 4), 6.0, np.float32)})
    assert prof.anomaly(prof.layer_stats(far, np.array([0])))[0, 0] > 10


def test_fit_rejects_label_path_length_mismatch(paths):
    with pytest.raises(ValueError, match="3 labels for 4 paths"):
        PathProfile.fit(paths, np.array([0, 1, 2]), num_classes=3)


def test_to_arrays_from_arrays_round_trip(profile, paths, tmp_path):
    save_file(profile.to_arrays(), str(tmp_path / "profile.safetensors"))
    back = PathProfile.from_arrays(["a", "b"], load_file(str(tmp_path / "profile.safetensors")),
                                   include_raw=True)
    assert back.layer_names == ["a", "b"] and back.include_raw
    for name in ("a", "b"):
        orig, new = profile.layers[name], back.layers[name]
        for field in ("freq", "mean", "var"):
            np.testing.assert_array_equal(getattr(new, field), getattr(orig, field))
        assert (new.anomaly_mean, new.anomaly_std) == (orig.anomaly_mean, orig.anomaly_std)
    np.testing.assert_array_equal(back.transform(paths)[:, :len(profile.feature_names())],
                                  profile.transform(paths))


def test_from_arrays_with_too_many_layer_names_raises(profile):
    with pytest.raises(KeyError):
        PathProfile.from_arrays(["a", "b", "c"], profile.to_arrays(), include_raw=False)


def test_prediction_stats_known_values():
    logits = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1000.0, 0.0, -5.0]])
    stats = prediction_stats(logits)
    assert stats.shape == (3, 3)
    p = np.exp(2) / (np.exp(2) + 2)
    q = 1 / (np.exp(2) + 2)
    np.testing.assert_allclose(stats[0], [1 / 3, 0.0, math.log(3)])
    np.testing.assert_allclose(stats[1], [p, 2.0, -(p * math.log(p) + 2 * q * math.log(q))])
    np.testing.assert_allclose(stats[2], [1.0, 1000.0, 0.0], atol=1e-9)  # no overflow


def test_concat_and_len(paths):
    both = PathBatch.concat([paths, paths])
    assert len(both) == 8
    np.testing.assert_array_equal(both.bits["b"][4:], paths.bits["b"])
    np.testing.assert_array_equal(both.gate_logits["a"][:4], paths.gate_logits["a"])


def test_flat_puts_layers_side_by_side_in_the_order_asked(paths):
    bits, logits = paths.flat(["b", "a"])
    assert bits.dtype == logits.dtype == torch.float64 and bits.shape == (4, 5)
    np.testing.assert_array_equal(bits[:, :2], paths.bits["b"])
    np.testing.assert_array_equal(logits[:, 2:], paths.gate_logits["a"].double())
    assert paths.flat(["b", "a"])[0] is bits  # computed once
    assert not torch.equal(paths.flat(["a", "b"])[0], bits)


def test_a_slice_takes_views_that_score_like_a_copy(profile, paths):
    layers = list(profile.layers)
    whole = paths.flat(layers)[0]
    part = paths.take(slice(1, 3))
    assert len(part) == 2
    mine = part.flat(layers)[0]  # the parent's, sliced: not computed again
    assert mine.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    np.testing.assert_array_equal(mine, whole[1:3])
    copy = paths.take(torch.tensor([1, 2]))
    for name, value in profile.layer_stats(part, [1, 2]).items():
        np.testing.assert_array_equal(value, profile.layer_stats(copy, [1, 2])[name])
    np.testing.assert_array_equal(profile.transform(part), profile.transform(copy))


def test_fitted_profile_survives_storage_exactly(paths):
    """A profile fitted on float32 paths scores exactly like its stored and reloaded copy."""
    prof = PathProfile.fit(paths, np.array([0, 1, 2, 0]), num_classes=3)
    assert all(getattr(lp, f).dtype == torch.float64 for lp in prof.layers.values()
               for f in ("freq", "mean", "var"))
    back = PathProfile.from_arrays(prof.layer_names, prof.to_arrays(), include_raw=False)
    np.testing.assert_array_equal(back.transform(paths), prof.transform(paths))
    np.testing.assert_array_equal(
        back.layer_stats(paths, np.array([2, 2, 0, 1]))["logit_dist"],
        prof.layer_stats(paths, np.array([2, 2, 0, 1]))["logit_dist"])
