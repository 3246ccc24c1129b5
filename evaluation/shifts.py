"""Benign changes of clean images: noisy negatives for fitting, and the shifts (Gaussian noise,
JPEG) a deployed detector must not flag.

Images are (N, C, H, W) float32 in [0, 1]; every change stays in [0, 1] and keeps the label.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import nn

from evaluation.sets import AdvSet, Sets, extract_paths


def add_noise_negatives(model: nn.Module, sets: Sets, seed: int) -> None:
    """Attach Gaussian-noise copies of the clean images as benign negatives for fitting.

    Each image gets its own sigma, uniform in [0.01, 0.1] for grey and [0.005, 0.04] for colour
    images (a range, so that no single evaluated shift is fitted exactly).
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0.01, 0.1) if sets.x_clean.shape[1] == 1 else (0.005, 0.04)
    sigma = lo + (hi - lo) * torch.rand(len(sets.y_clean), 1, 1, 1, generator=g)
    x = (sets.x_clean + sigma * torch.randn(sets.x_clean.shape, generator=g)).clamp(0, 1)
    image = np.arange(len(sets.y_clean))
    sets.benign = AdvSet(x, sets.y_clean, image, len(image), extract_paths(model, x))


def noisy_like(x_clean: torch.Tensor, x_adv: torch.Tensor, seed: int) -> torch.Tensor:
    """Noisy versions of clean images with the L2 distortion of their adversarial versions.

    x_clean, x_adv: (N, C, H, W) in [0, 1], row i of x_adv made from row i of x_clean. Gaussian
    noise is scaled to ||x_adv - x_clean||_2 per image and the result clipped to [0, 1] (the
    "noisy" negatives of Ma et al. 2018 and Lee et al. 2018).
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x_clean.shape, generator=g)
    scale = (x_adv - x_clean).flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)
    return (x_clean + noise * scale.view(-1, 1, 1, 1)).clamp(0.0, 1.0)


def benign_shifts(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Benign changes of clean images: Gaussian noise and JPEG re-encoding (quality 75)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.05 if x.shape[1] == 1 else 0.02
    noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)
    return {f"gaussian noise sigma={sigma}": noisy, "JPEG quality 75": jpeg(x, 75)}


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Re-encode each image of x: (N, C, H, W) in [0, 1] as JPEG and decode it again."""
    out = []
    mode = "L" if x.shape[1] == 1 else "RGB"
    for img in (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode).save(
            buf, "JPEG", quality=quality)
        arr = np.asarray(Image.open(buf).convert(mode), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr.reshape(img.shape)).permute(2, 0, 1))
    return torch.stack(out)
