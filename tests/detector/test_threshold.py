"""The threshold at a target FPR: the rule on hand-computed cases, the held-out split, and the
meta-estimator over fitted, unfitted and callable scorers."""

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks

from detector.threshold import FPRThresholdClassifier, min_clean_scores, threshold_at_fpr
from tests.blobs import blobs

EXPECTED_FAILED = {
    "check_classifiers_train": "predict thresholds the adversarial score at target_fpr on "
                               "held-out clean samples, not at 0.5, so it disagrees with "
                               "argmax(predict_proba) by design",
}


@parametrize_with_checks([FPRThresholdClassifier(LogisticRegression(), random_state=0)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED, xfail_strict=True)
def test_sklearn_contract(estimator, check):
    check(estimator)


@pytest.mark.parametrize("scores,fpr,threshold,realised", [
    # 20 clean scores 0.00 .. 0.95: the 95 % quantile rounded up to a score is 0.95, none above
    (np.arange(20) / 20, 0.05, 0.95, 0.0),
    # at 10 %: 0.90, one of 20 above it
    (np.arange(20) / 20, 0.10, 0.90, 0.05),
    # ties: the threshold is a score, and only scores strictly above it are flagged
    (np.array([0.1, 0.5, 0.5, 0.5, 0.9]), 0.5, 0.5, 0.2),
    # one clean score: it is the threshold, nothing is flagged
    (np.array([0.3]), 0.05, 0.3, 0.0),
])
def test_threshold_at_fpr_by_hand(scores, fpr, threshold, realised):
    got, fraction = threshold_at_fpr(scores, fpr)
    assert got == pytest.approx(threshold) and fraction == pytest.approx(realised)
    assert fraction <= fpr


def test_threshold_at_fpr_needs_clean_scores():
    with pytest.raises(ValueError, match="no clean scores"):
        threshold_at_fpr(np.empty(0), 0.05)
    with pytest.raises(ValueError, match=r"clean_scores must be 1-D, got shape \(2, 2\)"):
        threshold_at_fpr(np.zeros((2, 2)), 0.05)


def test_confidence_bounds_the_fpr_on_new_samples():
    """Uniform clean scores: a threshold t flags 1 - t of new clean samples. Over many draws of
    400 held-out scores the bounded threshold keeps that at most at the target in at least
    the confidence's share of the draws (and not in nearly all of them: the bound is not
    needlessly loose); the plain quantile only in about half."""
    rng = np.random.default_rng(0)
    draws = rng.random((2000, 400))
    plain = np.array([1 - threshold_at_fpr(s, 0.05)[0] for s in draws])
    bounded = np.array([1 - threshold_at_fpr(s, 0.05, confidence=0.9)[0] for s in draws])
    assert 0.90 <= (bounded <= 0.05).mean() <= 0.95
    assert 0.35 <= (plain <= 0.05).mean() <= 0.65
    assert bounded.mean() < plain.mean()


def test_confidence_by_hand():
    # 100 scores: the largest k with beta.ppf(0.9, k + 1, 100 - k) <= 0.1 is 5 (k = 6 gives
    # 0.103), so the threshold is the 6th highest score and flags 5
    scores = np.arange(100) / 100
    assert threshold_at_fpr(scores, 0.1, confidence=0.9) == (pytest.approx(0.94), 0.05)


def test_confidence_needs_enough_scores():
    needed = min_clean_scores(0.05, 0.95)
    assert needed == 59  # 0.95 ** 59 < 0.05 < 0.95 ** 58
    threshold, fpr = threshold_at_fpr(np.arange(needed) / needed, 0.05, confidence=0.95)
    assert fpr == 0.0 and threshold == pytest.approx((needed - 1) / needed)
    with pytest.raises(ValueError, match=r"58 clean scores cannot bound the false-positive rate "
                                         r"at 0\.05 with confidence 0\.95: that needs at least 59"):
        threshold_at_fpr(np.arange(58) / 58, 0.05, confidence=0.95)


def test_split_without_groups_holds_out_clean_only():
    y = np.r_[np.zeros(80), np.ones(40)].astype(int)
    clf = FPRThresholdClassifier(LogisticRegression(), threshold_fraction=0.25, random_state=0)
    fit_idx, hold_idx = clf._split(y == 1, None)
    assert len(hold_idx) == 20 and (y[hold_idx] == 0).all()
    assert set(fit_idx).isdisjoint(hold_idx)
    assert set(fit_idx) | set(hold_idx) == set(range(120))


def test_split_with_groups_keeps_held_out_images_out_of_fitting():
    # 50 images: clean sample i and its two adversarial versions share group i
    n = 50
    groups = np.r_[np.arange(n), np.arange(n), np.arange(n)]
    positive = np.r_[np.zeros(n), np.ones(2 * n)].astype(bool)
    clf = FPRThresholdClassifier(LogisticRegression(), threshold_fraction=0.3, random_state=0)
    fit_idx, hold_idx = clf._split(positive, groups)
    held = set(groups[hold_idx])
    assert not positive[hold_idx].any()
    assert len(held) == 15
    assert held.isdisjoint(groups[fit_idx])  # neither clean nor adversarial versions are fitted
    assert set(groups[fit_idx]) | held == set(range(n))
    assert len(fit_idx) == 3 * (n - 15)
    # without groups the adversarial versions of held-out images would be fitted
    fit_ng, hold_ng = clf._split(positive, None)
    assert not set(groups[hold_ng]).isdisjoint(groups[fit_ng])


def test_split_leaves_ineligible_negatives_out_of_the_threshold():
    # 40 clean images, noisy and adversarial versions of the first 20 (same groups)
    n, m = 40, 20
    positive = np.r_[np.zeros(n + m), np.ones(m)].astype(bool)
    groups = np.r_[np.arange(n), np.arange(m), np.arange(m)]
    noisy = np.r_[np.zeros(n, bool), np.ones(m, bool), np.zeros(m, bool)]
    clf = FPRThresholdClassifier(LogisticRegression(), random_state=0)
    fit_idx, hold_idx = clf._split(positive, groups, ~noisy)
    assert len(hold_idx) == 10 and not noisy[hold_idx].any() and not positive[hold_idx].any()
    assert not np.isin(groups[fit_idx], groups[hold_idx]).any()
    assert len(fit_idx) == len(positive) - np.isin(groups, groups[hold_idx]).sum()


def test_unfitted_scorer_is_fitted_on_the_rest_and_thresholded_on_held_out_clean():
    X, y = blobs(400, 300, shift=2.0)
    clf = FPRThresholdClassifier(LogisticRegression(), target_fpr=0.1, random_state=0)
    clf.fit(X, y)
    fit_idx, hold_idx = clf._split(y == 1, None)
    inner = LogisticRegression().fit(X[fit_idx], y[fit_idx])
    np.testing.assert_allclose(clf.estimator_.coef_, inner.coef_)
    held = inner.predict_proba(X[hold_idx])[:, 1]
    assert (clf.threshold_, clf.clean_fpr_) == pytest.approx(threshold_at_fpr(held, 0.1))
    np.testing.assert_allclose(clf.positive_score(X), inner.predict_proba(X)[:, 1])
    np.testing.assert_array_equal(clf.predict(X), (clf.decision_function(X) > 0).astype(int))
    np.testing.assert_allclose(clf.predict_proba(X), inner.predict_proba(X))


def test_threshold_samples_join_the_held_out_ones_and_are_never_fitted():
    X, y = blobs(400, 300, shift=2.0)
    X_more, _ = blobs(600, 0, shift=2.0, seed=3)  # further clean samples
    plain = FPRThresholdClassifier(LogisticRegression(), target_fpr=0.1, random_state=0)
    plain.fit(X, y)
    clf = FPRThresholdClassifier(LogisticRegression(), target_fpr=0.1, random_state=0)
    clf.fit(X, y, threshold_X=X_more)
    np.testing.assert_allclose(clf.estimator_.coef_, plain.estimator_.coef_)  # not fitted on
    _, hold_idx = clf._split(y == 1, None)
    clean = np.r_[clf.positive_score(X[hold_idx]), clf.positive_score(X_more)]
    assert len(clean) == 100 + 600
    assert (clf.threshold_, clf.clean_fpr_) == pytest.approx(threshold_at_fpr(clean, 0.1))
    assert clf.threshold_ != plain.threshold_
    with pytest.raises(ValueError, match="features"):
        clf.fit(X, y, threshold_X=X_more[:, :1])


def test_prefit_scorer_is_thresholded_on_every_eligible_clean_sample():
    X_fit, y_fit = blobs(200, 200, shift=2.0, seed=1)
    scorer = LinearSVC().fit(X_fit, y_fit)  # decision_function only
    X, y = blobs(100, 50, shift=2.0, seed=2)
    clf = FPRThresholdClassifier(scorer, prefit=True, target_fpr=0.1).fit(X, y)
    assert clf.estimator_ is scorer
    clean = scorer.decision_function(X[:100])
    assert (clf.threshold_, clf.clean_fpr_) == pytest.approx(threshold_at_fpr(clean, 0.1))
    assert not hasattr(clf, "predict_proba")
    mask = np.r_[np.ones(50, bool), np.zeros(100, bool)]  # only the first 50 clean count
    half = FPRThresholdClassifier(scorer, prefit=True, target_fpr=0.1).fit(
        X, y, threshold_mask=mask)
    assert half.threshold_ == pytest.approx(threshold_at_fpr(clean[:50], 0.1)[0])


def test_callable_scorer_gets_x_unvalidated():
    # scores are the first pixel of (N, 1, 2, 2) "images": 3 clean, 3 adversarial
    images = np.zeros((6, 1, 2, 2))
    images[:, 0, 0, 0] = [0.1, 0.2, 0.3, 0.25, 0.8, 0.9]
    y = np.array([0, 0, 0, 1, 1, 1])

    def first_pixel(x):
        return x[:, 0, 0, 0]

    clf = FPRThresholdClassifier(first_pixel, target_fpr=0.4).fit(images, y)
    # clean scores 0.1, 0.2, 0.3: the 60 % quantile rounded up is 0.3, nothing clean above it
    assert clf.threshold_ == pytest.approx(0.3) and clf.clean_fpr_ == 0.0
    np.testing.assert_array_equal(clf.predict(images), [0, 0, 0, 0, 1, 1])
    assert not hasattr(clf, "n_features_in_")


@pytest.mark.parametrize(("params", "match"), [
    ({"target_fpr": 0.0}, r"target_fpr must be in \(0, 1\), got 0\.0"),
    ({"threshold_fraction": 1.5}, r"threshold_fraction must be in \(0, 1\), got 1\.5"),
    ({"fpr_confidence": 1.0}, r"fpr_confidence must be in \(0, 1\) or None, got 1\.0"),
    ({"response_method": "predict"}, "response_method must be one of .*'predict'"),
])
def test_bad_parameters_raise_naming_the_value(params, match):
    X, y = blobs(40, 20, shift=2.0)
    with pytest.raises(ValueError, match=match):
        FPRThresholdClassifier(LogisticRegression(), **params).fit(X, y)


def test_unfitted_raises_not_fitted():
    with pytest.raises(NotFittedError):
        FPRThresholdClassifier(LogisticRegression()).predict(np.zeros((2, 2)))
