"""Benign changes of clean images: the list a deployed detector must not flag
(:func:`benign_shifts`), stronger and other ones past it (:func:`beyond_shifts`), and benign
copies of the fitting images as negatives for fitting (:func:`add_noise_negatives`,
:func:`add_benign_negatives`, :func:`noisy_like`).

Images are (N, C, H, W) float32 in [0, 1]; every change stays in [0, 1] and keeps the label.
Parameters given per image are (N,) tensors, else one number for all.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from detector.features import PathBatch
from detector.stability import translate
from evaluation.sets import AdvSet, Sets, extract_paths, predict

#: Gaussian-noise sigmas of the evaluated changes, grey and colour images.
GREY_SIGMAS = (0.03, 0.05, 0.1)
COLOUR_SIGMAS = (0.01, 0.02, 0.05)
JPEG_QUALITIES = (30, 50, 70, 90)
BRIGHTNESS = (-0.1, 0.1)
CONTRAST = (0.8, 1.2)
SHIFTS = (1, 2)
ROTATIONS = (-5.0, 5.0)
#: Per-image sigma range of the noise negatives (grey, colour).
GREY_NOISE_RANGE, COLOUR_NOISE_RANGE = (0.01, 0.1), (0.005, 0.04)
#: Largest ``reach`` of the fitting changes (contrast factors stay >= 0.25).
MAX_REACH = 3.0


def _per_image(value: float | torch.Tensor, n: int) -> torch.Tensor:
    """A number or (N,) values as (N, 1, 1, 1) float32."""
    return torch.as_tensor(value, dtype=torch.float32).expand(n).reshape(n, 1, 1, 1)


def gaussian_noise(x: torch.Tensor, sigma: float | torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """x plus Gaussian noise of standard deviation ``sigma``, clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator)
    return (x + _per_image(sigma, len(x)) * noise).clamp(0, 1)


def brightness(x: torch.Tensor, delta: float | torch.Tensor) -> torch.Tensor:
    """``delta`` added to every pixel (-0.1: darker, 0.1: a grey background), clipped."""
    return (x + _per_image(delta, len(x))).clamp(0, 1)


def contrast(x: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """Pixels moved ``factor`` times as far from the image's mean luminance (ITU-R 601-2
    weights for colour, as torchvision's ``adjust_contrast``), clipped; 1 keeps the image."""
    if x.shape[1] == 3:
        weights = torch.tensor([0.2989, 0.587, 0.114]).view(1, 3, 1, 1)
        mean = (x * weights).sum(1, keepdim=True).mean((1, 2, 3), keepdim=True)
    else:
        mean = x.mean((1, 2, 3), keepdim=True)
    f = _per_image(factor, len(x))
    return (f * x + (1 - f) * mean).clamp(0, 1)


def rotate(x: torch.Tensor, degrees: float | torch.Tensor) -> torch.Tensor:
    """x rotated by ``degrees`` (counter-clockwise) about its centre, bilinear, edge pixels
    repeated outside the image."""
    a = _per_image(degrees, len(x)).view(-1) * (math.pi / 180)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                         torch.stack([sin, cos, zero], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                         align_corners=False).clamp(0, 1)


def jpeg(x: torch.Tensor, quality: int | Sequence[int]) -> torch.Tensor:
    """Each image of x re-encoded as JPEG at ``quality`` (one, or one per image) and decoded."""
    qualities = [quality] * len(x) if isinstance(quality, int) else list(quality)
    out = []
    mode = "L" if x.shape[1] == 1 else "RGB"
    for img, q in zip((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), qualities,
                      strict=True):
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode).save(
            buf, "JPEG", quality=int(q))
        arr = np.asarray(Image.open(buf).convert(mode), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr.reshape(img.shape)).permute(2, 0, 1))
    return torch.stack(out) if out else x.clone()


