"""The artifact bundle: save/load round trip, and every kind of damaged bundle refused."""

import json
import os
import shutil
from dataclasses import fields, replace

import numpy as np
import pytest
import skops.io as sio
import torch
from safetensors.torch import save_file
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from detector.analysis import analyze
from detector.bundle import (
    DETECTOR,
    FORMAT_VERSION,
    MANIFEST,
    PROFILE,
    WEIGHTS,
    BundleError,
    load_bundle,
    read_manifest,
    save_bundle,
    sha256,
)
from detector.checkpoint import load_checkpoint
from detector.estimator import PathDetector
from detector.features import PathBatch, PathProfile
from detector.gating import gated_layers
from detector.manifest import Manifest
from detector.paths import compute_path, network_macs
from detector.straight_through import straight_through_gates
from evaluation.attacks import AttackSpec, craft
from evaluation.sets import correct_subset, extract_paths
from training.data import load_dataset, to_float


@pytest.fixture(scope="module")
def parts(tiny_decoupled_checkpoint):
    """Model, spec, profile (clean train paths) and detector (clean vs FGSM test paths)."""
    model, spec = load_checkpoint(tiny_decoupled_checkpoint)
    data = load_dataset("digits")
    x_prof, y_prof = correct_subset(model, to_float(data.x_train[:400]), data.y_train[:400])
    profile = PathProfile.fit(extract_paths(model, x_prof), y_prof.numpy(), spec.num_classes)
    x, y = correct_subset(model, to_float(data.x_test[:150]), data.y_test[:150])
    adv = craft(AttackSpec.parse("fgsm:0.2"), model, x, y, progress=False)
    X = np.vstack([profile.transform(extract_paths(model, x)),
                   profile.transform(extract_paths(model, adv))])
    labels = np.r_[np.zeros(len(x)), np.ones(len(adv))]
    groups = np.r_[np.arange(len(x)), np.arange(len(x))]
    detector = PathDetector(random_state=0).fit(X, labels, groups=groups)
    return model, spec, profile, detector, to_float(data.x_test[150:170])


@pytest.fixture(scope="module")
def bundle_dir(parts, tmp_path_factory):
    model, spec, profile, detector, _ = parts
    return save_bundle(tmp_path_factory.mktemp("bundle") / "bundle", name="tiny-digits",
                       model=model, spec=spec, profile=profile, detector=detector,
                       network_macs=network_macs(model, spec.input_shape),
                       metrics={"auroc": {"FGSM eps=0.2": 0.9}})


@pytest.fixture
def copy(bundle_dir, tmp_path):
    """A private copy of the bundle to damage."""
    return shutil.copytree(bundle_dir, tmp_path / "bundle")


