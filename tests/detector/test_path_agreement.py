"""detector.path_agreement: identical paths, ties within rounding of 0, mismatches."""

import math

import pytest
import torch

from detector.checkpoint import ModelSpec
from detector.path_agreement import TIE, PathAgreement, sparse_agreement
from detector.paths import LayerPath, PathResult


def result(logits: torch.Tensor, gate_logits: list[list[list[float]]]) -> PathResult:
    """A PathResult with the given class logits (B, K) and, per layer, gate logits (B, C)."""
    layers = {}
    for i, g in enumerate(gate_logits):
        g = torch.tensor(g)
        layers[f"l{i}"] = LayerPath(bits=(g > 0).float(), logits=g, pooled=None, dense_macs=1,
                                    executed_macs=torch.ones(g.shape[0]))
    return PathResult(logits=logits, layers=layers)


def test_same_ties_and_mismatches_by_first_differing_layer():
    # layer 0 scale 2.0, layer 1 scale 4.0; three inputs
    ref = result(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
                 [[[2.0, -1.0], [1e-5, 1.0], [1.0, 1.0]],
                  [[4.0, -1.0], [1.0, 1.0], [1.0, -1.0]]])
    # input 0: identical path; input 1: flips a gate of layer 0 with |G| / scale = 5e-6 < TIE
    # (a tie), and later a big one in layer 1 (ignored: only the first difference counts);
    # input 2: same layer 0, flips |G| = 1 of scale 4 in layer 1 (a mismatch)
    got = result(torch.tensor([[1.5, 0.0], [1.0, 0.0], [1.0, 0.0]]),
                 [[[2.0, -1.0], [-1e-5, 1.0], [1.0, 1.0]],
                  [[4.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]])
    agreement = PathAgreement()
    agreement.add(ref, got)
    assert 1e-5 / 2.0 < TIE < 1.0 / 4.0
    assert (agreement.images, agreement.same_path, agreement.ties, agreement.mismatches) == (
        3, 1, 1, 1)
    assert agreement.same_pred == 2  # input 1 changed its class
    assert agreement.max_diff == pytest.approx(0.5)  # over input 0, the one with the same path
    agreement.add(ref, ref)  # counts accumulate over batches
    assert (agreement.images, agreement.same_path, agreement.same_pred) == (6, 4, 5)
    assert agreement.line().startswith("same path 4/6, 1 differ from a gate within rounding of 0")


def test_sparse_agrees_with_masked_on_a_decoupled_network():
    torch.manual_seed(0)
    model = ModelSpec("small_cnn", (1, 8, 8), tuple("0123456789"), decoupled=True,
                      arch_kwargs={"width": 8}).build().eval()
    images = torch.rand(10, 1, 8, 8)
    for batch in (1, 4):
        agreement, work = sparse_agreement(model, images, batch)
        assert agreement.images == 10 and agreement.mismatches == 0
        assert agreement.same_pred == 10 and agreement.max_diff < 1e-4
        assert work.sliced_calls == math.ceil(10 / batch) * 3 and work.dense_calls == 0
    _, never = sparse_agreement(model, images, 5, dense_above=0.0)
    assert never.sliced_calls == 0 and never.executed_fraction == 1.0
    with pytest.raises(ValueError, match="batch"):
        sparse_agreement(model, images, 0)
