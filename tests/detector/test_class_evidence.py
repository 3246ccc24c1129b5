"""Class evidence features (per-layer class heads q(y | z^l) on the gate bits): hand-computed
values on a 2-layer, 3-class path, fitted heads, storage, feature groups and gradients."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from detector.features import (
    FEATURE_GROUPS,
    GLOBAL_STATS,
    HEAD_STATS,
    LAYER_STATS,
    LayerProfile,
    PathBatch,
    PathProfile,
    fit_class_heads,
)
from detector.straight_through import straight_through

FREQ_A = np.full((3, 3), 0.5)
FREQ_B = np.full((3, 2), 0.5)
HEAD_A = np.array([[2.0, -1.0, 0.5], [-1.0, 1.5, 0.0], [0.0, 0.5, 1.0]])
BIAS_A = np.array([0.1, -0.2, 0.0])
HEAD_B = np.array([[1.0, -2.0], [-0.5, 2.5], [0.5, 0.5]])


@pytest.fixture
def profile():
    return PathProfile({
        "a": LayerProfile(FREQ_A, np.zeros((3, 3)), np.ones((3, 3)), 0.0, 1.0, HEAD_A, BIAS_A),
        "b": LayerProfile(FREQ_B, np.zeros((3, 2)), np.ones((3, 2)), 0.0, 1.0, HEAD_B),
    })


@pytest.fixture
def paths():
    return PathBatch(
        logits=torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, -1.0], [0.5, 0.0, 1.5]]),
        bits={"a": torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1]]),
              "b": torch.tensor([[1.0, 0], [0, 1], [1, 1]])},
        gate_logits={"a": torch.zeros(3, 3), "b": torch.zeros(3, 2)})


def softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return [v / sum(e) for v in e]


def hand_q(weight, bias, bits):
    return softmax([sum(w * b for w, b in zip(row, bits, strict=True)) + c
                    for row, c in zip(weight, bias, strict=True)])


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


@pytest.mark.parametrize("classes", [[0, 1, 2], [2, 0, 0]])
def test_class_evidence_matches_hand_computation(profile, paths, classes):
    stats = profile.layer_stats(paths, np.array(classes))
    assert set(stats) == set(LAYER_STATS) | set(HEAD_STATS)
    for i, c in enumerate(classes):
        qa = hand_q(HEAD_A, BIAS_A, paths.bits["a"][i].tolist())
        qb = hand_q(HEAD_B, [0, 0, 0], paths.bits["b"][i].tolist())
        p = softmax(paths.logits[i].tolist())
        for j, q in enumerate((qa, qb)):
            assert stats["head_p"][i, j] == pytest.approx(q[c])
            assert stats["head_excess"][i, j] == pytest.approx(math.log(max(q)) - math.log(q[c]))
            assert stats["head_kl"][i, j] == pytest.approx(kl(p, q))
        assert stats["head_shift"][i, 0] == pytest.approx(kl(qa, [1 / 3] * 3))
        assert stats["head_shift"][i, 1] == pytest.approx(kl(qb, qa))
    # agreement with the class is head_excess == 0
    agree = stats["head_excess"] == 0
    assert agree.any() and (~agree).any()


def test_groups_select_columns_and_names(profile, paths):
    full = profile.transform(paths)
    names = profile.feature_names()
    assert profile.groups == tuple(g for g in FEATURE_GROUPS if g != "stability")
    assert full.shape == (3, len(names))
    assert len(names) == 2 * (len(LAYER_STATS) + len(HEAD_STATS)) + len(GLOBAL_STATS)
    col = dict(zip(names, full.T, strict=True))
    stats = profile.layer_stats(paths, paths.logits.argmax(1))
    np.testing.assert_allclose(col["head_kl[b]"], stats["head_kl"][:, 1], rtol=1e-6)
    for groups in (("class_evidence",), ("bits", "prediction"), ("gate_logits",)):
        sub = profile.with_features(groups)
        sub_names = sub.feature_names()
        assert sub.transform(paths).shape == (3, len(sub_names))
        np.testing.assert_array_equal(
            sub.transform(paths), full[:, [names.index(n) for n in sub_names]])
        kept = {n.split("[")[0] for n in sub_names}
        assert kept == {s for g in groups for s in FEATURE_GROUPS[g]}
    with pytest.raises(ValueError, match="not available"):
        profile.with_features(("bits", "nonsense"))


def test_without_heads_there_is_no_class_evidence(paths):
    plain = PathProfile({"a": LayerProfile(FREQ_A, np.zeros((3, 3)), np.ones((3, 3)), 0.0, 1.0),
                         "b": LayerProfile(FREQ_B, np.zeros((3, 2)), np.ones((3, 2)), 0.0, 1.0)})
    assert not plain.has_heads and "class_evidence" not in plain.groups
    assert set(plain.layer_stats(paths, np.array([0, 1, 2]))) == set(LAYER_STATS)
    with pytest.raises(ValueError, match="not available"):
        plain.with_features(("class_evidence",))


def test_head_shapes_are_checked():
    with pytest.raises(ValueError, match=r"class head of shape \(2, 3\)"):
        LayerProfile(FREQ_A, np.zeros((3, 3)), np.ones((3, 3)), 0.0, 1.0, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="bias of shape"):
        LayerProfile(FREQ_A, np.zeros((3, 3)), np.ones((3, 3)), 0.0, 1.0, HEAD_A, np.zeros(2))


def test_heads_survive_storage(profile, paths, tmp_path):
    save_file(profile.to_arrays(), str(tmp_path / "p.safetensors"))
    back = PathProfile.from_arrays(["a", "b"], load_file(str(tmp_path / "p.safetensors")), False)
    assert back.has_heads
    torch.testing.assert_close(back.transform(paths), profile.transform(paths))


def test_fitted_heads_read_the_class_from_the_bits():
    """Class c opens filter c (and noise elsewhere): fitted heads recover the class; the profile
    fitted with them carries them; a class missing from the labels gets probability ~0."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    bits = (rng.random((300, 5)) < 0.3).astype(np.float32)
    bits[np.arange(300), labels] = 1.0
    bits[np.arange(300), (labels + 1) % 3] = 0.0
    paths = PathBatch(logits=np.eye(4)[labels], bits={"x": bits},
                      gate_logits={"x": bits * 2 - 1})
    heads = fit_class_heads(paths, labels, num_classes=4)
    weight, bias = heads["x"]
    assert weight.shape == (4, 5) and bias.shape == (4,)
    q = torch.softmax(torch.as_tensor(bits, dtype=torch.float64) @ weight.T + bias, 1)
    assert (q.argmax(1).numpy() == labels).mean() > 0.95
    assert q[:, 3].max() < 1e-9
    prof = PathProfile.fit(paths, labels, num_classes=4, heads=heads)
    assert prof.has_heads
    torch.testing.assert_close(prof.layers["x"].head_weight, weight)


