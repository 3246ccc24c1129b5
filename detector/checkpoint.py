"""Self-describing model checkpoints: safetensors weights + the spec that rebuilds the network.

A checkpoint directory holds ``weights.safetensors`` and ``model.json`` (a :class:`ModelSpec`);
a decoupled one may also hold ``class_heads.safetensors``, the per-layer classifiers q(y | z^l) of
the decoupling's mutual-information loss (:func:`save_class_heads`). Nothing is unpickled: the
architecture is rebuilt by name from this package.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from detector.gating import decouple
from detector.models import create_model

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "model.json"
CLASS_HEADS_FILE = "class_heads.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a classifier.

    arch: a name from :data:`detector.models.MODEL_NAMES`.
    input_shape: (C, H, W) the network expects; pixel values in [0, 1].
    classes: class names, index i is class i.
    decoupled: whether the network carries gates (``reduction`` is their FC1 bottleneck factor,
        ``gate_input_norm`` whether their pooled input is standardised).
    """

    arch: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    decoupled: bool = False
    reduction: int = 4
    gate_input_norm: bool = False
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def build(self) -> nn.Module:
        """A freshly initialised network of this spec (gated if ``decoupled``)."""
        model = create_model(self.arch, in_channels=self.input_shape[0],
                             num_classes=self.num_classes, **self.arch_kwargs)
        if not self.decoupled:
            return model
        return decouple(model, self.reduction, self.gate_input_norm)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        try:
            return cls(
                arch=str(data["arch"]),
                input_shape=tuple(int(v) for v in data["input_shape"]),  # type: ignore[arg-type]
                classes=tuple(str(c) for c in data["classes"]),
                decoupled=bool(data.get("decoupled", False)),
                reduction=int(data.get("reduction", 4)),
                gate_input_norm=bool(data.get("gate_input_norm", False)),
                arch_kwargs=dict(data.get("arch_kwargs", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid model spec: {e!r}") from e


def save_checkpoint(directory: Path, model: nn.Module, spec: ModelSpec) -> None:
    """Write weights and spec into ``directory`` (created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2))
    (directory / WEIGHTS_FILE).chmod(0o644)  # safetensors writes 0600


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights strictly; a missing, extra or mis-shaped tensor is a ValueError."""
    state = load_file(str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or extra or wrong:
        detail = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                  for what, keys in (("missing", missing), ("unexpected", extra),
                                     ("wrong shape", wrong)) if keys]
        raise ValueError(f"weights in {path} do not fit the architecture ({'; '.join(detail)})")
    model.load_state_dict(state)


def load_checkpoint(directory: Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the network saved in ``directory``; returns it in eval mode with its spec."""
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {p}")
    spec = ModelSpec.from_json(json.loads(spec_path.read_text()))
    model = spec.build()
    load_weights(model, weights_path)
    return model.eval(), spec


def save_class_heads(directory: Path, heads: Mapping[str, torch.Tensor]) -> None:
    """Write the per-layer class heads: gated layer name -> (K, C) weight of the bias-free
    linear classifier q(y | z^l) = softmax(W z^l) on the layer's gate bits z^l in {0, 1}^C."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().float().contiguous() for k, v in heads.items()},
              str(directory / CLASS_HEADS_FILE))
    (directory / CLASS_HEADS_FILE).chmod(0o644)


def load_class_heads(directory: Path) -> dict[str, torch.Tensor] | None:
    """The class heads saved in ``directory`` (layer -> (K, C) float32), or None if it has none
    (base networks, and decoupled runs from before the heads were kept)."""
    path = directory / CLASS_HEADS_FILE
    return dict(load_file(str(path))) if path.is_file() else None


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(directory: Path) -> str:
    """Hex SHA-256 of the weights file of the checkpoint in ``directory``: which weights a run
    directory held when a later run started from it (directories can be overwritten)."""
    return sha256(directory / WEIGHTS_FILE)
