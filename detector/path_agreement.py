"""Whether two executions of a gated network take the same computation path on the same inputs.

Sparse execution (:mod:`detector.sparse`) computes the masked network's logits with another
summation order, so a gate whose logit is within float rounding of 0 may fall on the other side:
both results are then right. :class:`PathAgreement` counts, per input, whether the paths are
identical, differ first at such a tie (``|G| < TIE x`` the layer's largest ``|G|``), or differ
first at any other gate (a bug); :func:`sparse_agreement` runs that comparison of sparse against
masked execution on a set of images (``benchmarks/speed.py`` reports it on test sets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from detector.paths import PathResult, compute_path
from detector.sparse import SparseStats, sparse_execution

TIE = 1e-4
"""A gate logit below TIE x (the layer's largest |logit|) is within float rounding of 0."""


@dataclass
class PathAgreement:
    """Two executions over ``images`` inputs; a path differs from its first differing layer on.

    same_path: inputs with identical gate bits everywhere.
    ties: inputs whose first difference is a gate whose logit is within rounding of 0 (|G| <
        TIE x layer scale, the scale taken from the reference): both results are right.
    mismatches: inputs whose first difference is any other gate (a bug).
    same_pred: inputs with the same predicted class; max_diff: max |logit difference| over the
        inputs with the same path (0 when none).
    """

    images: int = 0
    same_path: int = 0
    ties: int = 0
    mismatches: int = 0
    same_pred: int = 0
    max_diff: float = 0.0

    def add(self, ref: PathResult, got: PathResult) -> None:
        """Count one batch: ``ref`` and ``got`` are results for the same B inputs, same layers."""
        first = torch.full((ref.logits.shape[0],), -1.0)  # (B,) relative |G| of the first flip
        for name, r in ref.layers.items():
            flip = r.bits != got.layers[name].bits  # (B, C)
            scale = float(r.logits.abs().max()) or 1.0
            size = torch.where(flip, r.logits.abs() / scale, torch.zeros_like(r.logits))
            new = (first < 0) & flip.any(dim=1)
            first[new] = size[new].amax(dim=1)
        same = first < 0
        self.images += len(first)
        self.same_path += int(same.sum())
        self.ties += int(((first >= 0) & (first < TIE)).sum())
        self.mismatches += int((first >= TIE).sum())
        self.same_pred += int((ref.logits.argmax(1) == got.logits.argmax(1)).sum())
        if same.any():
            diff = float((ref.logits[same] - got.logits[same]).abs().max())
            self.max_diff = max(self.max_diff, diff)

    def line(self) -> str:
        """One line for a report."""
        return (f"same path {self.same_path}/{self.images}, {self.ties} differ from a gate within "
                f"rounding of 0, {self.mismatches} otherwise; same prediction "
                f"{self.same_pred}/{self.images}; max |logit diff| {self.max_diff:.1e}")


def sparse_agreement(model: nn.Module, images: torch.Tensor, batch: int,
                     dense_above: float = math.inf) -> tuple[PathAgreement, SparseStats]:
    """Sparse against masked execution of ``model`` (eval mode) on ``images`` (N, C, H, W) in
    [0, 1], in batches of ``batch`` >= 1 run the same way in both modes (batch composition
    changes the rounding of the dense convs too). ``dense_above``: as in
    :func:`~detector.sparse.sparse_execution` (default: every layer call sliced, so at batch 1
    each input runs exactly its own path). Returns the agreement and the work of the sparse
    runs, summed."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    agreement, work = PathAgreement(), SparseStats()
    with torch.inference_mode():
        for i in range(0, images.shape[0], batch):
            x = images[i:i + batch]
            ref = compute_path(model, x, pooled=False)
            with sparse_execution(dense_above) as stats:
                agreement.add(ref, compute_path(model, x, pooled=False))
            work.add(stats)
    return agreement, work
