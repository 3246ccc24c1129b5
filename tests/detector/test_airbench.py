"""The airbench network: whitening stem, decoupling with pools inside gated layers."""

import pytest
import torch
from torch import nn

from detector.airbench import AirbenchNet, init_whitening, patch_covariance
from detector.gating import decouple, gated_layers, strip_gates
from detector.models import create_model
from detector.paths import compute_path, network_macs

WIDTHS = [8, 16, 16]
GATED = ["group1.conv1", "group1.conv2", "group2.conv1", "group2.conv2", "group3.conv1",
         "group3.conv2"]


def trained_like(model: nn.Module) -> nn.Module:
    """Give BN non-trivial statistics and biases, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def test_shapes_macs_and_frozen_parameters():
    model = create_model("airbench", widths=WIDTHS).eval()
    assert isinstance(model, AirbenchNet)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    # whiten 24x3x2x2 on 31x31, then per group conv1 at full size, conv2 after the pool
    expected = (24 * 3 * 4 * 31 * 31 + 24 * 8 * 9 * 31 * 31 + 8 * 8 * 9 * 15 * 15
                + 8 * 16 * 9 * 15 * 15 + 16 * 16 * 9 * 7 * 7 + 16 * 16 * 9 * 7 * 7
                + 16 * 16 * 9 * 3 * 3 + 16 * 10)
    assert network_macs(model, (3, 32, 32)) == expected
    with pytest.raises(ValueError, match="three group widths"):
        create_model("airbench", widths=[8, 16])


def test_convs_start_as_identities():
    model = create_model("airbench", widths=WIDTHS)
    w = model.group2.conv1.weight.detach()  # 8 -> 16: its first 8 filters are identities
    assert torch.equal(w[:8, :, 1, 1], torch.eye(8))
    assert float(w[:8].abs().sum()) == 8.0


def test_whitening_decorrelates_patches():
    torch.manual_seed(0)
    # correlated colour images: a shared random field plus smaller independent noise
    base = torch.rand(64, 1, 16, 16)
    images = (0.6 * base + 0.4 * torch.rand(64, 3, 16, 16)).clamp(0, 1)
    model = create_model("airbench", widths=WIDTHS)
    init_whitening(model, images, eps=1e-6)
    with torch.no_grad():
        out = nn.functional.conv2d(model.normalize(images), model.whiten.weight)  # no bias
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = half.T @ half / len(half)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])
    assert torch.all(model.whiten.bias == 0)


def test_whitening_eps_bounds_the_gain_of_rare_directions():
    """Each filter scales its patch direction by 1 / sqrt(eigenvalue + eps): on smooth images,
    whose 2x2 patches have a few rare (high-frequency) directions, a larger eps shrinks the
    gain of those directions, which a perturbation exploits, and leaves the common ones."""
    torch.manual_seed(0)
    coarse = torch.rand(64, 3, 4, 4)
    images = nn.functional.interpolate(coarse, size=16, mode="bilinear", align_corners=False)
    images = (images + 0.01 * torch.rand(64, 3, 16, 16)).clamp(0, 1)
    model = create_model("airbench", widths=WIDTHS)
    eigenvalues = torch.linalg.eigvalsh(patch_covariance(model, images))
    gains = {}
    for eps in (5e-4, 0.1):
        init_whitening(model, images, eps=eps)
        gains[eps] = model.whiten.weight[:12].flatten(1).norm(dim=1).double()
        expected = (1 / torch.sqrt(eigenvalues + eps)).flip(0)  # filters: largest first
        torch.testing.assert_close(gains[eps], expected, rtol=1e-3, atol=0)
    ratio = {eps: float(g.max() / g.min()) for eps, g in gains.items()}
    assert ratio[0.1] < ratio[5e-4] / 5
    assert float(gains[0.1].max()) <= 0.1 ** -0.5


def test_decouple_gates_every_conv_but_the_stem():
    model = decouple(create_model("airbench", widths=WIDTHS))
    layers = gated_layers(model)
    assert list(layers) == GATED
    assert isinstance(model.whiten, nn.Conv2d)
    for name, layer in layers.items():
        group = model.get_submodule(name.split(".")[0])
        assert (layer.pool is not None) == name.endswith("conv1")
        assert isinstance(getattr(group, "bn" + name[-1]), nn.Identity)
    assert isinstance(model.group1.pool1, nn.Identity)
    with torch.no_grad():
        path = compute_path(model.eval(), torch.rand(3, 3, 32, 32))
    assert [p.bits.shape for p in path.layers.values()] == [
        (3, 8), (3, 8), (3, 16), (3, 16), (3, 16), (3, 16)]


def test_forced_open_gates_compute_the_original_network():
    torch.manual_seed(0)
    base = trained_like(create_model("airbench", widths=WIDTHS))
    gated = decouple(base).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = base(x)
        torch.testing.assert_close(compute_path(gated, x, force_open=True).logits, expected,
                                   rtol=0, atol=1e-6)
        stripped = strip_gates(gated).eval()
        assert isinstance(stripped.group1.pool1, nn.MaxPool2d)
        torch.testing.assert_close(stripped(x), expected, rtol=0, atol=1e-6)


def test_closed_filter_is_exactly_zero_downstream():
    torch.manual_seed(0)
    model = decouple(trained_like(create_model("airbench", widths=WIDTHS))).eval()
    layer = gated_layers(model)["group2.conv1"]
    with torch.no_grad():
        layer.control.fc2.bias[3] = -1e4  # filter 3 of group2.conv1 always closed
        layer.control.fc2.weight[3] = 0
    seen = {}
    model.group2.act.register_forward_hook(
        lambda m, i, o: seen.setdefault("after_gelu", o))  # first call: after bn1 of group2
    with torch.no_grad():
        path = compute_path(model, torch.rand(5, 3, 32, 32))
    assert torch.all(path.layers["group2.conv1"].bits[:, 3] == 0)
    assert torch.all(seen["after_gelu"][:, 3] == 0)
    assert seen["after_gelu"].abs().sum() > 0
