"""The LID baseline: Local Intrinsic Dimensionality features of hidden activations, logistic
regression on them.

Ma, Li, Wang, Erfani, Wijewickrema, Schoenebeck, Song, Houle, Bailey, "Characterizing
Adversarial Subspaces Using Local Intrinsic Dimensionality", ICLR 2018 (arXiv 1801.02613;
reference code: github.com/xingjunm/lid_adversarial_subspace_detection).

For an activation vector x and its distances r_1 <= ... <= r_k to the k nearest neighbours among
a minibatch of clean reference activations, the maximum-likelihood estimate (Amsaleg et al.,
KDD 2015) is

    LID(x) = -( (1/k) * sum_{i=1..k} log(r_i / r_k) )^{-1}.

One estimate per layer gives a feature vector; logistic regression then separates adversarial
inputs (positive) from clean and noisy ones (negative). The paper uses k = 20 and minibatches
of 100 on MNIST.

Difference from the reference code: there, an adversarial example is scored against the
minibatch of clean images it was crafted from (dropping its nearest neighbour). Here the
reference minibatches are drawn once from clean fitting images, and a sample is never compared
with its own source image (same group id), so a test input can be scored on its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from evaluation.baselines.activations import LOGITS, PENULTIMATE, collect, encoder
from evaluation.baselines.fit_side import fit_logistic, fit_side
from evaluation.detector_run import DetectorRun
from evaluation.protocol import evaluate_scorer

_TINY = 1e-12


def lid_mle(dist: np.ndarray, k: int) -> np.ndarray:
    """LID estimates from distances.

    dist: (N, M) non-negative distances from N queries to M reference points; ``inf`` marks
    excluded references; each row needs at least k finite entries. Returns (N,) estimates > 0
    (large where the k nearest neighbours are almost equally far; zero distances are clipped).
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    nearest = np.sort(dist, axis=1)[:, :k]
    if not np.isfinite(nearest).all():
        raise ValueError(f"fewer than k={k} finite distances in some row")
    nearest = np.maximum(nearest, _TINY)
    mean_log = np.log(nearest / nearest[:, -1:]).mean(axis=1)  # <= 0
    return -1.0 / np.minimum(mean_log, -_TINY)


class LIDFeatures:
    """Per-layer LID estimates against minibatches of clean reference activations.

    Parameters
    ----------
    k : neighbours used by the estimator (paper: 20).
    batch_size : reference minibatch size (paper: 100); must exceed k.
    seed : fixes the split of the references into minibatches and the minibatch each query
        is scored against (drawn at random per query).
    """

    def __init__(self, k: int = 20, batch_size: int = 100, seed: int = 0) -> None:
        if batch_size <= k:
            raise ValueError(f"batch_size ({batch_size}) must exceed k ({k})")
        self.k = k
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, reference: Mapping[str, torch.Tensor], groups: np.ndarray) -> LIDFeatures:
        """reference: layer -> (R, D) clean activations, R > k; groups: (R,) image ids.

        R is split into R // batch_size minibatches of exactly ``batch_size`` (the rest is
        dropped), or one minibatch of R if R < batch_size.
        """
        self.layers_ = list(reference)
        n = len(groups)
        if n <= self.k + 1:
            raise ValueError(f"need more than k + 1 = {self.k + 1} references, got {n}")
        self._rng = np.random.default_rng(self.seed)
        perm = self._rng.permutation(n)
        count = max(1, n // self.batch_size)
        size = min(n, self.batch_size)
        self.batches_ = [perm[i * size:(i + 1) * size] for i in range(count)]
        self.reference_ = {k: v.float() for k, v in reference.items()}
        self.groups_ = np.asarray(groups)
        return self

    def transform(self, queries: Mapping[str, torch.Tensor], groups: np.ndarray | None = None
                  ) -> np.ndarray:
        """queries: layer -> (N, D) activations; groups: (N,) image ids (references of the same
        image are excluded) or None. Returns (N, L) LID estimates, layers in ``fit`` order."""
        n = len(queries[self.layers_[0]])
        out = np.empty((n, len(self.layers_)))
        batch_of = self._rng.integers(len(self.batches_), size=n)
        for b, members in enumerate(self.batches_):
            q = np.flatnonzero(batch_of == b)
            if len(q) == 0:
                continue
            excluded = (np.zeros((len(q), len(members)), dtype=bool) if groups is None else
                        np.asarray(groups)[q][:, None] == self.groups_[members][None])
            for j, name in enumerate(self.layers_):
                # float64: the matrix-product form of cdist loses small distances in float32
                dist = torch.cdist(queries[name][q].double(),
                                   self.reference_[name][members].double()).numpy()
                dist[excluded] = np.inf
                out[q, j] = lid_mle(dist, self.k)
        return out


def fit_and_evaluate(run: DetectorRun, layers: list[str], k: int, batch: int,
                     max_reference: int, force_open: bool, chunk: int = 256) -> dict[str, Any]:
    """Ma et al. on the run's sets: per-layer LID against minibatches of at most
    ``max_reference`` clean fitting images, logistic regression, evaluated with
    :func:`evaluation.protocol.evaluate_scorer`."""
    names = [*layers, PENULTIMATE, LOGITS]
    encode = encoder(run.model, names, pooled=False, force_open=force_open)
    run.model.eval()
    fit = run.fit
    ref_ids = np.random.default_rng(run.seed).permutation(len(fit.y_clean))[:max_reference]
    lid = LIDFeatures(k=k, batch_size=batch, seed=run.seed).fit(
        collect(encode, fit.x_clean[ref_ids]), ref_ids)

    def features(x: torch.Tensor, groups: np.ndarray | None) -> np.ndarray:
        parts = []
        for i in range(0, len(x), chunk):
            with torch.no_grad():
                acts = encode(x[i:i + chunk])
            parts.append(lid.transform(acts, None if groups is None else groups[i:i + chunk]))
        return np.concatenate(parts)

    side = fit_side(run, with_noisy=True)
    X = features(side.x, side.groups)
    clf = fit_logistic(X, side, run.seed, **run.threshold_rule)
    out = evaluate_scorer(lambda x: clf.positive_score(features(x, None)), clf.threshold_,
                          run.evaluation, run.fitted, run.seed)
    out["details"] = {"layers": names, "k": k, "batch": batch,
                      "reference_images": len(lid.batches_) * len(lid.batches_[0]),
                      "noisy_negatives": int(side.noisy.sum())}
    return out
