"""Computation paths (compute_path) and dense multiply-accumulate counts (network_macs)."""

import pytest
import torch
from torch import nn

from detector.gating import decouple, gated_layers
from detector.models import create_model
from detector.paths import compute_path, network_macs


@pytest.fixture
def gated():
    return decouple(create_model("small_cnn", in_channels=1, num_classes=10, width=8)).eval()


def tiny_net():
    """Hand-countable: on a (1, 4, 4) input the dense MACs are 288 + 864 + 12 = 1164."""
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=False),  # 1*9*2 per pixel * 16 = 288
        nn.BatchNorm2d(2), nn.ReLU(),
        nn.Conv2d(2, 3, 3, padding=1),  # 2*9*3 per pixel * 16 = 864
        nn.BatchNorm2d(3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(3, 4),  # 12
    )


def test_compute_path_structure(gated):
    x = torch.rand(5, 1, 8, 8)
    path = compute_path(gated, x)
    assert path.logits.shape == (5, 10)
    assert list(path.layers) == ["features.3", "features.7", "features.10"]
    assert list(path.layers) == list(gated_layers(gated))
    widths = [8, 16, 16]
    for layer, c in zip(path.layers.values(), widths, strict=True):
        assert layer.bits.shape == (5, c)
        assert layer.logits.shape == (5, c)
        assert layer.pooled.shape == (5, c)
        assert set(layer.bits.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(layer.bits, (layer.logits > 0).float())
        assert layer.executed_macs.shape == (5,)
    assert path.bits().shape == (5, sum(widths))
    assert path.gate_logits().shape == (5, sum(widths))
    assert torch.equal(path.bits(), (path.gate_logits() > 0).float())
    torch.testing.assert_close(path.logits, gated(x))
    of = path.open_fraction()
    assert of.shape == (5,)
    torch.testing.assert_close(of, path.bits().mean(dim=1))


def test_batched_path_equals_per_sample(gated):
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        batch = compute_path(gated, x)
        for i in range(4):
            single = compute_path(gated, x[i:i + 1])
            torch.testing.assert_close(single.logits, batch.logits[i:i + 1], rtol=1e-5, atol=1e-5)
            assert torch.equal(single.bits(), batch.bits()[i:i + 1])
            for name, layer in single.layers.items():
                expected = batch.layers[name].executed_macs[i:i + 1]
                torch.testing.assert_close(layer.executed_macs, expected)


def test_force_open_path_is_all_ones(gated):
    path = compute_path(gated, torch.rand(2, 1, 8, 8), force_open=True)
    assert torch.all(path.bits() == 1)
    assert torch.all(path.open_fraction() == 1)


def test_flops_fraction_in_unit_interval(gated):
    total = network_macs(gated, (1, 8, 8))
    with torch.no_grad():
        frac = compute_path(gated, torch.rand(6, 1, 8, 8)).flops_fraction(total)
    assert frac.shape == (6,)
    assert torch.all(frac > 0) and torch.all(frac <= 1)


def test_flops_fraction_counts_closed_filters(gated):
    total = network_macs(gated, (1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        for layer in gated_layers(gated).values():
            layer.control.fc2.bias.fill_(1e3)  # all open
        dense = compute_path(gated, x)
        last = gated_layers(gated)["features.10"]
        last.control.fc2.bias[:8] = -1e3  # close half of the last layer's 16 filters
        half = compute_path(gated, x)
    assert torch.all(dense.open_fraction() == 1)
    control = {n: m.control.fc1.weight.numel() + m.control.fc2.weight.numel()
               for n, m in gated_layers(gated).items()}
    for name, layer in dense.layers.items():  # all open: dense work plus the control module
        assert layer.dense_macs == gated_layers(gated)[name].dense_macs(
            # input sizes
            {"features.3": (8, 8), "features.7": (4, 4), "features.10": (4, 4)}[name])
        assert torch.all(layer.executed_macs <= layer.dense_macs + control[name])
    first = dense.layers["features.3"]  # its input is the stem output: every channel live
    assert torch.all(first.executed_macs == first.dense_macs + control["features.3"])
    frac_dense, frac_half = dense.flops_fraction(total), half.flops_fraction(total)
    assert torch.all(frac_dense <= (total + sum(control.values())) / total + 1e-6)
    # closing half the filters of the last gated layer halves its conv work, nothing else
    saved = (dense.layers["features.10"].executed_macs - control["features.10"]) / 2
    torch.testing.assert_close(frac_half, frac_dense - saved / total)
    assert torch.all(frac_half < frac_dense)
    assert torch.all(half.layers["features.10"].open_fraction == 0.5)


def test_network_macs_hand_count():
    net = tiny_net()
    assert network_macs(net, (1, 4, 4)) == 1164
    # gates add control modules, which are not part of the dense network's count
    assert network_macs(decouple(net), (1, 4, 4)) == 1164


def test_network_macs_scales_with_input():
    net = tiny_net()
    assert network_macs(net, (1, 8, 8)) == 4 * (288 + 864) + 12


def test_network_macs_keeps_batchnorm_statistics_and_mode():
    for net in (tiny_net(), decouple(tiny_net())):
        net.train()
        bn_before = {k: v.clone() for k, v in net.state_dict().items()}
        network_macs(net, (1, 4, 4))
        assert net.training
        assert all(m.training for m in net.modules())
        after = net.state_dict()
        assert all(torch.equal(after[k], bn_before[k]) for k in bn_before)
