"""decouple() on every supported architecture, and refusal of what it cannot gate."""

import pytest
import torch
from torch import nn

from detector.gates import GatedConv
from detector.gating import decouple, gated_layers, strip_gates
from detector.models import create_model
from detector.recording import recording

# arch, input shape, number of gated layers, names that must be among them, stem conv name
CASES = {
    "small_cnn_8": ("small_cnn", (1, 8, 8), 3, ["features.3", "features.7", "features.10"],
                    "features.0"),
    "small_cnn_28": ("small_cnn", (1, 28, 28), 3, ["features.3", "features.10"], "features.0"),
    # 9 BasicBlocks x 2 convs + 2 projection shortcuts
    "resnet20": ("resnet20", (3, 32, 32), 20,
                 ["layer1.0.conv1", "layer2.0.downsample.0", "layer3.0.downsample.0",
                  "layer3.2.conv2"], "conv1"),
    # 27 BasicBlocks x 2 convs + 2 projection shortcuts
    "resnet56": ("resnet56", (3, 32, 32), 56,
                 ["layer1.8.conv2", "layer2.0.downsample.0", "layer3.8.conv2"], "conv1"),
    # 8 BasicBlocks x 2 convs + 3 downsample convs
    "resnet18": ("resnet18", (3, 32, 32), 19,
                 ["net.layer1.0.conv1", "net.layer4.0.downsample.0", "net.layer4.1.conv2"],
                 "net.conv1"),
    # 16 Bottlenecks x 3 convs + 4 downsample convs
    "resnet50": ("resnet50", (3, 32, 32), 52,
                 ["net.layer1.0.conv3", "net.layer1.0.downsample.0", "net.layer4.2.conv3"],
                 "net.conv1"),
    # 8 convs, the first is the stem
    "vgg11_bn": ("vgg11_bn", (3, 32, 32), 7, ["net.features.4", "net.features.25"],
                 "net.features.0"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    arch, shape, n_gated, names, stem = CASES[request.param]
    torch.manual_seed(0)
    original = create_model(arch, in_channels=shape[0], num_classes=7)
    _randomize_bn(original)
    original.eval()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    gated = decouple(original).eval()
    return arch, shape, n_gated, names, stem, original, before, gated


def _randomize_bn(model):
    """Non-trivial BN statistics, so equality with the original network means something."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)


def test_gated_layer_count_and_names(case):
    _, _, n_gated, names, stem, _, _, gated = case
    layers = gated_layers(gated)
    assert len(layers) == n_gated
    assert set(names) <= set(layers)
    assert stem not in layers
    assert isinstance(gated.get_submodule(stem), nn.Conv2d)  # stem stays a plain conv
    for name, layer in layers.items():
        assert layer.name == name
        assert gated.get_submodule(name) is layer
        assert isinstance(layer.bn, nn.BatchNorm2d)
    # the only conv and BN outside the gates are the stem's; gated BN slots became Identity
    plain = [n for n, m in gated.named_modules()
             if isinstance(m, nn.Conv2d) and not n.endswith(".conv")]
    assert plain == [stem]
    bns = [n for n, m in gated.named_modules()
           if isinstance(m, nn.BatchNorm2d) and not n.endswith(".bn")]
    assert len(bns) == 1


def test_output_shape_and_gates(case):
    _, shape, _, _, _, _, _, gated = case
    x = torch.rand(2, *shape)
    with torch.no_grad(), recording() as rec:
        out = gated(x)
    assert out.shape == (2, 7)
    assert list(rec.records) == list(gated_layers(gated))
    for r in rec.records.values():
        assert r.gates.shape == (2, r.out_channels)
        assert set(r.gates.unique().tolist()) <= {0.0, 1.0}


def test_force_open_equals_original(case):
    _, shape, _, _, _, original, _, gated = case
    x = torch.rand(3, *shape)
    with torch.no_grad():
        expected = original(x)
        with recording(force_open=True):
            got = gated(x)
        gated_out = gated(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gated_out, expected, atol=1e-4)  # real gates do change it


def test_original_left_untouched(case):
    _, _, _, _, _, original, before, gated = case
    assert not gated_layers(original)
    after = original.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # the gated copy owns its own tensors
    conv = next(iter(gated_layers(gated).values())).conv
    assert all(conv.weight.data_ptr() != p.data_ptr() for p in original.parameters())


def test_decoupling_twice_raises(case):
    gated = case[-1]
    with pytest.raises(ValueError, match="already decoupled"):
        decouple(gated)


def test_reduction_sets_gate_bottleneck():
    model = decouple(create_model("resnet20"), reduction=8)
    layer = gated_layers(model)["layer3.0.conv2"]  # 64 -> 64 channels
    assert layer.control.fc1.out_features == 8
    assert layer.control.fc2.out_features == 64


def test_initial_gate_logit_opens_every_layer_at_first():
    base = create_model("airbench", widths=(8, 16, 16)).eval()
    model = decouple(base, initial_gate_logit=6.0).eval()
    for layer in gated_layers(model).values():
        assert torch.all(layer.control.fc2.bias == 6.0)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad(), recording() as r:
        out = model(x)
    assert all(rec.gates.all() for rec in r.records.values())  # every filter open
    torch.testing.assert_close(out, base(x))  # hence the base network's outputs


def test_conv_without_bn_in_sequential_raises_naming_it():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.ReLU(),
    )
    with pytest.raises(ValueError, match=r"'3'"):
        decouple(model)
    assert not gated_layers(model)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.conv1 = nn.Conv2d(4, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.norm2 = nn.BatchNorm2d(4)  # not named bn2: no partner

    def forward(self, x):
        return self.norm2(self.conv2(self.bn1(self.conv1(self.stem(x)))))


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Block()

    def forward(self, x):
        return self.body(x)


def test_conv_without_bn_partner_in_custom_module_raises_naming_it():
    with pytest.raises(ValueError, match=r"'body\.conv2'.*_Block"):
        decouple(_Outer())


def test_model_with_a_bn_removed_raises_naming_the_conv():
    model = create_model("small_cnn")
    model.features[4] = nn.Identity()  # conv 3 loses its BN, as in torchvision's plain vgg11
    with pytest.raises(ValueError, match=r"'features\.3'"):
        decouple(model)


def test_model_with_only_a_stem_raises():
    with pytest.raises(ValueError, match="besides its stem"):
        decouple(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))


def test_gated_layers_of_plain_model_is_empty():
    assert gated_layers(create_model("small_cnn")) == {}
    assert all(isinstance(m, GatedConv)
               for m in gated_layers(decouple(create_model("small_cnn"))).values())


@pytest.mark.parametrize("arch", ["small_cnn", "resnet20", "vgg11_bn"])
def test_strip_gates_restores_the_dense_network(arch):
    shape = (1, 8, 8) if arch == "small_cnn" else (3, 32, 32)
    original = create_model(arch, in_channels=shape[0]).eval()
    gated = decouple(original).eval()
    plain = strip_gates(gated).eval()
    assert not gated_layers(plain)
    assert gated_layers(gated)  # the argument keeps its gates
    x = torch.rand(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), original(x))
    assert plain.state_dict().keys() == original.state_dict().keys()
