"""The artifact bundle: one self-describing directory that the server loads.

Layout::

    manifest.json          format version, model spec, gated layers, detector threshold and FPR,
                           metrics summary, SHA-256 of every other file
    weights.safetensors    the decoupled network
    profile.safetensors    class-conditional path statistics (:class:`PathProfile`)
    detector.skops         the fitted :class:`PathDetector` (skops: no pickle, explicit
                           allow-list of types)

Loading verifies the format version, the presence and hash of every file and the weights'
shapes, and raises :class:`BundleError` naming the problem. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from detector.analysis import Analysis, PathScores, analyze, score_paths
from detector.checkpoint import ModelSpec, load_weights, sha256
from detector.differentiable import TorchDetector, TorchForest, torch_detector
from detector.estimator import PathDetector
from detector.features import PathBatch, PathProfile
from detector.gating import gated_layers
from detector.manifest import (
    DETECTOR,
    FORMAT_VERSION,
    MANIFEST,
    PROFILE,
    WEIGHTS,
    Manifest,
    OperatingPoint,
)
from detector.stability import check_transforms, record_paths

#: Every type a detector file may contain; anything else is refused on load, including types
#: that skops itself would trust by default (any other scikit-learn estimator, say).
TRUSTED_TYPES = frozenset({
    "detector.estimator.PathDetector",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.isotonic.IsotonicRegression",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._label.LabelEncoder",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.ensemble._forest.RandomForestClassifier",
    "sklearn.ensemble._forest.ExtraTreesClassifier",
    "sklearn.tree._classes.ExtraTreeClassifier",
    "sklearn.tree._classes.DecisionTreeClassifier",
    "sklearn.tree._tree.Tree",
    "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
    "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    "sklearn._loss.loss.HalfBinomialLoss",
    "sklearn._loss.link.LogitLink",
    "sklearn._loss.link.Interval",
    "sklearn._loss._loss.CyHalfBinomialLoss",
    "numpy.random._generator.Generator",
    "numpy.random.mtrand.RandomState",
    "numpy.random._mt19937.MT19937",
    "numpy.random._pcg64.PCG64",
    "numpy.ndarray",
    "numpy.dtype",
    *(f"numpy.{t}" for t in ("float64", "float32", "int64", "int32", "uint64", "uint32",
                              "uint8", "bool_")),
    *(f"builtins.{t}" for t in ("dict", "list", "tuple", "str", "int", "float", "bool",
                                 "NoneType", "slice", "type")),
    "collections.OrderedDict",
})


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file and the problem."""


@dataclass
class Bundle:
    """A loaded bundle: eval-mode network, path profile, detector and manifest; ``exported``
    is the detector as torch operations where that is exact (logistic, MLP and random forest
    inner models, :mod:`detector.differentiable`; only the first two are differentiable), else
    None."""

    path: Path
    manifest: Manifest
    spec: ModelSpec
    model: nn.Module
    profile: PathProfile
    detector: PathDetector
    exported: TorchDetector | TorchForest | None = None

    def __post_init__(self) -> None:
        if self.exported is None:
            self.exported = torch_detector(self.detector)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def network_macs(self) -> int:
        return self.manifest.network_macs

    def analyze(self, images: torch.Tensor, execution: str = "masked") -> Analysis:
        """images: (N, C, H, W) float32 in [0, 1] with the bundle's input shape.

        ``execution``: "masked" (dense convs, closed filters zeroed) or "sparse" (only open
        filters run); same results up to float rounding, see ``benchmarks/speed.py``.
        """
        expected = tuple(self.spec.input_shape)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")
        return analyze(self.model, self.profile, self.detector, images, self.network_macs,
                       execution, self.exported)

    def record(self, images: torch.Tensor, ste: str | None = None) -> PathBatch:
        """images (N, C, H, W) in [0, 1] -> the paths the bundle's features read: the network's
        own and, if the features compare them, those of the stability transforms
        (:mod:`detector.stability`). Runs in the caller's context (no grad, straight-through
        gates...); ``ste`` as for :meth:`PathBatch.from_result`."""
        return record_paths(self.model, images, self.profile.stability, ste)

    def score_paths(self, paths: PathBatch) -> PathScores:
        """The bundle's path -> features -> score step (:func:`detector.analysis.score_paths`);
        differentiable end to end when the detector's export is (``exported.differentiable``)."""
        return score_paths(self.profile, self.detector, paths, self.exported)


def format_version(profile: PathProfile) -> int:
    """The oldest manifest format that describes ``profile``'s features (see
    :data:`detector.manifest.FORMAT_VERSION`), so that older readers keep loading the bundles
    they can score."""
    return FORMAT_VERSION if profile.has_heads or profile.stability else 1


