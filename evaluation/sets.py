"""The sets an evaluation runs on: clean images with their computation paths, and successful
adversarial (or benign) versions of them, by attack label; their flat-array form in
``adversarial.npz``.

Images are (N, C, H, W) float32 in [0, 1]; labels (N,) int64; paths
:class:`detector.features.PathBatch` computed in eval mode with ``pooled=False``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from detector.features import PathBatch
from detector.stability import record_paths, transformed


def extract_paths(model: nn.Module, x: torch.Tensor, batch_size: int = 256,
                  stability: Sequence[str] = ()) -> PathBatch:
    """Paths of x: (N, C, H, W) in [0, 1], in eval mode, without gradients; with the companion
    paths of the ``stability`` transforms (:mod:`detector.stability`) attached."""
    model.eval()
    with torch.inference_mode():
        parts = [record_paths(model, x[i:i + batch_size], stability)
                 for i in range(0, len(x), batch_size)]
    return PathBatch.concat(parts)


def attach_stability(model: nn.Module, sets: Sets, stability: Sequence[str],
                     batch_size: int = 256) -> None:
    """Attach the companion paths of the ``stability`` transforms (:mod:`detector.stability`)
    to every path batch of ``sets`` (clean, adversarial, benign, threshold) that has none yet,
    computed from their images; the sets' own paths are kept, not recomputed."""
    sets.clean_paths = paths_with_companions(model, sets.x_clean, sets.clean_paths, stability,
                                             batch_size)
    for s in [*sets.adversarial.values(), *([sets.benign] if sets.benign else [])]:
        if s.paths is not None:
            s.paths = paths_with_companions(model, s.x, s.paths, stability, batch_size)
    if sets.threshold is not None:
        attach_stability(model, sets.threshold, stability, batch_size)


def paths_with_companions(model: nn.Module, x: torch.Tensor, paths: PathBatch,
                          stability: Sequence[str], batch_size: int = 256) -> PathBatch:
    """``paths`` (of x: (N, C, H, W) in [0, 1]) with the companions of the ``stability``
    transforms they lack: one pass of each transformed copy of x, in batches."""
    missing = [t for t in stability if t not in paths.companions]
    return paths.with_companions(
        {t: extract_paths(model, transformed(t, x), batch_size) for t in missing})


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N,) predicted classes of x: (N, C, H, W) in [0, 1], in eval mode."""
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def correct_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the model classifies correctly, and their labels."""
    keep = predict(model, x) == y
    return x[keep], y[keep]


@dataclass
class AdvSet:
    """Successful adversarial examples: x (M, C, H, W), true labels y (M,), source image index
    into the clean set (M,), the number of attempts, and their paths."""

    x: torch.Tensor
    y: torch.Tensor
    image: np.ndarray
    attempts: int
    paths: PathBatch | None = None


@dataclass
class Sets:
    """Clean images (correctly classified) with their paths, and adversarial sets by label."""

    x_clean: torch.Tensor
    y_clean: torch.Tensor
    clean_paths: PathBatch
    adversarial: dict[str, AdvSet] = field(default_factory=dict)
    benign: AdvSet | None = None  # benign changes of the clean images, fitted as negatives
    threshold: Sets | None = None  # further clean images, never fitted: they only set the threshold

    @property
    def attempts(self) -> dict[str, int]:
        """Attempted attacks by label (successful ones are in ``adversarial``)."""
        return {label: s.attempts for label, s in self.adversarial.items()}


def source_images(x_adv: torch.Tensor, y_adv: torch.Tensor, x_clean: torch.Tensor,
                  y_clean: torch.Tensor) -> np.ndarray:
    """(M,) index of the clean image each adversarial example was made from.

    x_adv: (M, C, H, W), x_clean: (N, C, H, W) in [0, 1]; the source is the L2-nearest clean
    image of the same true class (attacks keep it within a small distance). For files written
    before ``adversarial.npz`` stored the source indices.
    """
    if len(x_adv) == 0:
        return np.zeros(0, dtype=np.int64)
    dist = torch.cdist(x_adv.flatten(1).double(), x_clean.flatten(1).double())  # (M, N)
    dist[y_adv[:, None] != y_clean[None, :]] = torch.inf
    return dist.argmin(dim=1).numpy()


def sets_to_arrays(sets: Sets, prefix: str) -> dict[str, np.ndarray]:
    """Flat arrays of one side for ``adversarial.npz`` (inverse: :func:`sets_from_arrays`)."""
    arrays = {f"{prefix}_clean_x": sets.x_clean.numpy(), f"{prefix}_clean_y": sets.y_clean.numpy()}
    for i, (label, s) in enumerate(sets.adversarial.items()):
        arrays[f"{prefix}_adv{i}_x"] = s.x.numpy()
        arrays[f"{prefix}_adv{i}_y"] = s.y.numpy()
        arrays[f"{prefix}_adv{i}_label"] = np.array(label)
        arrays[f"{prefix}_adv{i}_image"] = s.image  # source index into the clean images
        arrays[f"{prefix}_adv{i}_attempts"] = np.array(s.attempts)
    return arrays


def sets_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str, model: nn.Module) -> Sets:
    """One side of an ``adversarial.npz``, with paths recomputed by ``model``.

    Files from before source indices and attempts were stored get image -1 and, for the
    evaluation side, attempts = the number of clean images (every attack ran on every image).
    """
    x = torch.from_numpy(arrays[f"{prefix}_clean_x"])
    y = torch.from_numpy(arrays[f"{prefix}_clean_y"])
    sets = Sets(x, y, extract_paths(model, x))
    i = 0
    while f"{prefix}_adv{i}_x" in arrays:
        xa = torch.from_numpy(arrays[f"{prefix}_adv{i}_x"])
        ya = torch.from_numpy(arrays[f"{prefix}_adv{i}_y"])
        image = np.asarray(arrays.get(f"{prefix}_adv{i}_image", np.full(len(ya), -1)))
        attempts = int(arrays.get(f"{prefix}_adv{i}_attempts", len(y)))
        sets.adversarial[str(arrays[f"{prefix}_adv{i}_label"])] = AdvSet(
            xa, ya, image, attempts, extract_paths(model, xa) if len(ya) else None)
        i += 1
    return sets