def test_class_evidence_is_differentiable_through_straight_through_bits(profile, paths):
    gate_logits = {k: torch.randn(3, v.shape[1], requires_grad=True)
                   for k, v in paths.bits.items()}
    ste = PathBatch(paths.logits, {k: straight_through(paths.bits[k], g, "sigmoid")
                                   for k, g in gate_logits.items()}, gate_logits)
    stats = profile.layer_stats(ste, np.array([0, 1, 2]))
    (stats["head_p"].sum() + stats["head_kl"].sum()).backward()
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gate_logits.values())


def test_missing_heads_and_bad_labels_are_named(paths):
    with pytest.raises(ValueError, match="no class head for gated layer 'b'"):
        PathProfile.fit(paths, np.array([0, 1, 2]), num_classes=3, heads={"a": HEAD_A})
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        fit_class_heads(paths, np.array([0, 1, 3]), num_classes=3)


def test_statistics_computed_in_chunks_equal_one_pass(profile, paths, monkeypatch):
    """Large batches are cut into chunks of bounded (rows, 2K, D) intermediates: 1 row here."""
    from detector import features

    whole = profile.layer_stats(paths, np.array([0, 1, 2]))
    monkeypatch.setattr(features, "_CHUNK_ELEMENTS", 1)
    chunked = profile.layer_stats(PathBatch(paths.logits, paths.bits, paths.gate_logits),
                                  np.array([0, 1, 2]))
    assert set(chunked) == set(LAYER_STATS) | set(HEAD_STATS)
    for name, value in whole.items():
        torch.testing.assert_close(chunked[name], value, rtol=0, atol=1e-12)
