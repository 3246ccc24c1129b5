"""Checkpoints: safetensors weights + model.json, strict loading, clear errors."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from detector.checkpoint import (
    SPEC_FILE,
    WEIGHTS_FILE,
    ModelSpec,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from detector.gating import gated_layers
from detector.paths import compute_path


def spec(decoupled=False):
    return ModelSpec(arch="small_cnn", input_shape=(1, 8, 8), classes=tuple("abc"),
                     decoupled=decoupled, arch_kwargs={"width": 4})


def trained_like(model):
    """Perturb every parameter and BN buffer, so a fresh build cannot match by accident."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("decoupled", [False, True])
def test_round_trip_gives_identical_outputs(tmp_path, decoupled):
    s = spec(decoupled)
    model = trained_like(s.build())
    save_checkpoint(tmp_path / "run", model, s)
    assert (tmp_path / "run" / WEIGHTS_FILE).is_file()
    assert json.loads((tmp_path / "run" / SPEC_FILE).read_text())["decoupled"] is decoupled
    loaded, loaded_spec = load_checkpoint(tmp_path / "run")
    assert loaded_spec == s
    assert not loaded.training
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert not torch.equal(s.build().eval()(x), model(x))
    if decoupled:
        assert list(gated_layers(loaded)) == list(gated_layers(model))
        assert torch.equal(compute_path(loaded, x).bits(), compute_path(model, x).bits())


def test_gate_input_norm_round_trips(tmp_path):
    s = replace(spec(decoupled=True), gate_input_norm=True)
    model = trained_like(s.build())
    assert any(k.endswith("control.norm.running_mean") for k in model.state_dict())
    save_checkpoint(tmp_path / "run", model, s)
    loaded, loaded_spec = load_checkpoint(tmp_path / "run")
    assert loaded_spec.gate_input_norm
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    old = json.loads((tmp_path / "run" / SPEC_FILE).read_text())
    del old["gate_input_norm"]  # model.json written before the field existed
    assert not ModelSpec.from_json(old).gate_input_norm


def test_spec_json_round_trip():
    s = spec(decoupled=True)
    data = json.loads(json.dumps(s.to_json()))
    assert ModelSpec.from_json(data) == s
    assert s.num_classes == 3


def test_spec_from_invalid_json_raises():
    with pytest.raises(ValueError, match="arch"):
        ModelSpec.from_json({"input_shape": [1, 8, 8], "classes": ["a"]})
    with pytest.raises(ValueError, match="invalid model spec"):
        ModelSpec.from_json({"arch": "small_cnn", "input_shape": ["x"], "classes": ["a"]})


@pytest.fixture
def saved(tmp_path):
    s = spec()
    save_checkpoint(tmp_path, s.build(), s)
    return tmp_path, load_file(str(tmp_path / WEIGHTS_FILE))


def test_wrong_shape_raises_naming_key(saved):
    path, state = saved
    state["classifier.weight"] = torch.zeros(5, 8)
    save_file(state, str(path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"wrong shape: classifier\.weight"):
        load_checkpoint(path)


def test_missing_weight_raises_naming_key(saved):
    path, state = saved
    del state["features.4.running_var"]
    save_file(state, str(path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"missing: features\.4\.running_var"):
        load_checkpoint(path)


def test_unexpected_weight_raises_naming_key(saved):
    path, state = saved
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(path / WEIGHTS_FILE))
    model = spec().build()
    with pytest.raises(ValueError, match=r"unexpected: extra\.weight"):
        load_weights(model, path / WEIGHTS_FILE)


def test_plain_weights_do_not_load_into_decoupled_spec(saved):
    path, _ = saved
    pattern = r"missing: features\.10\.bn\.bias.*unexpected: features\.10\.weight"
    with pytest.raises(ValueError, match=pattern):
        load_weights(spec(decoupled=True).build(), path / WEIGHTS_FILE)


def test_missing_files_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.json"):
        load_checkpoint(tmp_path / "nowhere")
    s = spec()
    save_checkpoint(tmp_path, s.build(), s)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_checkpoint(tmp_path)
