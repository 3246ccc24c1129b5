"""The bundle's manifest as a typed object: what a bundle is, how it decides, what it measured.

``manifest.json`` is written by :func:`detector.bundle.save_bundle` and read, verified, by
:func:`detector.bundle.read_manifest`; everything else (the server's model card, the load test,
the perturb demo) reads it through :class:`Manifest` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detector.checkpoint import WEIGHTS_FILE, ModelSpec

#: 1: path statistics; 2: the profile may carry class heads (class evidence features) and the
#: operating point stability transforms (one more forward pass each). Readers load every version
#: up to theirs.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
WEIGHTS = WEIGHTS_FILE  # a bundle names its network weights as a checkpoint does
PROFILE = "profile.safetensors"
DETECTOR = "detector.skops"


def _names(value: Any) -> tuple[str, ...]:
    """A JSON list of strings as a tuple (ValueError for anything else)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of names, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class OperatingPoint:
    """The detector's decision rule.

    model: the inner classifier (``"random_forest"``, ...); threshold in [0, 1]: a calibrated
    score above it is flagged; target_fpr in (0, 1): the clean false-positive rate the threshold
    was set for; fpr_confidence: None if the threshold flags target_fpr of the held-out clean
    samples, else the probability in (0, 1), over the draw of those samples, that the rate at
    which new clean inputs are flagged is <= target_fpr
    (:func:`detector.threshold.threshold_at_fpr`); clean_fpr: the rate realised on
    the held-out clean samples that set it (None in bundles that did not record it);
    include_raw_features: raw gate bits and logits appended to the path statistics; n_features:
    the detector's input width F; stability_transforms: names of
    :data:`detector.stability.TRANSFORMS` whose companion paths the features compare with the
    input's (empty: none).
    """

    model: str
    threshold: float
    target_fpr: float
    clean_fpr: float | None
    include_raw_features: bool
    n_features: int
    stability_transforms: tuple[str, ...] = ()
    fpr_confidence: float | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OperatingPoint:
        clean_fpr, confidence = data.get("clean_fpr"), data.get("fpr_confidence")
        if confidence is not None and not 0.0 < float(confidence) < 1.0:
            raise ValueError(f"fpr_confidence must be in (0, 1) or null, got {confidence!r}")
        return cls(model=str(data["model"]), threshold=float(data["threshold"]),
                   target_fpr=float(data["target_fpr"]),
                   clean_fpr=None if clean_fpr is None else float(clean_fpr),
                   include_raw_features=bool(data.get("include_raw_features", False)),
                   n_features=int(data["n_features"]),
                   stability_transforms=_names(data.get("stability_transforms", [])),
                   fpr_confidence=None if confidence is None else float(confidence))

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "threshold": self.threshold, "target_fpr": self.target_fpr,
                "clean_fpr": self.clean_fpr, "include_raw_features": self.include_raw_features,
                "n_features": self.n_features,
                "stability_transforms": list(self.stability_transforms),
                "fpr_confidence": self.fpr_confidence}


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest.

    name: the model's name in the API; created: ISO-8601 UTC time of writing; model: the
    network's spec (input shape (C, H, W), class names, architecture); gated_layers: layer name
    -> filters, in execution order; network_macs: dense multiply-accumulates per image;
    detector: the operating point; metrics: the evaluation summary of ``fit_detector``
    (``{"auroc": {attack: value}, ...}``, free-form); files: file name -> SHA-256 of every other
    file of the bundle; version: an explicit version label, if the bundle has one.
    """

    format_version: int
    name: str
    created: str
    model: ModelSpec
    gated_layers: dict[str, int]
    network_macs: int
    detector: OperatingPoint
    files: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Parse ``manifest.json``'s content; ValueError naming what is missing or malformed."""
        try:
            return cls(format_version=int(data["format_version"]), name=str(data["name"]),
                       created=str(data.get("created", "")),
                       model=ModelSpec.from_json(data["model"]),
                       gated_layers={str(k): int(v) for k, v in data["gated_layers"].items()},
                       network_macs=int(data["network_macs"]),
                       detector=OperatingPoint.from_json(data["detector"]),
                       files={str(k): str(v) for k, v in data["files"].items()},
                       metrics=dict(data.get("metrics") or {}),
                       version=None if data.get("version") is None else str(data["version"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"invalid manifest: {e!r}") from e

    def to_json(self) -> dict[str, Any]:
        """The content of ``manifest.json`` (inverse of :meth:`from_json`)."""
        out: dict[str, Any] = {
            "format_version": self.format_version, "name": self.name, "created": self.created,
            "model": self.model.to_json(), "input_shape": list(self.model.input_shape),
            "classes": list(self.model.classes), "gated_layers": self.gated_layers,
            "network_macs": self.network_macs, "detector": self.detector.to_json(),
            "metrics": self.metrics, "files": self.files}
        if self.version is not None:
            out["version"] = self.version
        return out

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the network takes."""
        return tuple(self.model.input_shape)  # type: ignore[return-value]

    @property
    def version_label(self) -> str:
        """The explicit version, else the first 12 hex digits of the weights' SHA-256."""
        return self.version or self.files.get(WEIGHTS, "")[:12]
