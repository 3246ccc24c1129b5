"""PathDetector: the scikit-learn estimator contract, threshold calibration and the image split."""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from detector.estimator import INNER_MODELS, PathDetector, make_inner
from detector.threshold import FPRThresholdClassifier
from tests.blobs import blobs

# Principled deviations from the generic classifier checks (xfail, strict: they must fail).
EXPECTED_FAILED = {
    "check_classifiers_train": "predict thresholds the adversarial probability at target_fpr "
                               "on held-out clean samples, not at 0.5, so it disagrees with "
                               "argmax(predict_proba) by design",
}


# hist_gb is left out: its 3-fold calibrated fits take minutes over the whole suite.
@parametrize_with_checks([PathDetector(random_state=0)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED, xfail_strict=True)
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def fitted():
    X, y = blobs(1200, 800, shift=2.0)
    return PathDetector(target_fpr=0.1, random_state=0).fit(X, y)


def test_threshold_sets_the_clean_false_positive_rate(fitted):
    # realised on the held-out clean samples: at most target_fpr, and close to it
    assert 0.08 <= fitted.clean_fpr_ <= 0.1
    assert 0.0 < fitted.threshold_ < 1.0
    # ... and it generalises to fresh clean samples of the same distribution
    X_new, _ = blobs(4000, 0, shift=2.0, seed=1)
    flagged = fitted.predict(X_new).mean()
    assert 0.07 <= flagged <= 0.13
    X_adv, _ = blobs(0, 2000, shift=2.0, seed=2)
    assert fitted.predict(X_adv).mean() > 0.5  # separable enough to catch most of them


def test_threshold_matches_held_out_clean_scores():
    X, y = blobs(400, 300, shift=1.5)
    det = PathDetector(target_fpr=0.2, random_state=3).fit(X, y)
    _, hold = det._split(y == 1, None)
    scores = det.predict_proba(X[hold])[:, 1]
    assert det.clean_fpr_ == pytest.approx((scores > det.threshold_).mean())
    assert det.threshold_ in scores  # a realised clean score (quantile method "higher")
    # strictly above the threshold is flagged: the clean sample scoring exactly it is not
    at_threshold = X[hold][scores == det.threshold_]
    assert len(at_threshold) >= 1
    assert not det.predict(at_threshold).any()
    assert det.clean_fpr_ <= 0.2


def test_lower_target_fpr_gives_higher_threshold():
    X, y = blobs(600, 400, shift=1.5)
    strict = PathDetector(target_fpr=0.01, random_state=0).fit(X, y)
    loose = PathDetector(target_fpr=0.3, random_state=0).fit(X, y)
    assert strict.threshold_ > loose.threshold_
    assert strict.clean_fpr_ < loose.clean_fpr_


def test_predict_and_decision_function_follow_threshold(fitted):
    X, _ = blobs(200, 200, shift=2.0, seed=5)
    proba = fitted.predict_proba(X)
    assert proba.shape == (400, 2)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    decision = fitted.decision_function(X)
    np.testing.assert_allclose(decision, proba[:, 1] - fitted.threshold_)
    np.testing.assert_array_equal(fitted.predict(X), (proba[:, 1] > fitted.threshold_).astype(int))
    assert 0 < fitted.predict(X).sum() < 400


def test_string_labels_second_sorted_is_adversarial():
    X, y = blobs(200, 150, shift=3.0)
    labels = np.where(y == 1, "pgd", "clean")
    det = PathDetector(random_state=0).fit(X, labels)
    assert list(det.classes_) == ["clean", "pgd"]
    pred = det.predict(X)
    assert set(pred) <= {"clean", "pgd"}
    np.testing.assert_array_equal(pred == "pgd", det.decision_function(X) > 0)
    assert (pred[labels == "pgd"] == "pgd").mean() > 0.8


def test_path_detector_is_the_fpr_threshold_classifier_over_its_calibrated_model():
    X, y = blobs(300, 200, shift=1.5)
    det = PathDetector(random_state=0).fit(X, y)
    assert isinstance(det, FPRThresholdClassifier)
    np.testing.assert_allclose(det.positive_score(X), det.predict_proba(X)[:, 1])
    assert sorted(det.get_params()) == ["calibration", "fpr_confidence", "model",
                                        "random_state", "target_fpr", "threshold_fraction"]


def test_fit_is_reproducible_with_random_state():
    X, y = blobs(300, 200, shift=1.0)
    a = PathDetector(random_state=7).fit(X, y)
    b = PathDetector(random_state=7).fit(X, y)
    assert a.threshold_ == b.threshold_
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


def test_fit_with_groups_uses_the_grouped_split():
    X, y = blobs(100, 200, shift=2.0)
    groups = np.r_[np.arange(100), np.arange(100), np.arange(100)]
    det = PathDetector(random_state=0).fit(X, y, groups=groups)
    _, hold = det._split(y == 1, groups)
    scores = det.predict_proba(X[hold])[:, 1]
    assert det.clean_fpr_ == pytest.approx((scores > det.threshold_).mean())


@pytest.mark.parametrize(("params", "match"), [
    ({"target_fpr": 0.0}, r"target_fpr must be in \(0, 1\), got 0\.0"),
    ({"target_fpr": 1.0}, r"target_fpr must be in \(0, 1\), got 1\.0"),
    ({"threshold_fraction": 1.5}, r"threshold_fraction must be in \(0, 1\), got 1\.5"),
    ({"calibration": "platt"}, "'platt'"),
    ({"model": "svm"}, "unknown inner model 'svm'"),
])
def test_bad_parameters_raise_naming_the_value(params, match):
    X, y = blobs(40, 20, shift=2.0)
    with pytest.raises(ValueError, match=match):
        PathDetector(**params).fit(X, y)


def test_three_classes_are_refused():
    X, _ = blobs(30, 30, shift=2.0)
    y = np.repeat([0, 1, 2], 20)
    with pytest.raises(ValueError, match=r"got 3 class\(es\): array\(\[0, 1, 2\]\)"):
        PathDetector().fit(X, y)


@pytest.mark.parametrize(("n_clean", "n_adv"), [(3, 10), (10, 1)])
def test_too_few_samples_are_refused(n_clean, n_adv):
    X, y = blobs(n_clean, n_adv, shift=2.0)
    with pytest.raises(ValueError, match=f"got {n_clean} and {n_adv}"):
        PathDetector().fit(X, y)


def test_groups_of_wrong_length_are_refused():
    X, y = blobs(20, 10, shift=2.0)
    with pytest.raises(ValueError, match="groups has 29 entries for 30 samples"):
        PathDetector().fit(X, y, groups=np.arange(29))


@pytest.mark.parametrize("method", ["predict", "predict_proba", "decision_function"])
def test_unfitted_detector_raises_not_fitted(method):
    with pytest.raises(NotFittedError):
        getattr(PathDetector(), method)(np.zeros((2, 3)))


def test_feature_count_is_checked(fitted):
    with pytest.raises(ValueError, match="3 features"):
        fitted.predict(np.zeros((2, 4)))


@pytest.mark.parametrize("name", INNER_MODELS)
def test_make_inner_scales_then_classifies(name):
    pipe = make_inner(name, random_state=0)
    assert [step for step, _ in pipe.steps] == ["standardscaler", type(pipe[-1]).__name__.lower()]
    assert type(pipe[-1]).__name__ == {"logistic": "LogisticRegression", "mlp": "MLPClassifier",
                                       "random_forest": "RandomForestClassifier",
                                       "extra_trees": "ExtraTreesClassifier",
                                       "hist_gb": "HistGradientBoostingClassifier"}[name]


def test_threshold_mask_keeps_the_threshold_on_eligible_clean_samples():
    rng = np.random.default_rng(0)
    clean = rng.normal(0.0, 1.0, (200, 2))
    noisy = rng.normal(1.0, 1.0, (200, 2))  # benign negatives, scored higher than clean
    adv = rng.normal(3.0, 1.0, (200, 2))
    X = np.concatenate([clean, noisy, adv])
    y = np.r_[np.zeros(400), np.ones(200)]
    eligible = np.r_[np.ones(200, bool), np.zeros(400, bool)]
    det = PathDetector(random_state=0, target_fpr=0.1).fit(X, y, threshold_mask=eligible)
    fresh_clean = rng.normal(0.0, 1.0, (2000, 2))
    assert det.predict(fresh_clean).mean() == pytest.approx(0.1, abs=0.05)
    with pytest.raises(ValueError, match="threshold_mask"):
        PathDetector().fit(X, y, threshold_mask=eligible[:10])


def test_detector_saved_before_fpr_confidence_loads_with_the_plain_rule(tmp_path):
    """A bundle's detector written before the parameter existed has no such attribute: it
    loads as the plain quantile rule, and get_params (so repr and clone) works on it."""
    import skops.io as sio

    from detector.bundle import load_detector

    X, y = blobs(100, 60, shift=2.0)
    det = PathDetector(random_state=0).fit(X, y)
    del det.fpr_confidence  # as pickled by the version before
    sio.dump(det, tmp_path / "detector.skops")
    loaded = load_detector(tmp_path / "detector.skops")
    assert loaded.get_params()["fpr_confidence"] is None
    np.testing.assert_array_equal(loaded.predict(X), det.predict(X))
