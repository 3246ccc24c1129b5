"""Sparse execution: same logits and computation path as the masked dense network."""

import math
import threading

import pytest
import torch
from torch import nn

from detector.checkpoint import ModelSpec
from detector.conv_executor import current_executor
from detector.gating import decouple, gated_layers
from detector.paths import compute_path
from detector.sparse import SparseStats, sparse_execution, sparse_forward

ALWAYS, NEVER = math.inf, 0.0  # dense_above: slice every layer call / none


def randomised(model: nn.Module, closed: dict[str, bool] | None = None) -> nn.Module:
    """Perturb BN statistics and make the gates input-dependent with about half open.

    ``closed``: layer name -> True (all filters closed) / False (all open), forced through
    control.fc2 (weight 0, bias -100 / +100).
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        for name, g in gated_layers(model).items():
            nn.init.normal_(g.control.fc1.weight, 0.0, 0.5)
            nn.init.normal_(g.control.fc2.bias, 0.0, 1.5)
            if closed is not None and name in closed:
                g.control.fc2.weight.zero_()
                g.control.fc2.bias.fill_(-100.0 if closed[name] else 100.0)
    return model.eval()


def build(arch: str, shape: tuple[int, int, int], **kwargs) -> nn.Module:
    spec = ModelSpec(arch, shape, tuple("0123456789"), decoupled=True, arch_kwargs=kwargs)
    return spec.build()


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: 1e-4 of the tensor's largest magnitude (at least 1e-4)."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * scale)


def assert_same_path(model: nn.Module, x: torch.Tensor, dense_above: float = ALWAYS,
                     force_open: bool = False, pooled: bool = True) -> SparseStats:
    """compute_path with and without sparse execution agree; returns the sparse stats."""
    with torch.no_grad():
        ref = compute_path(model, x, force_open=force_open, pooled=pooled)
        with sparse_execution(dense_above) as stats:
            got = compute_path(model, x, force_open=force_open, pooled=pooled)
    close(got.logits, ref.logits)
    assert list(got.layers) == list(ref.layers)
    assert torch.equal(got.bits(), ref.bits())
    for name, r in ref.layers.items():
        g = got.layers[name]
        close(g.logits, r.logits)
        if pooled:
            close(g.pooled, r.pooled)
        else:
            assert g.pooled is None and r.pooled is None
        assert g.dense_macs == r.dense_macs
        torch.testing.assert_close(g.executed_macs, r.executed_macs)
    assert stats.sliced_calls + stats.dense_calls == len(ref.layers)
    return stats


ARCHS = [
    ("small_cnn", (1, 8, 8), {"width": 8}),
    ("small_cnn", (1, 28, 28), {"width": 8}),
    ("resnet20", (3, 32, 32), {}),
    ("resnet18", (3, 32, 32), {}),
    ("resnet50", (3, 32, 32), {}),
    ("vgg11_bn", (3, 32, 32), {}),
]


@pytest.fixture(scope="module", params=ARCHS, ids=[f"{a}-{s[1]}" for a, s, _ in ARCHS])
def model_and_shape(request):
    arch, shape, kwargs = request.param
    torch.manual_seed(1)
    return randomised(build(arch, shape, **kwargs)), shape


@pytest.mark.parametrize("batch", [1, 3])
def test_same_logits_and_path_every_architecture(model_and_shape, batch):
    model, shape = model_and_shape
    x = torch.rand(batch, *shape)
    stats = assert_same_path(model, x)
    assert stats.sliced_calls == len(gated_layers(model))
    assert 0.0 < stats.executed_fraction < 1.0
    assert_same_path(model, x, dense_above=NEVER)
    assert_same_path(model, x, dense_above=0.9)


def test_force_open_and_plain_forward(model_and_shape):
    model, shape = model_and_shape
    x = torch.rand(2, *shape)
    assert_same_path(model, x, force_open=True)
    with torch.no_grad():
        close(sparse_forward(model, x), model(x))


@pytest.mark.parametrize("arch,shape", [("small_cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))])
@pytest.mark.parametrize("batch", [1, 4])
def test_all_open_and_all_closed_layers(arch, shape, batch):
    layers = list(gated_layers(build(arch, shape)))
    # one layer entirely open, the next entirely closed (its successors then get zero inputs)
    closed = {layers[0]: False, layers[1]: True}
    if arch == "resnet20":
        closed |= {"layer2.0.downsample.0": True, "layer3.0.conv1": False}
    model = randomised(build(arch, shape), closed)
    x = torch.rand(batch, *shape)
    assert_same_path(model, x)
    assert_same_path(model, x, dense_above=0.9)
    with torch.no_grad():
        path = compute_path(model, x)
    assert bool(path.layers[layers[0]].bits.eq(1).all())
    assert bool(path.layers[layers[1]].bits.eq(0).all())


@pytest.mark.parametrize("batch", [1, 3])
def test_airbench_pool_layers_slice_unless_pooled_means_are_asked(batch):
    """airbench's conv1 layers pool between conv and BN: sliced exactly in serving mode
    (no pooled means); the means of every filter need the dense conv there."""
    torch.manual_seed(3)
    model = randomised(build("airbench", (3, 32, 32), widths=[8, 16, 16]))
    x = torch.rand(batch, 3, 32, 32)
    stats = assert_same_path(model, x, pooled=False)
    assert (stats.sliced_calls, stats.dense_calls) == (6, 0)
    assert 0.0 < stats.executed_fraction < 1.0
    stats = assert_same_path(model, x)
    assert (stats.sliced_calls, stats.dense_calls) == (3, 3)
    assert_same_path(model, x, dense_above=0.9, pooled=False)
    with torch.no_grad():
        close(sparse_forward(model, x), model(x))


def test_batch_one_work_matches_path_accounting():
    model = randomised(build("resnet20", (3, 32, 32)))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), sparse_execution(ALWAYS) as stats:
        path = compute_path(model, x)
    controls = {n: g.control.fc1.weight.numel() + g.control.fc2.weight.numel()
                for n, g in gated_layers(model).items()}
    counted = sum(float(p.executed_macs[0]) - controls[n] for n, p in path.layers.items())
    assert stats.executed_macs == pytest.approx(counted, rel=1e-6)
    assert stats.dense_macs == sum(p.dense_macs for p in path.layers.values())


def test_unusual_convs_fall_back_or_slice_exactly():
    """Grouped / reflect-padded convs run dense; strided, dilated, 'same'-padded and
    non-square kernels with bias are sliced, and their pooled means stay exact."""
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, (2, 3), padding="same", dilation=2), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 8, 3, groups=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 10, (3, 1), stride=(2, 1), padding=(0, 2)), nn.BatchNorm2d(10), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(10, 4),
    )
    model = randomised(decouple(net))
    for batch in (1, 3):
        x = torch.rand(batch, 3, 13, 11)
        stats = assert_same_path(model, x)
        assert (stats.sliced_calls, stats.dense_calls) == (3, 2)


def test_training_mode_is_refused():
    model = randomised(build("small_cnn", (1, 8, 8), width=4)).train()
    with sparse_execution(), pytest.raises(ValueError, match="eval mode"):
        model(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="dense_above"), sparse_execution(-1.0):
        pass


def test_mode_is_scoped_to_the_block_and_thread():
    model = randomised(build("small_cnn", (1, 8, 8), width=4))
    x = torch.rand(2, 1, 8, 8)
    other: list[int] = []
    with torch.no_grad(), sparse_execution() as stats:
        model(x)
        calls = stats.sliced_calls + stats.dense_calls
        worker = threading.Thread(target=lambda: other.append(int(model(x).shape[0])))
        worker.start()
        worker.join()
        assert stats.sliced_calls + stats.dense_calls == calls  # the thread ran dense
    assert other == [2]
    assert current_executor() is None
