"""Synthetic detector features for the estimator tests: a clean and an adversarial Gaussian blob."""

from __future__ import annotations

import numpy as np


def blobs(n_clean: int, n_adv: int, shift: float, seed: int = 0, n_features: int = 3
          ) -> tuple[np.ndarray, np.ndarray]:
    """X (n_clean + n_adv, n_features): clean ~ N(0, 1), adversarial ~ N(shift, 1) in the first
    feature; y: labels 0 (clean, first) / 1 (adversarial)."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n_clean, n_features))
    adv = rng.normal(size=(n_adv, n_features))
    adv[:, 0] += shift
    return np.vstack([clean, adv]), np.r_[np.zeros(n_clean), np.ones(n_adv)].astype(int)
