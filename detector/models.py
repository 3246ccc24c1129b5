"""The classifiers this project defines, built by name with :func:`create_model`.

All models take images in [0, 1], NCHW float32, and normalise them in their first layer, so
attacks and clients work in pixel space.

- ``small_cnn``: four conv-BN-ReLU layers for grey digits (8x8 scikit-learn digits, 28x28 MNIST).
- ``resnet20`` / ``resnet56``: the CIFAR ResNets of He et al., "Deep Residual Learning for Image
  Recognition" (CVPR 2016), with 1x1 conv + BN projection shortcuts where the shape changes.
- ``airbench``: the fast CIFAR-10 network of Jordan (arXiv 2404.00498), see
  :mod:`detector.airbench` (``widths`` sets its three group widths).
- ``resnet18`` / ``resnet50`` / ``vgg11_bn`` / ``vgg16_bn``: torchvision's ImageNet
  architectures (randomly initialised; for ImageFolder data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel; x: (B, C, H, W) in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers (two max-pools), global average pool, linear classifier.

    Works for any square input of side >= 4 (8x8 digits, 28x28 MNIST).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 32,
        mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(width, 2 * width),
            *_conv_bn_relu(2 * width, 2 * width),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [0, 1] -> logits (B, num_classes)."""
        h = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(h), 1))


class BasicBlock(nn.Module):
    """CIFAR ResNet block: conv-BN-ReLU, conv-BN, + shortcut (1x1 conv + BN when reshaping)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: stem conv, three stages of n blocks (16, 32, 64 filters)."""

    def __init__(
        self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
        mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i and j == 0) else 1)
                      for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 32, 32) in [0, 1] -> logits (B, num_classes)."""
        h = self.relu(self.bn1(self.conv1(self.normalize(x))))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(torch.flatten(self.pool(h), 1))


class TorchvisionNet(nn.Module):
    """A torchvision classifier behind a normalisation layer; its modules live under ``net``."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_TORCHVISION = {"resnet18", "resnet50", "vgg11_bn", "vgg16_bn"}
MODEL_NAMES = ("small_cnn", "airbench", "resnet20", "resnet56", *sorted(_TORCHVISION))


def create_model(
    name: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs: Any
) -> nn.Module:
    """Build an (undecoupled) classifier by name; see :data:`MODEL_NAMES`.

    ``kwargs`` go to the architecture (``width`` for small_cnn, ``widths`` for airbench;
    ``mean``/``std`` for all).
    """
    if name == "small_cnn":
        mean = kwargs.pop("mean", (0.5,) * in_channels)
        std = kwargs.pop("std", (0.5,) * in_channels)
        return SmallCNN(in_channels, num_classes, mean=mean, std=std, **kwargs)
    if name in ("resnet20", "resnet56"):
        return CifarResNet(int(name[6:]), in_channels, num_classes, **kwargs)
    if name == "airbench":
        from detector.airbench import AirbenchNet  # imports this module

        return AirbenchNet(in_channels, num_classes, **kwargs)
    if name in _TORCHVISION:
        mean = kwargs.pop("mean", IMAGENET_MEAN if in_channels == 3 else (0.5,) * in_channels)
        std = kwargs.pop("std", IMAGENET_STD if in_channels == 3 else (0.5,) * in_channels)
        import torchvision  # slow to import; only the ImageNet architectures need it

        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            _replace_stem(net, in_channels)
        return TorchvisionNet(net, mean, std)
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _replace_stem(net: nn.Module, in_channels: int) -> None:
    """Swap the first conv of a torchvision net for one taking ``in_channels`` channels."""
    for parent in net.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                setattr(parent, child_name, nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride,
                    child.padding, bias=child.bias is not None))
                return


def min_input_size(name: str) -> int:
    """Smallest square input side the architecture accepts."""
    return {"small_cnn": 4, "resnet20": 8, "resnet56": 8, "airbench": 16}.get(name, 32)