def edit_manifest(directory, change):
    manifest = json.loads((directory / MANIFEST).read_text())
    change(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def rehash(directory, name):
    """Make the manifest agree with a replaced file, so later checks are what refuse it."""
    def change(m):
        m["files"][name] = sha256(directory / name)
    edit_manifest(directory, change)


def test_bundle_layout_and_manifest(bundle_dir, parts):
    model, _, _, detector, _ = parts
    assert {p.name for p in bundle_dir.iterdir()} == {MANIFEST, WEIGHTS, PROFILE, DETECTOR}
    m = json.loads((bundle_dir / MANIFEST).read_text())
    # no class heads, no stability: the format an older reader understands
    assert m["format_version"] == 1 and m["name"] == "tiny-digits"
    assert m["input_shape"] == [1, 8, 8] and len(m["classes"]) == 10
    assert m["gated_layers"] == {k: g.conv.out_channels for k, g in gated_layers(model).items()}
    assert m["detector"]["threshold"] == detector.threshold_
    assert m["detector"]["n_features"] == detector.n_features_in_
    assert m["metrics"] == {"auroc": {"FGSM eps=0.2": 0.9}}
    assert m["files"] == {f: sha256(bundle_dir / f) for f in (WEIGHTS, PROFILE, DETECTOR)}
    for f in bundle_dir.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644


def test_round_trip_gives_identical_analysis(bundle_dir, parts):
    model, spec, profile, detector, images = parts
    bundle = load_bundle(bundle_dir)
    assert bundle.name == "tiny-digits" and bundle.spec == spec
    assert not bundle.model.training
    assert bundle.detector.threshold_ == detector.threshold_
    assert bundle.profile.layer_names == profile.layer_names
    expected = analyze(model.eval(), profile, detector, images, bundle.network_macs)
    got = bundle.analyze(images)
    for f in fields(expected):
        a, b = getattr(expected, f.name), getattr(got, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(b, a, err_msg=f.name)
        else:
            assert a == b, f.name
    assert got.scores.shape == (20,) and ((got.scores >= 0) & (got.scores <= 1)).all()
    assert got.layer_anomaly.shape == (20, len(profile.layer_names))


def test_analyze_rejects_wrong_image_shape(bundle_dir):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\), got \(2, 3, 8, 8\)"):
        bundle.analyze(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got \(1, 8, 8\)"):
        bundle.analyze(torch.rand(1, 8, 8))


def test_flipped_weights_byte_is_refused(copy):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{WEIGHTS} does not match its SHA-256"):
        load_bundle(copy)


def test_truncated_detector_is_refused(copy):
    data = (copy / DETECTOR).read_bytes()
    (copy / DETECTOR).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match=f"{DETECTOR} does not match its SHA-256"):
        load_bundle(copy)
    rehash(copy, DETECTOR)  # even with a matching hash it is not a readable archive
    with pytest.raises(BundleError, match=f"{DETECTOR} is not a readable skops file"):
        load_bundle(copy)


@pytest.mark.parametrize("name", [WEIGHTS, PROFILE, DETECTOR])
def test_missing_file_is_refused(copy, name):
    (copy / name).unlink()
    with pytest.raises(BundleError, match=f"bundle file missing: .*{name}"):
        load_bundle(copy)


def test_missing_manifest_or_directory_is_refused(copy, tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nowhere")
    (copy / MANIFEST).unlink()
    with pytest.raises(BundleError, match=f"{MANIFEST} is missing"):
        load_bundle(copy)


def test_invalid_manifest_is_refused(copy):
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="is not a valid manifest"):
        load_bundle(copy)


def test_manifest_without_a_hash_is_refused(copy):
    edit_manifest(copy, lambda m: m["files"].pop(PROFILE))
    with pytest.raises(BundleError, match=f"lists no hash for \\['{PROFILE}'\\]"):
        load_bundle(copy)


@pytest.mark.parametrize(("transforms", "message"), [
    (["shift"], r"feature width disagrees between the manifest \(\d+\), the profile's "
                r"features \(\d+\), the detector \(\d+\)"),
    (["rotate"], "unknown stability transforms"),
    ("shift", "expected a list of names"),
])
def test_manifest_feature_settings_must_fit_the_detector(copy, transforms, message):
    """The manifest is not hashed: edited stability transforms are refused at load time, not
    by the first request."""
    edit_manifest(copy, lambda m: m["detector"].update(stability_transforms=transforms))
    with pytest.raises(BundleError, match=message):
        load_bundle(copy)


def test_fpr_confidence_is_optional_and_checked(copy):
    """Bundles written before the confidence-bounded threshold have no such key: they read as
    the plain quantile rule; a value outside (0, 1) is refused at load time."""
    edit_manifest(copy, lambda m: m["detector"].pop("fpr_confidence", None))
    assert load_bundle(copy).manifest.detector.fpr_confidence is None
    edit_manifest(copy, lambda m: m["detector"].update(fpr_confidence=1.5))
    with pytest.raises(BundleError, match=r"fpr_confidence must be in \(0, 1\) or null, got 1.5"):
        load_bundle(copy)


def test_newer_format_version_is_refused(copy):
    edit_manifest(copy, lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(BundleError, match=f"format version {FORMAT_VERSION + 1}, newer"):
        load_bundle(copy)


@pytest.mark.parametrize("name", ["../weights.safetensors", "sub/../../x", "/etc/passwd"])
def test_manifest_listing_a_path_outside_is_refused(copy, name):
    edit_manifest(copy, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(BundleError, match="lists a file outside the bundle"):
        load_bundle(copy)


def test_detector_with_a_type_outside_the_allow_list_is_refused(copy):
    sio.dump(os.system, copy / DETECTOR)
    rehash(copy, DETECTOR)
    with pytest.raises(BundleError, match=r"detector\.skops contains types outside the "
                                          r"allow-list.*posix\.system"):
        load_bundle(copy)


@pytest.mark.parametrize(("obj", "kind"), [(SVC(), "SVC"), (StandardScaler(), "StandardScaler")])
def test_detector_file_holding_another_estimator_is_refused(copy, obj, kind):
    sio.dump(obj, copy / DETECTOR)
    rehash(copy, DETECTOR)
    with pytest.raises(BundleError, match=f"{DETECTOR} .*{kind}"):
        load_bundle(copy)


def test_detector_wrapping_an_unlisted_sklearn_type_is_refused(copy, parts):
    detector = parts[3]
    tampered = replace_estimator(detector, SVC())
    sio.dump(tampered, copy / DETECTOR)
    rehash(copy, DETECTOR)
    with pytest.raises(BundleError, match="allow-list"):
        load_bundle(copy)


def replace_estimator(detector, estimator):
    clone = PathDetector(**detector.get_params())
    clone.__dict__.update(detector.__dict__)
    clone.estimator_ = estimator
    return clone


def test_weights_of_the_wrong_shape_are_refused(copy, parts):
    spec = parts[1]
    narrow = replace(spec, arch_kwargs={"width": 8}).build()
    save_file({k: v.contiguous() for k, v in narrow.state_dict().items()}, str(copy / WEIGHTS))
    rehash(copy, WEIGHTS)
    with pytest.raises(BundleError, match=f"weights in .*{WEIGHTS} do not fit the "
                                          "architecture.*wrong shape"):
        load_bundle(copy)


def test_profile_that_does_not_fit_the_layers_is_refused(copy, parts):
    profile = parts[2]
    short = PathProfile(dict(list(profile.layers.items())[:1]))
    save_file(short.to_arrays(), str(copy / PROFILE))
    rehash(copy, PROFILE)
    with pytest.raises(BundleError, match=f"{PROFILE} does not fit the model's gated layers"):
        load_bundle(copy)


def test_unknown_architecture_in_manifest_is_refused(copy):
    edit_manifest(copy, lambda m: m["model"].update(arch="vgg99"))
    with pytest.raises(BundleError, match=r"cannot rebuild the model.*'vgg99'"):
        load_bundle(copy)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_bundle_error(copy):
    (copy / WEIGHTS).chmod(0)
    with pytest.raises(BundleError, match="cannot read"):
        load_bundle(copy)


def test_manifest_is_typed_and_round_trips(bundle_dir):
    manifest = read_manifest(bundle_dir)
    assert isinstance(manifest, Manifest)
    assert manifest.input_shape == tuple(manifest.model.input_shape)
    assert 0.0 <= manifest.detector.threshold <= 1.0 and 0.0 < manifest.detector.target_fpr < 1
    assert manifest.version_label == manifest.files[WEIGHTS][:12]
    assert Manifest.from_json(manifest.to_json()) == manifest
    on_disk = json.loads((bundle_dir / MANIFEST).read_text())
    # what save_bundle wrote is what the type writes
    assert json.loads(json.dumps(manifest.to_json())) == on_disk


def test_manifest_without_an_operating_point_is_refused(copy):
    edit_manifest(copy, lambda m: m.pop("detector"))
    with pytest.raises(BundleError, match=r"is not a valid manifest.*detector"):
        load_bundle(copy)


def test_exported_detector_scores_and_differentiates_the_input(bundle_dir, parts):
    """A logistic detector is exported to torch: the bundle's scores are the export's, equal to
    scikit-learn's within 1e-5, and the whole image -> score step has a gradient."""
    bundle = load_bundle(bundle_dir)
    assert bundle.exported is not None
    images = parts[4]
    analysis = bundle.analyze(images)
    with torch.inference_mode():
        features = bundle.profile.transform(PathBatch.from_result(compute_path(bundle.model,
                                                                               images)))
    np.testing.assert_allclose(analysis.scores,
                               bundle.detector.predict_proba(features.numpy())[:, 1], atol=1e-5)
    x = images.clone().requires_grad_()
    with straight_through_gates("sigmoid"):
        paths = PathBatch.from_result(compute_path(bundle.model, x), ste="sigmoid")
    scored = bundle.score_paths(paths)
    np.testing.assert_allclose(scored.scores.detach().numpy(), analysis.scores, atol=1e-12)
    scored.scores.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
