"""Whether an attack on the detector succeeded, judged by the real pipeline.

An adversarial input *evades* when the network misclassifies it and the bundle's detector does
not flag it (:func:`evades`). Success is always judged by the shipped pipeline
(:meth:`detector.bundle.Bundle.analyze`: the bundle's features, scikit-learn detector and
threshold), never by an attacker's differentiable stand-in. :func:`judge` also judges each input
again after :func:`quantize_towards` has rounded its perturbation to the 1/255 grid: what an
8-bit image upload (PNG) can carry.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from detector.bundle import Bundle


def evades(predictions: np.ndarray, flagged: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) bool: misclassified and not flagged. predictions (N,) predicted classes, flagged
    (N,) bool detector verdicts, labels (N,) true classes."""
    return (predictions != labels) & ~flagged


def quantize_towards(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """x_adv with its perturbation rounded towards zero onto the 1/255 grid (x on the grid):
    still inside the same L-inf ball; (N, C, H, W) in [0, 1]."""
    delta = torch.trunc((x_adv - x) * 255.0 + 1e-4 * torch.sign(x_adv - x)) / 255.0
    return (x + delta).clamp(0.0, 1.0)


def judge(bundle: Bundle, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
          batch_size: int = 500) -> dict[str, Any]:
    """Real-pipeline verdicts on x_adv (N, C, H, W) in [0, 1] made from x with labels y (N,).

    Returns the per-input success mask (``"success"``, (N,) bool: :func:`evades`), and rates
    over the N inputs: misclassified, evaded (= success), evaded_8bit (success after
    :func:`quantize_towards`), and the largest L-inf perturbation.
    """
    def verdicts(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        preds, flags = [], []
        for i in range(0, len(images), batch_size):
            a = bundle.analyze(images[i:i + batch_size])
            preds.append(a.predictions)
            flags.append(a.flagged)
        return np.concatenate(preds), np.concatenate(flags)

    labels = y.numpy()
    preds, flagged = verdicts(x_adv)
    ok = evades(preds, flagged, labels)
    qp, qf = verdicts(quantize_towards(x, x_adv))
    return {"success": ok, "n": len(y), "misclassified": float((preds != labels).mean()),
            "evaded": float(ok.mean()), "evaded_8bit": float(evades(qp, qf, labels).mean()),
            "linf": float((x_adv - x).abs().amax().item()) if len(y) else 0.0}
