"""detector.pruning: the open-ever mask and the statically pruned twin."""

from __future__ import annotations

import torch

from detector.checkpoint import ModelSpec
from detector.gating import gated_layers, strip_gates
from detector.pruning import open_ever, pruned_twin


def test_pruned_twin_equals_gates_that_never_change() -> None:
    """With every gate fixed (some filters always closed, the rest always open), removing the
    closed filters computes exactly what the gated network computes, at fewer channels."""
    torch.manual_seed(0)
    spec = ModelSpec("small_cnn", (1, 8, 8), tuple("0123456789"), decoupled=True,
                     arch_kwargs={"width": 8})
    model = spec.build().eval()
    closed = {"features.3": [0, 5], "features.7": list(range(16)), "features.10": [1, 2, 3]}
    with torch.no_grad():
        for name, layer in gated_layers(model).items():
            layer.control.fc2.weight.zero_()
            layer.control.fc2.bias.fill_(100.0)
            layer.control.fc2.bias[closed[name]] = -100.0
            layer.bn.running_mean.uniform_(-0.2, 0.2)
    x = torch.rand(16, 1, 8, 8)
    alive = open_ever(model, x, chunk=5)
    assert {k: (~v).nonzero().view(-1).tolist() for k, v in alive.items()} == closed
    twin = pruned_twin(strip_gates(model), alive)
    assert twin is not None
    # a layer whose filters are all closed keeps one, so that shapes stay valid (that filter
    # then runs: not exact), hence the exactness check below closes only some of each layer
    assert twin.features[3].out_channels == 6 and twin.features[7].out_channels == 1
    with torch.no_grad():
        for name, layer in gated_layers(model).items():
            layer.control.fc2.bias.fill_(100.0)
            layer.control.fc2.bias[closed[name][:2]] = -100.0
    alive = open_ever(model, x)
    twin = pruned_twin(strip_gates(model), alive)
    assert [twin.features[i].out_channels for i in (3, 7, 10)] == [6, 14, 14]
    assert twin.classifier.in_features == 14
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), atol=1e-5, rtol=1e-5)


def test_pruned_twin_only_for_small_cnn() -> None:
    spec = ModelSpec("resnet20", (3, 32, 32), tuple("0123456789"), decoupled=True)
    assert pruned_twin(strip_gates(spec.build()), {}) is None
