"""The architecture control module of a gated layer: gate logits from the layer's input.

Li et al., "Interpretable Neural Network Decoupling" (ECCV 2020), METHOD.md section 1: a
squeeze-excitation-like bottleneck reads the global average of a conv layer's *input* and
decides, before the convolution runs, which output filters are open; the logits become bits in
:mod:`detector.semhash`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ControlModule(nn.Module):
    """G(s) = FC2(ReLU(FC1(GAP(x)))): gate logits for ``out_channels`` filters.

    Initialised as in the authors' code, so that the gates start input-independent and
    open-biased: FC1.weight = 0, FC1.bias = 1, FC2 Kaiming-normal, FC2.bias = 1, hence every
    logit is 1 + rowsum(FC2.weight) (about three quarters of the gates start open).
    ``initial_logit`` replaces that FC2 bias of 1: every logit starts at
    ``initial_logit + rowsum(FC2.weight)`` (std sqrt(2) with Kaiming weights), so 4 starts about
    99.8 % of the gates open and lets the sparsity term close them gradually instead of a random
    quarter from the first step (what a base with little accuracy margin needs).

    ``normalize_input=True`` standardises s = GAP(x) per channel (batch statistics in training,
    running ones at inference; no learnt scale) before FC1. Not in the paper: where the pooled
    inputs differ little between images relative to their scale (airbench: class means spread
    by 0.03-0.08 around 0.07-0.38), FC1 starting at zero needs many steps to make the gates
    input-dependent, and the sparsity term closes a fixed set of filters first.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4,
                 normalize_input: bool = False, initial_logit: float = 1.0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_channels, affine=False) if normalize_input else None
        hidden = max(in_channels // reduction, 4)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, out_channels)
        nn.init.zeros_(self.fc1.weight)
        nn.init.ones_(self.fc1.bias)
        nn.init.kaiming_normal_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, initial_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C_in, H, W) layer input -> (B, C_out) real-valued gate logits."""
        s = x.mean(dim=(2, 3))  # (B, C_in)
        if self.norm is not None:
            s = self.norm(s)
        return self.fc2(F.relu(self.fc1(s)))
