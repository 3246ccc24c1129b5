"""The decoupled checkpoints committed under models/ load, and run sparsely as they run masked."""

import json
import math
from pathlib import Path

import pytest
import torch

from detector.checkpoint import load_checkpoint
from detector.paths import compute_path
from detector.sparse import sparse_execution

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted(p.parent for p in (ROOT / "models").glob("*/decoupled/model.json"))


def test_models_are_committed():
    assert {p.parent.name for p in COMMITTED} >= {"mnist", "mnist_wide", "cifar10"}


@pytest.mark.parametrize("run", COMMITTED, ids=lambda p: p.parent.name)
def test_committed_model_sparse_equals_masked(run):
    model, spec = load_checkpoint(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert spec.decoupled and 0.0 < metrics["flops_fraction"] < 1.0
    x = torch.rand(8, *spec.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = compute_path(model, x)
        for batch in (1, 8):
            with sparse_execution(math.inf):  # every layer sliced
                parts = [compute_path(model, x[i:i + batch]) for i in range(0, 8, batch)]
            logits = torch.cat([p.logits for p in parts])
            torch.testing.assert_close(logits, masked.logits, atol=1e-4, rtol=1e-4)
            for name, layer in masked.layers.items():
                assert torch.equal(torch.cat([p.layers[name].bits for p in parts]),
                                   layer.bits), name
