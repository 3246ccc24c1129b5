"""Detector-aware Square: a black-box attack on the network *and* the path detector.

Square (Andriushchenko et al., ECCV 2020; torchattacks' L-inf version, margin loss) with every
query answered by the real pipeline, whose score is part of every API response: the objective
is :func:`detector_aware_margin`, the class margin while the input is not flagged, else
``max(margin, 0) + logit(score) - logit(threshold)``. Square stops on an input as soon as the
objective is <= 0: misclassified and not flagged.
"""

from __future__ import annotations

import torch
import torchattacks

from detector.bundle import Bundle
from evaluation.adaptive.objectives import class_margin, score_gap


def detector_aware_margin(logits: torch.Tensor, y: torch.Tensor, scores: torch.Tensor,
                          threshold: float) -> torch.Tensor:
    """(B,) objective for a score-based black-box attacker, <= 0 exactly when the input is
    misclassified and not flagged. logits (B, K), y (B,), scores (B,) in [0, 1].

    Not flagged: the class margin ``logit_y - max_{j != y} logit_j``; flagged:
    ``max(margin, 0) + logit(score) - logit(threshold)`` (> 0), continuous at both borders.
    """
    margin = class_margin(logits, y)[0]
    gap = score_gap(scores, threshold).to(logits.dtype)
    flagged = scores > threshold
    return torch.where(flagged, margin.clamp_min(0) + gap.clamp_min(1e-6), margin)


class DetectorAwareSquare(torchattacks.Square):
    r"""torchattacks Square (L-inf, margin loss) on :func:`detector_aware_margin`, each query
    answered by the real pipeline (network, path features, scikit-learn detector).

    Arguments:
        bundle: the attacked pipeline (network, path profile, fitted detector, threshold).
        eps: L-inf budget, pixel units.
        n_queries: query budget per image.
        seed: Square's random seed.

    Shape: images (N, C, H, W) in [0, 1], labels (N,) true classes; output (N, C, H, W).
    """

    def __init__(self, bundle: Bundle, *, eps: float, n_queries: int, seed: int = 0) -> None:
        super().__init__(bundle.model, norm="Linf", eps=eps, n_queries=n_queries,
                         loss="margin", seed=seed, verbose=False)
        self.bundle = bundle

    def margin_and_loss(self, x: torch.Tensor, y: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1], y (B,) true labels -> margin and loss, both (B,)."""
        with torch.inference_mode():
            paths = self.bundle.record(x)
            scored = self.bundle.score_paths(paths)
        m = detector_aware_margin(paths.logits, y, scored.scores,
                                  float(self.bundle.detector.threshold_))
        return m.clone(), m.clone()