def benign_shifts(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """The benign changes a detector is judged on, by label, each of every image of x:
    Gaussian noise (:data:`GREY_SIGMAS` / :data:`COLOUR_SIGMAS`), JPEG at
    :data:`JPEG_QUALITIES`, brightness and contrast, shifts by 1 and 2 pixels right and down,
    rotations by -5 and 5 degrees; noise drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    sigmas = GREY_SIGMAS if x.shape[1] == 1 else COLOUR_SIGMAS
    out = {f"gaussian noise sigma={s}": gaussian_noise(x, s, g) for s in sigmas}
    out |= {f"JPEG quality {q}": jpeg(x, q) for q in JPEG_QUALITIES}
    out |= {f"brightness {d:+}": brightness(x, d) for d in BRIGHTNESS}
    out |= {f"contrast x{f}": contrast(x, f) for f in CONTRAST}
    out |= {f"shift {k} px right and down": translate(x, k, k) for k in SHIFTS}
    out |= {f"rotation {r:+g} deg": rotate(x, r) for r in ROTATIONS}
    return out


def _noise_range(channels: int, reach: float) -> tuple[float, float]:
    """Sigma range of the noise negatives for grey (1) or colour (3) images, its upper end
    ``reach`` times :data:`GREY_NOISE_RANGE` / :data:`COLOUR_NOISE_RANGE`'s; ValueError
    unless reach is in (0, :data:`MAX_REACH`]."""
    if not 0 < reach <= MAX_REACH:  # also False for nan
        raise ValueError(f"reach must be in (0, {MAX_REACH}], got {reach}")
    lo, hi = GREY_NOISE_RANGE if channels == 1 else COLOUR_NOISE_RANGE
    return lo, hi * reach


def beyond_shifts(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Benign changes beyond the evaluated ones (:func:`benign_shifts`), to see how a detector
    fitted around those behaves past them, by label, each of every image of x: Gaussian noise
    at 1.5 and 2 times the largest evaluated sigma, brightness +-0.15, contrast x0.7 and x1.4,
    rotations by -10 and 10 degrees, and two changes of other kinds, a 5x5 Gaussian blur
    (sigma 1, stronger than the stability transform's 3x3) and gamma 0.7 and 1.4; noise drawn
    with ``seed``. Some of these move the classifier too: judge false alarms only where the
    accuracy holds."""
    g = torch.Generator().manual_seed(seed)
    top = max(GREY_SIGMAS if x.shape[1] == 1 else COLOUR_SIGMAS)
    out = {f"gaussian noise sigma={f * top:.3g}": gaussian_noise(x, f * top, g)
           for f in (1.5, 2.0)}
    out |= {f"brightness {d:+}": brightness(x, d) for d in (-0.15, 0.15)}
    out |= {f"contrast x{f}": contrast(x, f) for f in (0.7, 1.4)}
    out |= {f"rotation {r:+g} deg": rotate(x, r) for r in (-10.0, 10.0)}
    out["gaussian blur 5x5 sigma=1"] = TF.gaussian_blur(x, [5, 5], [1.0, 1.0])
    out |= {f"gamma {e}": x.clamp(0, 1) ** e for e in (0.7, 1.4)}
    return out


def add_noise_negatives(model: nn.Module, sets: Sets, seed: int, reach: float = 1.0) -> None:
    """Attach Gaussian-noise copies of the clean images as benign negatives for fitting.

    Each image gets its own sigma, uniform in :data:`GREY_NOISE_RANGE` for grey and
    :data:`COLOUR_NOISE_RANGE` for colour images (a range, so that no single evaluated shift
    is fitted exactly), the upper end times ``reach`` (1.5: half again beyond).
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = _noise_range(sets.x_clean.shape[1], reach)
    sigma = lo + (hi - lo) * torch.rand(len(sets.y_clean), generator=g)
    x = gaussian_noise(sets.x_clean, sigma, g)
    image = np.arange(len(sets.y_clean))
    _attach(sets, AdvSet(x, sets.y_clean, image, len(image), extract_paths(model, x)))


def random_benign_changes(x: torch.Tensor, seed: int, reach: float = 1.0) -> torch.Tensor:
    """One benign change per image of x, drawn with ``seed``: its kind uniformly among noise,
    JPEG, brightness, contrast, shift and rotation, its strength from a range around the
    evaluated ones (noise as :func:`add_noise_negatives`, JPEG quality 25-95, brightness
    +-0.02-0.12, contrast 0.75-1.25, shifts of up to 2 pixels each way, rotations of 1-6
    degrees either way), so that fitting never sees an evaluated change exactly.

    ``reach`` (in (0, :data:`MAX_REACH`]) multiplies the upper ends of the continuous
    strengths (noise sigma, brightness, contrast's distance from 1, rotation), so that the
    evaluated strengths sit inside the range rather than at its edge; JPEG and shifts keep
    theirs.
    """
    lo, hi = _noise_range(x.shape[1], reach)
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    kind = torch.randint(6, (n,), generator=g)
    u = torch.rand(n, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    moves = [(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3) if (dx, dy) != (0, 0)]
    move = torch.randint(len(moves), (n,), generator=g)
    out = x.clone()
    # strengths written so that reach 1 draws exactly the values of the fits before reach
    for k, change in enumerate((
            lambda i: gaussian_noise(x[i], lo + (hi - lo) * u[i], g),
            lambda i: jpeg(x[i], [int(q) for q in (25 + 70 * u[i]).round()]),
            lambda i: brightness(x[i], sign[i] * (0.02 + (0.1 + 0.12 * (reach - 1)) * u[i])),
            lambda i: contrast(x[i], 1 - 0.25 * reach + 0.5 * reach * u[i]),
            lambda i: torch.cat([translate(x[j:j + 1], *moves[int(move[j])]) for j in i])
            if len(i) else x[i],
            lambda i: rotate(x[i], sign[i] * (1 + (5 + 6 * (reach - 1)) * u[i])))):
        idx = torch.nonzero(kind == k).view(-1)
        out[idx] = change(idx)
    return out


def add_benign_negatives(model: nn.Module, sets: Sets, seed: int, reach: float = 1.0,
                         copies: int = 1) -> None:
    """Attach ``copies`` (>= 1) randomly changed copies of each clean image
    (:func:`random_benign_changes`, strengths widened by ``reach``) as benign negatives for
    fitting, those the model still classifies correctly (a change that breaks the classifier
    is not one the detector should pass)."""
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    n = len(sets.y_clean)
    y = sets.y_clean.repeat(copies)
    x = random_benign_changes(sets.x_clean.repeat(copies, 1, 1, 1), seed, reach)
    keep = (predict(model, x) == y).numpy()
    if keep.any():
        _attach(sets, AdvSet(x[keep], y[keep], np.flatnonzero(keep) % n, len(keep),
                             extract_paths(model, x[keep])))


def _attach(sets: Sets, benign: AdvSet) -> None:
    """Add ``benign`` (with paths) to the benign negatives of ``sets``, after any there."""
    old = sets.benign
    if old is None or old.paths is None:
        sets.benign = benign
        return
    assert benign.paths is not None
    sets.benign = AdvSet(torch.cat([old.x, benign.x]), torch.cat([old.y, benign.y]),
                         np.r_[old.image, benign.image], old.attempts + benign.attempts,
                         PathBatch.concat([old.paths, benign.paths]))


def noisy_like(x_clean: torch.Tensor, x_adv: torch.Tensor, seed: int) -> torch.Tensor:
    """Noisy versions of clean images with the L2 distortion of their adversarial versions.

    x_clean, x_adv: (N, C, H, W) in [0, 1], row i of x_adv made from row i of x_clean. Gaussian
    noise is scaled to ||x_adv - x_clean||_2 per image and the result clipped to [0, 1] (the
    "noisy" negatives of Ma et al. 2018; Lee et al.'s fixed-size noise is in
    :mod:`evaluation.baselines.fit_side`).
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x_clean.shape, generator=g)
    scale = (x_adv - x_clean).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    return (x_clean + noise * scale.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
