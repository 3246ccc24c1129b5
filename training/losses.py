"""Decoupling losses of Li et al. (ECCV 2020), METHOD.md section 3, summed over gated layers.

total = CE(logits, y) + lambda_k * KL + lambda_m * MI + lambda_s * SPARSE

With a teacher (the base network), the cross-entropy term becomes Hinton et al.'s distillation
mix (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T); not part of the paper's recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from detector.paths import PathResult


def mutual_information_loss(gates: torch.Tensor, head: nn.Linear, y: torch.Tensor) -> torch.Tensor:
    """Variational MI bound: CE of a bias-free linear classifier q(y | z) on the gates.

    gates: (B, C) in [0, 1]; head: C -> K without bias; y: (B,) labels. Returns a scalar.
    """
    return F.cross_entropy(head(gates), y)


def softmax_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)) over dim 1, averaged over the batch; both (B, C)."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.softmax(target, dim=1), reduction="batchmean")


def kl_alignment_loss(pooled: torch.Tensor, gates: torch.Tensor,
                      detach_target: bool = False) -> torch.Tensor:
    """KL(softmax(pooled) || softmax(gates)) over channels, averaged over the batch.

    pooled: (B, C) global average of the layer output before masking; gates: (B, C).
    ``detach_target`` treats the layer output as a fixed target, so only the gates move.
    """
    return softmax_kl(pooled.detach() if detach_target else pooled, gates)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    student, teacher: (B, K) logits; the teacher is treated as a constant. Returns a scalar >= 0.
    """
    t = temperature
    return softmax_kl(teacher.detach().float() / t, student.float() / t) * t * t


def sparsity_loss(gates: torch.Tensor, target: float = 0.0) -> torch.Tensor:
    """| mean over batch of ||z||_1 - target * C |; gates: (B, C); target in [0, 1)."""
    return (gates.sum(dim=1).mean() - target * gates.shape[1]).abs()


@dataclass(frozen=True)
class LossWeights:
    """lambda_k (KL), lambda_m (MI), lambda_s (sparsity), target (active-channel ratio);
    distill = alpha in [0, 1], the share of the cross-entropy term given to matching a teacher's
    softened outputs at ``temperature``; label_smoothing in [0, 1) of the cross-entropy."""

    kl: float = 1.0
    mi: float = 0.01
    sparse: float = 1.5e-4
    target: float = 0.0
    kl_detach: bool = False  # KL moves only the gates, not the conv features
    distill: float = 0.0
    temperature: float = 4.0
    label_smoothing: float = 0.0  # of the cross-entropy term


class DecouplingLoss(nn.Module):
    """Cross-entropy plus the three decoupling terms; owns the per-layer MI classifiers.

    layers: gated layer name -> its number of filters. The heads (q(y | z^l), one bias-free
    linear classifier per gated layer) are kept with the checkpoint (:meth:`class_heads`), so the
    detector can read each layer's class evidence.
    """

    def __init__(self, layers: dict[str, int], num_classes: int, weights: LossWeights) -> None:
        super().__init__()
        self.weights = weights
        self.names = list(layers)
        self.heads = nn.ModuleList(nn.Linear(c, num_classes, bias=False) for c in layers.values())

    def class_heads(self) -> dict[str, torch.Tensor]:
        """Gated layer name -> (K, C) weight of its MI head (detached)."""
        return {n: h.weight.detach() for n, h in zip(self.names, self.heads, strict=True)}

    def load_class_heads(self, heads: Mapping[str, torch.Tensor]) -> None:
        """Start from saved heads (layer -> (K, C)); a missing or mis-shaped one is a ValueError."""
        for name, head in zip(self.names, self.heads, strict=True):
            if name not in heads or heads[name].shape != head.weight.shape:
                got = None if name not in heads else tuple(heads[name].shape)
                raise ValueError(f"class head of layer {name!r}: expected "
                                 f"{tuple(head.weight.shape)}, got {got}")
            with torch.no_grad():
                head.weight.copy_(heads[name])

    def forward(self, path: PathResult, y: torch.Tensor,
                teacher: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms (scalars): ce, kl, mi, sparse (and distill) and their weighted total.

        teacher: (B, K) logits of the network being decoupled, required when
        ``weights.distill > 0``.
        """
        zero = path.logits.new_zeros(())
        kl, mi, sparse = zero, zero, zero
        for name, head in zip(self.names, self.heads, strict=True):
            layer = path.layers[name]
            kl = kl + kl_alignment_loss(layer.pooled, layer.bits, self.weights.kl_detach)
            mi = mi + mutual_information_loss(layer.bits, head, y)
            sparse = sparse + sparsity_loss(layer.bits, self.weights.target)
        ce = F.cross_entropy(path.logits, y, label_smoothing=self.weights.label_smoothing)
        w = self.weights
        terms = {"ce": ce, "kl": kl, "mi": mi, "sparse": sparse}
        task = ce
        if w.distill > 0:
            if teacher is None:
                raise ValueError("distillation weight > 0 needs the teacher's logits")
            terms["distill"] = distillation_loss(path.logits, teacher, w.temperature)
            task = (1 - w.distill) * ce + w.distill * terms["distill"]
        terms["total"] = task + w.kl * kl + w.mi * mi + w.sparse * sparse
        return terms
