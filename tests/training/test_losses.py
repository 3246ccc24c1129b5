"""Decoupling losses on small hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detector.gating import decouple, gated_layers
from detector.models import create_model
from detector.paths import LayerPath, PathResult, compute_path
from training.losses import (
    DecouplingLoss,
    LossWeights,
    distillation_loss,
    kl_alignment_loss,
    mutual_information_loss,
    sparsity_loss,
)

GATES = torch.tensor([[1.0, 0.0, 1.0, 1.0],
                      [0.0, 0.0, 1.0, 0.0]])  # ||z||_1 = 3 and 1: batch mean 2


@pytest.mark.parametrize(("target", "expected"), [
    (0.0, 2.0),    # plain L1: mean number of open filters
    (0.25, 1.0),   # |2 - 0.25 * 4|
    (0.5, 0.0),    # exactly on target
    (0.75, 1.0),   # |2 - 3|: too few open filters costs as much as too many
])
def test_sparsity_loss(target, expected):
    assert sparsity_loss(GATES, target).item() == pytest.approx(expected)


def test_sparsity_default_target_is_plain_l1():
    assert sparsity_loss(GATES).item() == pytest.approx(2.0)


def test_sparsity_gradient_sign():
    z = GATES.clone().requires_grad_(True)
    sparsity_loss(z, 0.0).backward()
    torch.testing.assert_close(z.grad, torch.full_like(z, 0.5))  # d mean-sum / dz = 1 / B
    z.grad = None
    sparsity_loss(z, 0.75).backward()  # below target: the loss pushes gates open
    torch.testing.assert_close(z.grad, torch.full_like(z, -0.5))


def test_kl_zero_when_distributions_equal():
    pooled = torch.tensor([[0.3, -1.0, 2.0], [0.0, 0.0, 0.0]])
    assert kl_alignment_loss(pooled, pooled.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # softmax is shift invariant: a per-row constant shift is still a zero divergence
    shifted = pooled + torch.tensor([[5.0], [-2.0]])
    assert kl_alignment_loss(pooled, shifted).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_manual_computation():
    pooled = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    gates = torch.tensor([[1.0, 0.0], [1.0, 1.0]])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    total = 0.0
    for p_row, q_row in zip(pooled.tolist(), gates.tolist(), strict=True):
        p, q = softmax(p_row), softmax(q_row)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    got = kl_alignment_loss(pooled, gates).item()
    assert got > 0
    assert got == pytest.approx(total / 2, rel=1e-5)  # averaged over the batch


def test_mi_equals_cross_entropy_of_head():
    head = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0],
                                        [0.0, 1.0, 1.0, 0.0],
                                        [0.0, 0.0, 0.0, 2.0]]))
    y = torch.tensor([0, 2])
    # scores: sample 0 -> [1, 1, 2]; sample 1 -> [0, 1, 0]
    manual = (-math.log(math.e / (2 * math.e + math.e ** 2))
              - math.log(1 / (2 + math.e))) / 2
    got = mutual_information_loss(GATES, head, y)
    assert got.item() == pytest.approx(manual, rel=1e-6)
    torch.testing.assert_close(got, F.cross_entropy(GATES @ head.weight.T, y))


def hand_path():
    torch.manual_seed(0)
    layers = {}
    for name, c in (("l1", 3), ("l2", 5)):
        bits = (torch.rand(4, c) > 0.5).float()
        layers[name] = LayerPath(bits=bits, logits=torch.randn(4, c), pooled=torch.randn(4, c),
                                 dense_macs=1, executed_macs=torch.ones(4))
    return PathResult(logits=torch.randn(4, 6), layers=layers)


def test_decoupling_loss_total_is_weighted_sum():
    path, y = hand_path(), torch.tensor([0, 5, 2, 2])
    w = LossWeights(kl=0.7, mi=0.3, sparse=0.05, target=0.4)
    loss = DecouplingLoss({"l1": 3, "l2": 5}, num_classes=6, weights=w)
    terms = loss(path, y)
    assert set(terms) == {"total", "ce", "kl", "mi", "sparse"}
    heads = dict(zip(loss.names, loss.heads, strict=True))
    assert heads["l1"].weight.shape == (6, 3) and heads["l1"].bias is None
    kl = sum(kl_alignment_loss(p.pooled, p.bits) for p in path.layers.values())
    mi = sum(mutual_information_loss(p.bits, heads[n], y) for n, p in path.layers.items())
    sparse = sum(sparsity_loss(p.bits, 0.4) for p in path.layers.values())
    ce = F.cross_entropy(path.logits, y)
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["mi"], mi)
    torch.testing.assert_close(terms["sparse"], sparse)
    torch.testing.assert_close(terms["total"], ce + 0.7 * kl + 0.3 * mi + 0.05 * sparse)
    assert terms["sparse"] > 0 and terms["kl"] > 0


def test_decoupling_loss_trains_gates_and_heads():
    model = decouple(create_model("small_cnn", in_channels=1, width=8)).train()
    layers = gated_layers(model)
    loss = DecouplingLoss({n: m.conv.out_channels for n, m in layers.items()}, 10, LossWeights())
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss(compute_path(model, x), y)["total"].backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in loss.heads)
    assert all(m.control.fc2.weight.grad.abs().sum() > 0 for m in layers.values())


def test_detached_kl_moves_only_the_gates():
    pooled = torch.randn(4, 6, requires_grad=True)
    gates = torch.rand(4, 6, requires_grad=True)
    kl_alignment_loss(pooled, gates, detach_target=True).backward()
    assert pooled.grad is None
    assert gates.grad is not None and gates.grad.abs().sum() > 0
    torch.testing.assert_close(kl_alignment_loss(pooled, gates, detach_target=True),
                               kl_alignment_loss(pooled, gates))


def test_distillation_loss_hand_computed():
    teacher = torch.tensor([[2.0, 0.0]])
    student = torch.tensor([[0.0, 0.0]])
    # T = 2: teacher probabilities softmax([1, 0]) = (e, 1) / (e + 1), student (1/2, 1/2)
    p = torch.tensor([math.e, 1.0]) / (math.e + 1)
    manual = 4 * float((p * (p / 0.5).log()).sum())
    assert distillation_loss(student, teacher, 2.0).item() == pytest.approx(manual, rel=1e-6)
    assert distillation_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_mixes_into_the_task_term():
    path, y = hand_path(), torch.tensor([0, 5, 2, 2])
    teacher = torch.randn(4, 6)
    w = LossWeights(kl=0.7, mi=0.3, sparse=0.05, target=0.4, distill=0.75, temperature=3.0)
    loss = DecouplingLoss({"l1": 3, "l2": 5}, num_classes=6, weights=w)
    terms = loss(path, y, teacher)
    kd = distillation_loss(path.logits, teacher, 3.0)
    torch.testing.assert_close(terms["distill"], kd)
    rest = 0.7 * terms["kl"] + 0.3 * terms["mi"] + 0.05 * terms["sparse"]
    torch.testing.assert_close(terms["total"], 0.25 * terms["ce"] + 0.75 * kd + rest)
    with pytest.raises(ValueError, match="teacher"):
        loss(path, y)


def test_isolated_gates_do_not_train_the_layers_before_them():
    torch.manual_seed(0)
    model = decouple(create_model("small_cnn", in_channels=1, width=8)).train()
    layers = gated_layers(model)
    for m in layers.values():  # FC1 starts at zero (input-independent gates): as if trained
        torch.nn.init.normal_(m.control.fc1.weight)
    loss = DecouplingLoss({n: m.conv.out_channels for n, m in layers.items()}, 10,
                          LossWeights(kl=0.0, mi=1.0, sparse=1.0, target=0.5))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    grads = {}
    for isolate in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same gate noise in both passes
        terms = loss(compute_path(model, x, detach_gate_input=isolate), y)
        (terms["mi"] + terms["sparse"]).backward()
        grads[isolate] = [c.weight.grad for c in convs]
        assert all(m.control.fc2.weight.grad.abs().sum() > 0 for m in layers.values())
    # the stem conv feeds the first gate: reached only when the gates are not isolated
    assert grads[False][0] is not None and grads[False][0].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for g in grads[True])


def test_class_heads_round_trip_and_refuse_other_shapes():
    loss = DecouplingLoss({"l1": 3, "l2": 5}, num_classes=6, weights=LossWeights())
    other = DecouplingLoss({"l1": 3, "l2": 5}, num_classes=6, weights=LossWeights())
    other.load_class_heads(loss.class_heads())
    for a, b in zip(loss.heads, other.heads, strict=True):
        torch.testing.assert_close(a.weight, b.weight)
    with pytest.raises(ValueError, match=r"'l2'.*\(6, 5\).*\(6, 4\)"):
        other.load_class_heads({"l1": torch.zeros(6, 3), "l2": torch.zeros(6, 4)})
    with pytest.raises(ValueError, match=r"'l2'.*got None"):
        other.load_class_heads({"l1": torch.zeros(6, 3)})
