"""Analysis rows -> response models of the image API."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector.analysis import Analysis
from detector.bundle import Bundle
from detector.features import PathProfile
from service.imaging import DecodedImage
from service.schemas import (
    Adversarial,
    ClassScore,
    FilterReport,
    ImageResult,
    InputReport,
    LayerReport,
    ModelRef,
    PathReport,
    Prediction,
)


@dataclass(frozen=True)
class ModelCard:
    """What responses say about the served bundle, read once from its manifest.

    input_shape: (C, H, W); threshold, target_fpr, clean_fpr, fpr_confidence: the detector's
    operating point (:class:`detector.manifest.OperatingPoint`).
    """

    name: str
    version: str
    labels: tuple[str, ...]
    input_shape: tuple[int, int, int]
    threshold: float
    target_fpr: float
    clean_fpr: float | None
    fpr_confidence: float | None

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ModelCard:
        manifest = bundle.manifest
        return cls(
            name=manifest.name,
            version=manifest.version_label,
            labels=tuple(manifest.model.classes),
            input_shape=manifest.input_shape,
            threshold=float(bundle.detector.threshold_),
            target_fpr=manifest.detector.target_fpr,
            clean_fpr=manifest.detector.clean_fpr,
            fpr_confidence=manifest.detector.fpr_confidence,
        )

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)


def prediction(card: ModelCard, probs: np.ndarray, top_k: int) -> Prediction:
    """probs: (K,) softmax probabilities of one image."""
    order = np.argsort(-probs, kind="stable")[:top_k]
    best = int(order[0])
    return Prediction(
        index=best, label=card.labels[best], confidence=float(probs[best]),
        top_k=[ClassScore(index=int(k), label=card.labels[k], probability=float(probs[k]))
               for k in order])


def filter_reports(analysis: Analysis, row: int, profile: PathProfile) -> list[FilterReport]:
    """Per gated layer (execution order): image ``row``'s filter states and the predicted
    class's frequency of each (4 decimals)."""
    predicted = int(analysis.predictions[row])
    return [FilterReport(open=bits.tolist(),
                         class_frequency=np.round(
                             profile.layers[name].freq[predicted].numpy(), 4).tolist())
            for name, bits in analysis.layer_bits(row).items()]


def image_result(card: ModelCard, analysis: Analysis, row: int, decoded: DecodedImage,
                 filename: str | None, *, top_k: int, layers: bool,
                 filters: PathProfile | None = None) -> ImageResult:
    """The response for image ``row`` of ``analysis`` (decoded from ``decoded``); with
    ``filters`` (the bundle's profile) each layer lists its filters (needs ``layers``)."""
    anomaly = analysis.layer_anomaly[row]  # (L,)
    report = None
    if layers:
        per_filter = filter_reports(analysis, row, filters) if filters is not None else None
        report = [LayerReport(name=analysis.layer_names[j], depth=int(j),
                              open=int(analysis.layer_open[row, j]),
                              total=int(analysis.layer_filters[j]), anomaly=float(anomaly[j]),
                              filters=None if per_filter is None else per_filter[j])
                  for j in np.argsort(-anomaly, kind="stable")]
    score = float(analysis.scores[row])
    flagged = bool(analysis.flagged[row])
    return ImageResult(
        prediction=prediction(card, analysis.probs[row], top_k),
        adversarial=Adversarial(score=score, flagged=flagged,
                                verdict="adversarial" if flagged else "clean",
                                threshold=card.threshold, target_fpr=card.target_fpr,
                                clean_fpr=card.clean_fpr,
                                fpr_confidence=card.fpr_confidence),
        path=PathReport(open_fraction=float(analysis.open_fraction[row]),
                        flops_fraction=float(analysis.flops_fraction[row]),
                        max_anomaly=float(anomaly.max()), execution=analysis.execution,
                        layers=report),
        input=input_report(card, decoded, filename),
    )


def input_report(card: ModelCard, decoded: DecodedImage, filename: str | None) -> InputReport:
    changes = []
    if decoded.resized:
        _, h, w = card.input_shape
        changes.append(f"resized from {decoded.width}x{decoded.height} to {w}x{h}")
    if decoded.converted:
        changes.append(f"converted from mode {decoded.mode}")
    if decoded.lossy:
        changes.append(f"lossily compressed ({decoded.format})")
    note = None
    if changes:
        note = (f"the image was {', '.join(changes)}: this changes pixel values and any "
                f"adversarial perturbation in them; to score exact pixels send the tensor to "
                f"/v2/models/{card.name}/infer")
    return InputReport(filename=filename, format=decoded.format, width=decoded.width,
                       height=decoded.height, mode=decoded.mode, resized=decoded.resized,
                       converted=decoded.converted, lossy=decoded.lossy,
                       model_input=list(card.input_shape), note=note)
