"""Gate semantics: control module init, Improved SemHash, GatedConv masking, recording()."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector.control import ControlModule
from detector.gates import GatedConv
from detector.gating import decouple, gated_layers
from detector.models import create_model
from detector.recording import _RECORDER, recording
from detector.semhash import improved_semhash


def small_gated(eval_mode=True):
    model = decouple(create_model("small_cnn", in_channels=1, num_classes=10, width=8))
    return model.eval() if eval_mode else model.train()


def close_filter(layer, k):
    """Make gate k of a GatedConv closed for every input (its logit is very negative)."""
    with torch.no_grad():
        layer.control.fc2.bias[k] = -1e3


# --- control module --------------------------------------------------------------------------


def test_control_module_init_is_input_independent_and_open_biased():
    cm = ControlModule(16, 32)
    assert torch.count_nonzero(cm.fc1.weight) == 0
    assert torch.all(cm.fc1.bias == 1)
    assert torch.all(cm.fc2.bias == 1)
    assert cm.fc1.out_features == 4  # C_in / 4
    a, b = cm(torch.rand(3, 16, 5, 5)), cm(10 * torch.randn(2, 16, 7, 7))
    assert a.shape == (3, 32)
    # FC1 outputs relu(0 * s + 1) = 1 whatever the input: logits = 1 + row sums of FC2
    expected = 1 + cm.fc2.weight.sum(dim=1)
    torch.testing.assert_close(a, expected.expand(3, 32))
    torch.testing.assert_close(b, expected.expand(2, 32))


def test_control_module_init_opens_most_gates():
    torch.manual_seed(1)
    logits = torch.cat([ControlModule(64, 64)(torch.rand(1, 64, 2, 2)) for _ in range(20)], 1)
    # logits ~ N(1, 2) at init: a clear majority of gates starts open (about 76 %)
    assert logits.mean() > 0.5
    assert 0.6 < (logits > 0).float().mean() < 0.9


def test_control_module_initial_logit_opens_almost_every_gate():
    torch.manual_seed(1)
    logits = torch.cat([ControlModule(64, 64, initial_logit=4.0)(torch.rand(1, 64, 2, 2))
                        for _ in range(20)], 1)
    # logits ~ N(4, 2): all but a fraction of a percent start open
    assert (logits > 0).float().mean() > 0.98
    assert abs(logits.mean().item() - 4.0) < 0.5


def test_control_module_hidden_width_has_floor():
    assert ControlModule(8, 3).fc1.out_features == 4
    assert ControlModule(64, 3, reduction=8).fc1.out_features == 8


def test_control_module_reads_global_average_of_input():
    cm = ControlModule(4, 6)
    with torch.no_grad():
        cm.fc1.weight.normal_()
    x = torch.rand(2, 4, 6, 6)
    pooled = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    torch.testing.assert_close(cm(x), cm(pooled.contiguous()))


def test_control_module_input_norm_standardises_pooled_input():
    cm = ControlModule(4, 6, normalize_input=True)
    with torch.no_grad():
        cm.fc1.weight.normal_()
    x = torch.rand(8, 4, 5, 5) + 2 * torch.randn(8, 4, 1, 1)  # pooled values spread >> BN's eps
    # training: batch statistics, so a per-channel affine change of the input changes nothing
    scale = torch.tensor([2.0, 0.5, 3.0, 1.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(cm(x), cm(x * scale + 0.3), rtol=1e-3, atol=1e-3)
    plain = ControlModule(4, 6)
    plain.load_state_dict({k: v for k, v in cm.state_dict().items() if not k.startswith("norm")})
    assert not torch.allclose(plain(x), plain(x * scale + 0.3))
    # inference: running statistics gathered in training, one image at a time works
    cm.eval()
    s = x.mean(dim=(2, 3))
    expected = (s - cm.norm.running_mean) / torch.sqrt(cm.norm.running_var + cm.norm.eps)
    torch.testing.assert_close(cm(x[:1]), cm.fc2(F.relu(cm.fc1(expected[:1]))))


# --- improved SemHash ------------------------------------------------------------------------


def test_semhash_eval_is_hard_threshold_without_noise():
    logits = torch.tensor([[-2.0, -1e-4, 0.0, 1e-4, 3.0]])
    z = improved_semhash(logits, training=False)
    assert torch.equal(z, torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]]))
    assert torch.equal(z, improved_semhash(logits, training=False))


def test_semhash_training_values_in_unit_interval_and_mixed():
    logits = 3 * torch.randn(64, 256)
    z = improved_semhash(logits, training=True)
    assert z.min() >= 0 and z.max() <= 1
    binary = ((z == 0) | (z == 1)).float().mean()
    assert 0.5 <= binary < 1.0  # the hard half plus saturated soft values; some are soft
    assert not torch.equal(z, improved_semhash(logits, training=True))  # noisy


def test_semhash_straight_through_gradient_is_that_of_soft_value():
    logits = torch.zeros(1000, requires_grad=True)
    improved_semhash(logits, training=True).sum().backward()
    # d/dg clamp(1.2 sigmoid(g) - 0.1) <= 1.2 / 4, and > 0 for every unsaturated entry
    assert logits.grad.max() <= 0.3 + 1e-6
    assert (logits.grad > 0).float().mean() > 0.8


# --- GatedConv -------------------------------------------------------------------------------


def test_gates_are_hard_and_deterministic_in_eval():
    model = small_gated()
    x = torch.rand(5, 1, 8, 8)
    with recording() as r1:
        out1 = model(x)
    with recording() as r2:
        out2 = model(x)
    assert torch.equal(out1, out2)
    assert list(r1.records) == ["features.3", "features.7", "features.10"]
    for name, rec in r1.records.items():
        assert set(rec.gates.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(rec.gates, r2.records[name].gates)
        assert torch.equal(rec.gates, (rec.logits > 0).float())


def test_gates_in_training_are_in_unit_interval():
    model = small_gated(eval_mode=False)
    with recording() as rec:
        model(torch.rand(16, 1, 8, 8))
    gates = torch.cat([r.gates for r in rec.records.values()], 1)
    assert gates.min() >= 0 and gates.max() <= 1
    assert ((gates > 0) & (gates < 1)).any()


@pytest.mark.parametrize("train", [False, True])
def test_closed_filter_output_is_exactly_zero(train):
    model = small_gated(eval_mode=not train)
    layer = model.features[3]
    close_filter(layer, 2)
    with torch.no_grad():  # a BN that maps 0 to non-zero: the mask must come after it
        layer.bn.bias.fill_(0.5)
        layer.bn.running_mean.fill_(0.3)
    out = layer(torch.rand(4, 8, 8, 8))  # (B, C_out, H, W)
    assert out.shape == (4, 8, 8, 8)
    assert torch.count_nonzero(out[:, 2]) == 0
    assert torch.count_nonzero(out[:, [0, 1, 3]]) > 0


def test_closed_filter_contributes_nothing_downstream():
    model = small_gated()
    close_filter(model.features[3], 2)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        nxt = model.features[7].conv.weight  # (C_out, C_in, 3, 3); input channel 2 is closed
        nxt[:, 2] += 10 * torch.randn_like(nxt[:, 2])
        after_closed = model(x)
        nxt[:, 0] += 10 * torch.randn_like(nxt[:, 0])  # an open channel: this must matter
        after_open = model(x)
    assert torch.equal(before, after_closed)
    assert not torch.allclose(before, after_open)


def test_closed_input_channel_is_not_counted_active():
    model = small_gated()
    for k in range(4):
        close_filter(model.features[3], k)
    with recording() as rec:
        model(torch.rand(3, 1, 8, 8))
    assert torch.all(rec.records["features.7"].in_active <= 4)
    assert torch.all(rec.records["features.3"].in_active == 8)


def test_straight_through_gradient_reaches_control_module():
    model = small_gated(eval_mode=False)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    for name, layer in gated_layers(model).items():
        assert layer.control.fc1.weight.grad is not None, name
        assert layer.control.fc1.weight.grad.abs().sum() > 0, name  # fc1.weight starts at 0
        assert layer.control.fc2.weight.grad.abs().sum() > 0, name


def test_gated_conv_dense_macs():
    conv = nn.Conv2d(6, 4, (3, 1), groups=2, bias=False)
    layer = GatedConv("c", conv, nn.BatchNorm2d(4))
    assert layer.dense_macs((7, 7)) == 3 * 3 * 1 * 4 * 5 * 7  # output 5x7 from a 7x7 input


# --- recording() -----------------------------------------------------------------------------


def test_recording_leaves_no_state_behind():
    model = small_gated()
    x = torch.rand(2, 1, 8, 8)
    gated = model(x)
    assert _RECORDER.get() is None
    with recording(force_open=True) as rec:
        assert _RECORDER.get() is rec
        open_out = model(x)
    assert _RECORDER.get() is None
    assert torch.equal(model(x), gated)  # force_open no longer applies
    assert not torch.equal(open_out, gated)


def test_recording_resets_after_exception():
    with pytest.raises(RuntimeError), recording():
        raise RuntimeError("boom")
    assert _RECORDER.get() is None


def test_recording_nested_is_independent():
    model = small_gated()
    x = torch.rand(2, 1, 8, 8)
    with recording() as outer:
        with recording(force_open=True) as inner:
            model(x)
        assert _RECORDER.get() is outer
        assert outer.records == {}
        assert all(torch.all(r.gates == 1) for r in inner.records.values())
        model(x)
        assert list(outer.records) == list(inner.records)
    assert _RECORDER.get() is None


def test_recording_threads_are_independent():
    model = small_gated()
    x = torch.rand(2, 1, 8, 8)
    barrier = threading.Barrier(2)
    seen = {}

    def worker(key, force_open):
        with recording(force_open=force_open) as rec:
            barrier.wait()  # both threads are inside their own block at the same time
            model(x)
            barrier.wait()
            seen[key] = (rec, _RECORDER.get() is rec)

    threads = [threading.Thread(target=worker, args=(k, k == "open")) for k in ("open", "gated")]
    with recording() as main_rec:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert main_rec.records == {}
    assert seen["open"][1] and seen["gated"][1]
    assert all(torch.all(r.gates == 1) for r in seen["open"][0].records.values())
    gated_bits = torch.cat([r.gates for r in seen["gated"][0].records.values()], 1)
    assert not torch.all(gated_bits == 1)
    assert _RECORDER.get() is None
