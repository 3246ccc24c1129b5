"""Adversarial sets, their computation paths, and the evaluation of one detector variant."""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from detector.estimator import PathDetector
from detector.features import PathBatch, PathProfile
from detector.paths import compute_path
from evaluation.attacks import AttackSpec, craft
from training.evaluation import detection_metrics


def split_by_image(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the fitting and the evaluation half of a test split of ``n`` images: a
    permutation seeded by ``seed``, cut in two; no image is on both sides."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm[:half], perm[half:]


def extract_paths(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> PathBatch:
    """Paths of x: (N, C, H, W) in [0, 1], in eval mode, without gradients."""
    model.eval()
    with torch.inference_mode():
        parts = [PathBatch.from_result(compute_path(model, x[i:i + batch_size], pooled=False))
                 for i in range(0, len(x), batch_size)]
    return PathBatch.concat(parts)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N,) predicted classes."""
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


def assign_attacks(n: int, specs: list[AttackSpec], *, seed: int,
                   per_image: int | None) -> dict[str, np.ndarray]:
    """Indices into n images that each attack runs on, by attack label: all n for
    ``per_image=None``, else each image gets ``per_image`` distinct attacks drawn with one
    generator seeded by ``seed`` (so the draw does not depend on who crafts the attacks)."""
    if per_image is None:
        return {s.label: np.arange(n) for s in specs}
    rng = np.random.default_rng(seed)
    k = min(per_image, len(specs))
    choice = np.stack([rng.choice(len(specs), k, replace=False) for _ in range(n)])
    return {s.label: np.flatnonzero((choice == i).any(1)) for i, s in enumerate(specs)}


def craft_set(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: AttackSpec,
              idx: np.ndarray, *, seed: int, square_queries: int) -> AdvSet:
    """Attack the images ``x[idx]`` (x: (N, C, H, W) in [0, 1], y: (N,), idx non-empty) with
    ``spec`` seeded by ``seed``; keep the successful ones with their paths. The result depends
    only on the arguments, not on what was crafted before (each attack reseeds torch)."""
    adv = craft(spec, model, x[idx], y[idx], seed=seed, square_queries=square_queries)
    ok = (predict(model, adv) != y[idx]).numpy()
    s = AdvSet(adv[ok], y[idx][ok], idx[ok], len(idx))
    s.paths = extract_paths(model, s.x) if ok.any() else None
    return s


def craft_sets(model: nn.Module, x: torch.Tensor, y: torch.Tensor, specs: list[AttackSpec], *,
               seed: int, per_image: int | None, square_queries: int) -> Sets:
    """Attack the images; ``per_image=None`` runs every attack on every image, else each image
    gets ``per_image`` distinct attacks drawn at random. Failed attacks are dropped.

    One process; :mod:`training.distributed_crafting` makes the same sets across ranks."""
    assigned = assign_attacks(len(y), specs, seed=seed, per_image=per_image)
    sets = Sets(x, y, extract_paths(model, x))
    for spec in specs:
        idx = assigned[spec.label]
        if len(idx) == 0:
            continue
        sets.adversarial[spec.label] = craft_set(model, x, y, spec, idx, seed=seed,
                                                 square_queries=square_queries)
    return sets


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


def evaluate_variant(detector: PathDetector, profile: PathProfile, raw: bool, fit: Sets,
                     evaluation: Sets, shifts: dict[str, PathBatch], y_eval: np.ndarray,
                     fitted: set[str], seed: int) -> dict[str, Any]:
    """Fit ``detector`` on the fitting sets and measure it on the evaluation sets."""
    prof = PathProfile(profile.layers, include_raw=raw)
    advs = [s for s in fit.adversarial.values() if s.paths is not None]
    if not advs:
        raise ValueError("no fitting attack succeeded; use stronger --fit-attacks")
    negatives = [fit.clean_paths] + ([fit.benign.paths] if fit.benign is not None else [])
    n_clean = len(fit.y_clean)
    n_benign = len(fit.benign.y) if fit.benign is not None else 0
    X = torch.cat([*(prof.transform(p) for p in negatives),
                   *(prof.transform(s.paths) for s in advs)]).numpy()
    y = np.r_[np.zeros(n_clean + n_benign), *(np.ones(len(s.y)) for s in advs)]
    groups = np.r_[np.arange(n_clean), fit.benign.image if fit.benign is not None else [],
                   *(s.image for s in advs)]
    eligible = np.r_[np.ones(n_clean, bool), np.zeros(len(y) - n_clean, bool)]
    detector.fit(X, y, groups=groups, threshold_mask=eligible)  # threshold on clean only

    def scores(paths: PathBatch) -> np.ndarray:
        return detector.predict_proba(prof.transform(paths).numpy())[:, 1]

    t = detector.threshold_
    clean = scores(evaluation.clean_paths)
    attacks, adv_scores = {}, {}
    for label, s in evaluation.adversarial.items():
        a = scores(s.paths) if s.paths is not None else np.empty(0)
        adv_scores[label] = a
        attacks[label] = {"fitted": label in fitted, "success": len(s.y) / max(s.attempts, 1),
                          **detection_metrics(clean, a, t, seed)}
    measured = {k: v for k, v in attacks.items() if v.get("n_adv", 0) > 0}
    worst_auc = min(measured, key=lambda k: measured[k]["auroc"])
    worst_tpr = min(measured, key=lambda k: measured[k]["tpr_at_5"])
    benign = {}
    for label, paths in shifts.items():
        benign[label] = {"flagged": float((scores(paths) > t).mean()),
                         "accuracy": float((paths.logits.argmax(1).numpy() == y_eval).mean())}
    return {
        "clean_fpr": float((clean > t).mean()),
        "attacks": attacks,
        "worst": {"auroc": measured[worst_auc]["auroc"], "auroc_attack": worst_auc,
                  "tpr_at_5": measured[worst_tpr]["tpr_at_5"], "tpr_at_5_attack": worst_tpr},
        "benign": benign,
        "scores": {"clean": clean, "attacks": adv_scores},
    }


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
