"""Path stability: the paths of slightly changed copies of an input, next to its own.

A clean input sits well inside its class: a one-pixel shift, a slight blur or a coarser bit
depth leave its prediction and most of its gates as they were. An adversarial input is pushed
just across a decision boundary (minimal-perturbation attacks end right at it) or carries a
perturbation that these changes partly undo, so its prediction and path move (the idea of
Xu et al.'s feature squeezing, NDSS 2018, applied to the computation path). The transformed
copies cost one more forward pass of the network, all of them stacked in one batch.

The transforms are fixed, parameter-free and differentiable (bit-depth reduction straight-through)
so attacks can differentiate through them:

- ``shift``: translate by one pixel right and down (edge pixels repeated);
- ``blur``: 3x3 binomial blur (weights 1-2-1 per axis), edges repeated;
- ``bits5``: round each pixel to 5 bits (32 levels);
- ``mirror``: flip left to right. Only for images whose classes survive a mirror (photographs:
  CIFAR-10, ImageNet; not digits) and classifiers trained with flips, which then give a clean
  image and its mirror the same class. An adversarial perturbation is tuned to the network as
  it sees the image; mirrored, it meets the network's mirrored view, which is in effect another
  model, so even perturbations built to survive shifts and blur (translation-invariant attacks
  such as TIFGSM, Square's patches) lose part of their hold (docs/RESULTS.md 2.8).
- ``mirror_shift``: the mirror image moved one pixel right and down: a second view of the
  mirrored network, off the pixel grid of the first.
- ``greyscale``: every channel replaced by the image's luminance (ITU-R BT.601 weights), for
  colour images only. A classifier trained on colour photographs still gives most clean images
  their class in grey, while a perturbation whose three channels differ (Square's random-colour
  patches, the per-channel smoothed gradient signs of TIFGSM) is averaged into one, so that
  much of it cancels (docs/RESULTS.md 2.8).

:class:`detector.features.PathProfile` turns the companion paths into features (``stability``
group).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detector.features import PathBatch
from detector.paths import compute_path


def translate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x moved ``dx`` pixels right and ``dy`` down (negative: left / up), the edge rows and
    columns repeated into the space left behind; |dx|, |dy| < the image size."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top:top + h, left:left + w]


def _shift(x: torch.Tensor) -> torch.Tensor:
    return translate(x, 1, 1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    kernel = (k[:, None] * k[None]).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=x.shape[1])


def _bits5(x: torch.Tensor) -> torch.Tensor:
    rounded = torch.round(x * 31) / 31
    return x + (rounded - x).detach()  # value of the rounding, gradient of the identity


def _mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _mirror_shift(x: torch.Tensor) -> torch.Tensor:
    return _shift(_mirror(x))


#: ITU-R BT.601 luma weights of the red, green and blue channels (they sum to 1).
LUMA = (0.299, 0.587, 0.114)


def _greyscale(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != len(LUMA):
        raise ValueError(f"the greyscale transform needs colour images (3 channels), got "
                         f"{x.shape[1]}")
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True).clamp(0, 1).expand_as(x)


TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "shift": _shift, "blur": _blur, "bits5": _bits5, "mirror": _mirror,
    "mirror_shift": _mirror_shift, "greyscale": _greyscale}


def default_transforms(mirror: bool, colour: bool) -> tuple[str, ...]:
    """The stability transforms used unless told: shift, blur and bits5; mirror and
    mirror_shift too if ``mirror`` (the images' classes survive a left-right flip and the
    classifier was trained with flips); greyscale too if ``colour`` (3-channel images)."""
    return ("shift", "blur", "bits5", *(("mirror", "mirror_shift") if mirror else ()),
            *(("greyscale",) if colour else ()))


def check_transforms(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, each a key of :data:`TRANSFORMS` and none twice (ValueError naming
    the others)."""
    if isinstance(names, str):
        raise ValueError(f"stability transforms must be a list of names, got {names!r}")
    unknown = [n for n in names if n not in TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown stability transforms {unknown}; choose from "
                         f"{', '.join(TRANSFORMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"stability transforms given twice: {list(names)}")
    return tuple(names)


def transformed(name: str, images: torch.Tensor) -> torch.Tensor:
    """images (N, C, H, W) in [0, 1] -> the same shape in [0, 1], changed by transform
    ``name`` (ValueError naming an unknown one)."""
    return TRANSFORMS[check_transforms([name])[0]](images)


def with_companions(model: nn.Module, images: torch.Tensor, paths: PathBatch,
                    names: Sequence[str], ste: str | None = None) -> PathBatch:
    """``paths`` (of ``images``, (N, C, H, W) in [0, 1]) with the paths of each transformed
    copy attached as companions. The T transformed copies run through ``model`` as one stacked
    batch of T * N images (one forward pass, not T: at batch 1 the fixed cost of each pass
    dominates), as the caller's context runs it (no grad, sparse execution, straight-through
    gates...).

    ``ste``: as for :meth:`PathBatch.from_result` (attacks keep the graph).
    """
    names = check_transforms(names)
    if not names:
        return paths
    n = len(images)
    copies = torch.cat([transformed(name, images) for name in names])
    every = PathBatch.from_result(compute_path(model, copies, pooled=False), ste)
    # side by side once for all copies, in the recording's layer order (a profile's order)
    every.flat(list(every.bits))
    return paths.with_companions({name: every.take(slice(i * n, (i + 1) * n))
                                  for i, name in enumerate(names)})


def record_paths(model: nn.Module, images: torch.Tensor, stability: Sequence[str] = (),
                 ste: str | None = None) -> PathBatch:
    """images (N, C, H, W) in [0, 1] -> their paths (``pooled=False``), with the companions of
    the ``stability`` transforms when there are any: what path features read. Runs in the
    caller's context (no grad, sparse execution, straight-through gates); ``ste`` as for
    :meth:`PathBatch.from_result`."""
    paths = PathBatch.from_result(compute_path(model, images, pooled=False), ste)
    return with_companions(model, images, paths, stability, ste)
