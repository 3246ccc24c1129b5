"""Open Inference Protocol (v2) tensors <-> model input and analysis outputs.

The model has one input, ``input``: FP32 [N, C, H, W], values in [0, 1] (the exact pixels the
network sees; no codec in between). Outputs, all with N rows:

- ``probabilities`` FP32 [N, K]; ``prediction`` INT64 [N];
- ``adversarial_score`` FP32 [N] (probability of "adversarial"); ``flagged`` BOOL [N];
- ``layer_anomaly`` FP32 [N, L] (layer names in the tensor's ``parameters.layers``);
- ``open_fraction`` FP32 [N]; ``flops_fraction`` FP32 [N].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from detector.analysis import Analysis
from service.bodies import parse_json
from service.errors import shorten
from service.results import ModelCard
from service.schemas import (
    InferOutput,
    InferRequest,
    ModelMetadata,
    TensorMetadata,
)

INPUT_NAME = "input"
#: Bytes a JSON number of the input may take (``-0.12345678901234567,`` and spaces), and
#: bytes for everything else of a request: together they bound the body worth reading.
BYTES_PER_VALUE = 32
BODY_OVERHEAD = 64 * 1024
PLATFORM = "pytorch_pathguard"
OUTPUT_NAMES = ("probabilities", "prediction", "adversarial_score", "flagged", "layer_anomaly",
                "open_fraction", "flops_fraction")


class TensorError(ValueError):
    """An infer request whose tensor cannot be the model's input; the message says why."""


def _short(text: str) -> str:
    return shorten(text, 40)


def metadata(card: ModelCard, num_layers: int) -> ModelMetadata:
    c, h, w = card.input_shape
    k = len(card.labels)
    shapes = {"probabilities": ("FP32", [-1, k]), "prediction": ("INT64", [-1]),
              "adversarial_score": ("FP32", [-1]), "flagged": ("BOOL", [-1]),
              "layer_anomaly": ("FP32", [-1, num_layers]), "open_fraction": ("FP32", [-1]),
              "flops_fraction": ("FP32", [-1])}
    return ModelMetadata(
        name=card.name, versions=[card.version], platform=PLATFORM,
        inputs=[TensorMetadata(name=INPUT_NAME, datatype="FP32", shape=[-1, c, h, w])],
        outputs=[TensorMetadata(name=n, datatype=shapes[n][0], shape=shapes[n][1])
                 for n in OUTPUT_NAMES])


def input_tensor(request: InferRequest, input_shape: tuple[int, int, int],
                 max_batch: int) -> torch.Tensor:
    """The request's input as (N, C, H, W) float32 in [0, 1]; :class:`TensorError` if not."""
    if len(request.inputs) != 1:
        raise TensorError(f"expected exactly one input tensor named {INPUT_NAME!r}, got "
                          f"{len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise TensorError(f"unknown input {_short(tensor.name)!r}; the model's input is named "
                          f"{INPUT_NAME!r}")
    if tensor.datatype != "FP32":
        raise TensorError(f"input datatype must be FP32, got {_short(tensor.datatype)!r}")
    shape = list(tensor.shape)
    expected = [*input_shape]
    if len(shape) != 4 or shape[1:] != expected:
        raise TensorError(f"input shape must be [N, {', '.join(map(str, expected))}], got "
                          f"{_short(str(shape))}")
    n = shape[0]
    if not 1 <= n <= max_batch:
        raise TensorError(f"batch size N must be between 1 and {max_batch}, got {_short(str(n))}")
    if len(tensor.data) != math.prod(shape):
        raise TensorError(f"shape {shape} needs {math.prod(shape)} values, got "
                          f"{len(tensor.data)}")  # N was checked: the numbers are small
    array = np.asarray(tensor.data, dtype=np.float32).reshape(shape)  # (N, C, H, W)
    if not np.isfinite(array).all():
        raise TensorError(f"input holds {int((~np.isfinite(array)).sum())} NaN or infinite "
                          f"values")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise TensorError(f"input values must be in [0, 1] (pixels / 255), got range "
                          f"[{low:g}, {high:g}]")
    return torch.from_numpy(array)


def requested_outputs(request: InferRequest) -> list[str]:
    """Names of the outputs to return, in the requested order (all by default), each at most
    once: the response can be no larger than all outputs once."""
    if not request.outputs:
        return list(OUTPUT_NAMES)
    names = [o.name for o in request.outputs]
    unknown = [n for n in names if n not in OUTPUT_NAMES]
    if unknown:
        raise TensorError(f"unknown output(s) {[_short(n) for n in unknown[:8]]}; the model has "
                          f"{list(OUTPUT_NAMES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TensorError(f"output(s) {repeated} requested more than once; request each "
                          f"output at most once")
    return names


def body_limit(input_shape: tuple[int, int, int], max_batch: int) -> int:
    """The largest infer request body worth reading: ``max_batch`` images of C*H*W values at
    :data:`BYTES_PER_VALUE` bytes each, plus :data:`BODY_OVERHEAD` bytes for the rest."""
    return BODY_OVERHEAD + max_batch * math.prod(input_shape) * BYTES_PER_VALUE


@dataclass(frozen=True)
class ParsedInfer:
    """An infer request ready to run: the request, its images (N, C, H, W) float32 in [0, 1]
    and the output names to return."""

    request: InferRequest
    images: torch.Tensor
    outputs: list[str]


def parse_infer(body: bytes, input_shape: tuple[int, int, int], max_batch: int) -> ParsedInfer:
    """Parse and check an infer request body (call it off the event loop).

    Raises :class:`service.bodies.BodyError` (not JSON, too many objects),
    ``pydantic.ValidationError`` (wrong fields) or :class:`TensorError` (not the model's input,
    unknown or repeated outputs).
    """
    request = parse_json(body, InferRequest)
    return ParsedInfer(request, input_tensor(request, input_shape, max_batch),
                       requested_outputs(request))


def outputs(analysis: Analysis, names: list[str]) -> list[InferOutput]:
    """The named outputs of ``analysis`` as flat OIP tensors."""
    n = len(analysis.scores)
    arrays: dict[str, tuple[str, np.ndarray]] = {
        "probabilities": ("FP32", analysis.probs.astype(np.float32)),
        "prediction": ("INT64", analysis.predictions.astype(np.int64)),
        "adversarial_score": ("FP32", analysis.scores.astype(np.float32)),
        "flagged": ("BOOL", analysis.flagged.astype(bool)),
        "layer_anomaly": ("FP32", analysis.layer_anomaly.astype(np.float32).reshape(n, -1)),
        "open_fraction": ("FP32", analysis.open_fraction.astype(np.float32)),
        "flops_fraction": ("FP32", analysis.flops_fraction.astype(np.float32)),
    }
    result = []
    for name in names:
        datatype, array = arrays[name]
        params = {"layers": ",".join(analysis.layer_names)} if name == "layer_anomaly" else None
        result.append(InferOutput(name=name, datatype=datatype, shape=list(array.shape),
                                  data=array.reshape(-1).tolist(), parameters=params))
    return result
