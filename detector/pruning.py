"""Static pruning: a decoupled network's dense twin without the filters that never open.

The baseline that input-dependent gating has to beat: if some filters are closed for every
input, removing them once gives a smaller dense network that computes the same where the
other gates never change (``benchmarks/speed.py`` times it next to masked and sparse
execution). :func:`open_ever` finds the filters that open for at least one of a set of images;
:func:`pruned_twin` removes the others from the dense twin (:func:`detector.gating.strip_gates`)
of a :class:`~detector.models.SmallCNN`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from detector.models import SmallCNN
from detector.paths import compute_path


def open_ever(model: nn.Module, images: torch.Tensor, chunk: int = 256
              ) -> dict[str, torch.Tensor]:
    """Gated layer name -> (C,) bool: filter open for at least one of ``images``.

    model: a decoupled network in eval mode; images: (N, C, H, W) in [0, 1], run ``chunk`` at
    a time.
    """
    alive: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for i in range(0, images.shape[0], chunk):
            path = compute_path(model, images[i:i + chunk], pooled=False)
            for name, layer in path.layers.items():
                seen = layer.bits.bool().any(dim=0)
                alive[name] = seen | alive[name] if name in alive else seen
    return alive


def pruned_twin(dense: nn.Module, alive: dict[str, torch.Tensor]) -> nn.Module | None:
    """The dense twin of a decoupled small_cnn with every filter in ``alive`` that never opened
    removed (static pruning of the silent filters, the baseline gating must beat); None for
    other architectures (residual adds and flattening classifiers need more surgery).

    alive: gated layer name -> (C,) bool, filter open for at least one input (:func:`open_ever`).
    A layer whose filters are all closed keeps one, so that shapes stay valid. High-energy and
    dynamic filters stay and always run, so the twin's logits differ from the gated network's
    unless every gate is fixed.
    """
    if not isinstance(dense, SmallCNN):
        return None
    twin = copy.deepcopy(dense)
    layers, keep_in = twin.features, None
    for i, conv in enumerate(list(layers)):
        if not isinstance(conv, nn.Conv2d):
            continue
        bn = layers[i + 1]
        keep = alive.get(f"features.{i}", torch.ones(conv.out_channels, dtype=torch.bool)).clone()
        keep[int(keep.float().argmax())] = True  # at least one filter, so shapes stay valid
        weight = conv.weight.detach()[keep]
        weight = weight if keep_in is None else weight[:, keep_in]
        new_conv = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, conv.stride,
                             conv.padding, bias=False)
        new_bn = nn.BatchNorm2d(weight.shape[0], eps=bn.eps)
        with torch.no_grad():
            new_conv.weight.copy_(weight)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new_bn, name).copy_(getattr(bn, name)[keep])
        layers[i], layers[i + 1], keep_in = new_conv, new_bn, keep
    fc = twin.classifier
    twin.classifier = nn.Linear(int(keep_in.sum()), fc.out_features)
    with torch.no_grad():
        twin.classifier.weight.copy_(fc.weight[:, keep_in])
        twin.classifier.bias.copy_(fc.bias)
    return twin.eval()