def save_bundle(directory: Path, *, name: str, model: nn.Module, spec: ModelSpec,
                profile: PathProfile, detector: PathDetector, network_macs: int,
                metrics: dict[str, Any] | None = None) -> Path:
    """Write a bundle into ``directory`` (created; existing bundle files are replaced)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    save_file(profile.to_arrays(), str(directory / PROFILE))
    import skops.io as sio  # slow to import (~3 s); only needed here and in load_detector

    sio.dump(detector, directory / DETECTOR, compression=zipfile.ZIP_DEFLATED, compresslevel=9)
    layers = gated_layers(model)
    manifest = Manifest(
        format_version=format_version(profile),
        name=name,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=spec,
        gated_layers={k: m.conv.out_channels for k, m in layers.items()},
        network_macs=network_macs,
        detector=OperatingPoint(model=detector.model, threshold=detector.threshold_,
                                target_fpr=detector.target_fpr, clean_fpr=detector.clean_fpr_,
                                include_raw_features=profile.include_raw,
                                n_features=int(detector.n_features_in_),
                                stability_transforms=profile.stability,
                                fpr_confidence=detector.fpr_confidence),
        files={f: sha256(directory / f) for f in (WEIGHTS, PROFILE, DETECTOR)},
        metrics=metrics or {},
    )
    (directory / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    for f in (MANIFEST, WEIGHTS, PROFILE, DETECTOR):
        (directory / f).chmod(0o644)  # safetensors writes 0600; servers may run as another user
    return directory


def read_manifest(directory: Path) -> Manifest:
    """The verified manifest: format version known, every listed file present and intact."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise BundleError(f"bundle directory not found: {directory}")
    if not path.is_file():
        raise BundleError(f"{path} is missing: not a bundle directory")
    try:
        data = json.loads(path.read_text())
        version = int(data["format_version"])
        files = dict(data["files"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path} is not a valid manifest ({e!r})") from e
    if version > FORMAT_VERSION:
        raise BundleError(f"{path} has format version {version}, newer than this package "
                          f"supports ({FORMAT_VERSION}); upgrade the package")
    missing = sorted({WEIGHTS, PROFILE, DETECTOR} - set(files))
    if missing:
        raise BundleError(f"{path} lists no hash for {missing}")
    for name, digest in files.items():
        f = directory / name
        if Path(name).name != name:
            raise BundleError(f"{path} lists a file outside the bundle: {name!r}")
        if not f.is_file():
            raise BundleError(f"bundle file missing: {f}")
        if sha256(f) != digest:
            raise BundleError(f"bundle file {f} does not match its SHA-256 in the manifest "
                              "(modified or truncated)")
    try:
        return Manifest.from_json(data)
    except ValueError as e:
        raise BundleError(f"{path} is not a valid manifest ({e})") from e


def load_bundle(directory: str | Path) -> Bundle:
    """Load and verify a bundle; raises :class:`BundleError` naming what is wrong."""
    directory = Path(directory)
    try:
        return _load_bundle(directory)
    except OSError as e:  # unreadable files (permissions, I/O errors)
        raise BundleError(f"cannot read the bundle at {directory}: {e}") from e


def _load_bundle(directory: Path) -> Bundle:
    manifest = read_manifest(directory)
    spec = manifest.model
    try:
        model = spec.build()
    except (KeyError, ValueError) as e:
        raise BundleError(f"{directory / MANIFEST}: cannot rebuild the model ({e})") from e
    try:
        load_weights(model, directory / WEIGHTS)
    except SafetensorError as e:
        raise BundleError(f"{directory / WEIGHTS} is not a readable safetensors file ({e})") from e
    except ValueError as e:
        raise BundleError(str(e)) from e
    model.eval()
    names = list(gated_layers(model))
    include_raw = manifest.detector.include_raw_features
    try:
        stability = check_transforms(manifest.detector.stability_transforms)
    except ValueError as e:
        raise BundleError(f"{directory / MANIFEST}: {e}") from e
    try:
        arrays = load_file(str(directory / PROFILE))
    except SafetensorError as e:
        raise BundleError(f"{directory / PROFILE} is not a readable safetensors file ({e})") from e
    try:
        profile = PathProfile.from_arrays(names, arrays, include_raw, stability)
    except (KeyError, ValueError) as e:
        raise BundleError(f"{directory / PROFILE} does not fit the model's gated layers") from e
    detector = load_detector(directory / DETECTOR)
    widths = {"the manifest": manifest.detector.n_features,
              "the profile's features": len(profile.feature_names()),
              "the detector": int(detector.n_features_in_)}
    if len(set(widths.values())) != 1:
        raise BundleError(f"{directory}: the feature width disagrees between "
                          f"{', '.join(f'{k} ({v})' for k, v in widths.items())}")
    return Bundle(directory, manifest, spec, model, profile, detector)


def _schema_types(node: object) -> set[str]:
    """Every ``module.class`` named anywhere in a skops schema."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("__module__"), str) and isinstance(item.get("__class__"), str):
                found.add(f"{item['__module__']}.{item['__class__']}")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def load_detector(path: Path) -> PathDetector:
    """Load a skops detector file whose every type is in :data:`TRUSTED_TYPES`."""
    try:
        with zipfile.ZipFile(path) as archive:
            schema = json.loads(archive.read("schema.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path} is not a readable skops file ({e!r})") from e
    untrusted = _schema_types(schema) - TRUSTED_TYPES
    if untrusted:
        raise BundleError(f"{path} contains types outside the allow-list, refusing to load: "
                          f"{sorted(untrusted)}")
    import skops.io as sio

    try:
        detector = sio.load(path, trusted=sorted(TRUSTED_TYPES))
    except Exception as e:  # skops raises many kinds of errors on malformed archives
        raise BundleError(f"{path} could not be loaded by skops ({e!r})") from e
    if not isinstance(detector, PathDetector):
        raise BundleError(f"{path} holds a {type(detector).__name__}, not a PathDetector")
    return detector
