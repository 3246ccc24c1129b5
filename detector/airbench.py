"""The fast CIFAR-10 network of Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU"
(arXiv 2404.00498; airbench94), built by :func:`detector.models.create_model` as ``airbench``.

A plain VGG-style network without residuals, made to train in few epochs:

- a frozen 2x2 *whitening* conv (3 -> 2 x 12 channels, set by :func:`init_whitening` from the
  eigenvectors of the 2x2 patch covariance of training images, as +/- pairs; only its bias
  trains, for the first epochs) + GELU;
- three groups ``conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU`` (default widths
  64, 256, 256; convs without bias and Dirac-initialised; BN without a learnt scale, eps 1e-12,
  running-stat momentum 0.4);
- max-pool 3 -> linear (no bias) -> logits x 1/9.

``decouple()`` gates every conv but the whitening stem; the first conv of a group carries its
max-pool into the gated layer (conv -> pool -> BN -> mask), so a closed filter is zero after its
BN and GELU (GELU(0) = 0) and can be skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from detector.models import CIFAR_MEAN, CIFAR_STD, Normalize

WIDTHS = (64, 256, 256)
LOGIT_SCALE = 1 / 9
BN_MOMENTUM = 0.4  # PyTorch's convention (airbench's 0.6 = 1 - 0.4)
BN_EPS = 1e-12
#: Whitening regulariser: airbench's scales the rarest 2x2 patch directions of CIFAR-10 ~130x
#: the commonest (``training.train --whiten-eps`` changes it).
WHITEN_EPS = 5e-4


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    """BN with its scale frozen at 1 (only the bias learns), as in airbench."""
    bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


def _dirac_conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 'same' conv without bias whose first min(cin, cout) filters start as identities."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


class ConvGroup(nn.Module):
    """conv1 -> pool1 -> bn1 -> GELU -> conv2 -> bn2 -> GELU; (B, cin, H, W) -> (B, cout, H/2, W/2).
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _dirac_conv(cin, cout)
        self.pool1 = nn.MaxPool2d(2)
        self.bn1 = _batch_norm(cout)
        self.conv2 = _dirac_conv(cout, cout)
        self.bn2 = _batch_norm(cout)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.pool1(self.conv1(x))))
        return self.act(self.bn2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """airbench94 for (B, 3, 32, 32) images in [0, 1] (any side >= 16 works)."""

    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, widths: Sequence[int] = WIDTHS,
        mean: Sequence[float] = CIFAR_MEAN, std: Sequence[float] = CIFAR_STD,
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"airbench needs three group widths, got {list(widths)}")
        self.normalize = Normalize(mean, std)
        whitened = 2 * in_channels * 2 * 2  # +/- one filter per 2x2 patch dimension
        self.whiten = nn.Conv2d(in_channels, whitened, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.act = nn.GELU()
        self.group1 = ConvGroup(whitened, widths[0])
        self.group2 = ConvGroup(widths[0], widths[1])
        self.group3 = ConvGroup(widths[1], widths[2])
        self.pool = nn.AdaptiveMaxPool2d(1)  # the 3x3 map left from 32x32 inputs
        self.head = nn.Linear(widths[2], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [0, 1] -> logits (B, num_classes)."""
        h = self.act(self.whiten(self.normalize(x)))  # (B, 24, H-1, W-1)
        h = self.group3(self.group2(self.group1(h)))  # (B, 256, 3, 3) for 32x32
        return self.head(torch.flatten(self.pool(h), 1)) * LOGIT_SCALE


@torch.no_grad()
def patch_covariance(model: AirbenchNet, images: torch.Tensor) -> torch.Tensor:
    """The (uncentred) covariance of the normalised patches of ``images`` (N, C, H, W) in [0, 1]
    that the whitening conv sees: (C kh kw, C kh kw) float64, in the conv weight's layout."""
    x = model.normalize(images.float())
    kh, kw = model.whiten.kernel_size
    patches = x.unfold(2, kh, 1).unfold(3, kw, 1)  # (N, C, H', W', kh, kw)
    flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw).double()
    return flat.T @ flat / len(flat)


@torch.no_grad()
def init_whitening(model: AirbenchNet, images: torch.Tensor, eps: float = WHITEN_EPS) -> None:
    """Set the whitening conv from the 2x2 patches of ``images``: (N, C, H, W) in [0, 1].

    With Sigma the :func:`patch_covariance` of the images and Sigma = V diag(l) V^T, the filters
    are the rows of V^T / sqrt(l + eps) and their negatives, so the first half of the stem's
    outputs (before its bias) has covariance ~identity over the patches.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(patch_covariance(model, images))  # ascending
    filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).flip(0)
    filters = filters.reshape(model.whiten.weight[: len(filters)].shape).float()
    model.whiten.weight.copy_(torch.cat([filters, -filters]))
    model.whiten.bias.zero_()
