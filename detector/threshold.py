"""A detector's decision threshold, set at a target false-positive rate on held-out clean data.

:func:`threshold_at_fpr` is the rule; :class:`FPRThresholdClassifier` is the meta-estimator that
puts it behind any scorer, in the spirit of scikit-learn's ``FixedThresholdClassifier`` and
``TunedThresholdClassifierCV`` (``sklearn/model_selection/_classification_threshold.py``): the
threshold is its own composable layer, so :class:`detector.estimator.PathDetector` and every
baseline detector of :mod:`evaluation.baselines` set it the same way. The threshold is read off
clean samples the scorer never saw, and never tuned per attack.

Labels: any two classes; the second of the sorted labels (e.g. 1) is "adversarial" (positive).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_consistent_length, check_is_fitted, validate_data

RESPONSE_METHODS = ("auto", "predict_proba", "decision_function")


def threshold_at_fpr(clean_scores: np.ndarray, target_fpr: float,
                     confidence: float | None = None) -> tuple[float, float]:
    """The decision threshold that flags at most ``target_fpr`` of clean samples.

    clean_scores: (N,) scores of clean samples, N >= 1, higher = more adversarial; target_fpr in
    (0, 1). A sample is flagged when its score is strictly above the threshold, an observed
    score. Returns the threshold and the share of ``clean_scores`` it flags (the realised FPR).

    confidence None: the threshold is the ``1 - target_fpr`` quantile (rounded up), so the
    realised FPR is <= target_fpr and new clean samples are flagged at about that rate, give or
    take the sampling noise of N scores. confidence c in (0, 1): the threshold is the (k+1)-th
    highest score, so that at most k of the N are flagged, k the largest count for which
    ``scipy.stats.beta.ppf(c, k + 1, N - k) <= target_fpr`` (the one-sided Clopper-Pearson
    bound). For continuous scores the rate at which that threshold flags new samples from the
    distribution of ``clean_scores`` is Beta(k + 1, N - k) distributed over the draw of the N,
    so with probability >= c over that draw it is <= target_fpr, whatever the distribution
    (ties only make it more conservative). It bounds the long-run rate, not the share flagged
    in any finite batch. ValueError when N is too small for any k.
    """
    clean_scores = np.asarray(clean_scores, dtype=np.float64)
    if clean_scores.ndim != 1:
        raise ValueError(f"clean_scores must be 1-D, got shape {clean_scores.shape}")
    n = clean_scores.size
    if n == 0:
        raise ValueError("no clean scores to set a threshold on")
    if confidence is None:
        threshold = float(np.quantile(clean_scores, 1.0 - target_fpr, method="higher"))
    else:
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1) or None, got {confidence!r}")
        k = np.arange(n)  # candidate counts of flagged scores, 0..N-1
        allowed = np.flatnonzero(stats.beta.ppf(confidence, k + 1, n - k) <= target_fpr)
        if allowed.size == 0:
            raise ValueError(f"{n} clean scores cannot bound the false-positive rate at "
                             f"{target_fpr:g} with confidence {confidence:g}: that needs at "
                             f"least {min_clean_scores(target_fpr, confidence)}")
        threshold = float(np.sort(clean_scores)[n - 1 - allowed[-1]])
    return threshold, float((clean_scores > threshold).mean())


def min_clean_scores(target_fpr: float, confidence: float) -> int:
    """The fewest clean scores from which :func:`threshold_at_fpr` can bound the false-positive
    rate at ``target_fpr`` in (0, 1) with ``confidence`` in (0, 1): the N for which flagging
    none of them (an FPR bound of 1 - (1 - confidence)^(1/N)) just gets there."""
    return int(np.ceil(np.log1p(-confidence) / np.log1p(-target_fpr)))


def held_out(clean: np.ndarray, groups: np.ndarray | None, fraction: float,
             random_state: int | None) -> np.ndarray:
    """The clean samples held out to set a threshold: a share ``fraction`` in (0, 1) of the
    indices ``clean`` (of their groups, if ``groups`` gives every sample's group), drawn with
    ``random_state``. Returns a subset of ``clean``; the rule every thresholded detector of
    the project (and the baselines that calibrate on the rest) holds out by."""
    if groups is None:
        _, hold = next(ShuffleSplit(1, test_size=fraction, random_state=random_state)
                       .split(clean))
    else:
        _, hold = next(GroupShuffleSplit(1, test_size=fraction, random_state=random_state)
                       .split(clean, groups=np.asarray(groups)[clean]))
    return clean[hold]


def is_callable_scorer(scorer: Any) -> bool:
    """True for a plain function X -> (N,) scores (not an estimator with ``fit``)."""
    return callable(scorer) and not hasattr(scorer, "fit")


def _scorer_has(method: str) -> Callable[[FPRThresholdClassifier], bool]:
    def check(self: FPRThresholdClassifier) -> bool:
        scorer = getattr(self, "estimator_", getattr(self, "estimator", None))
        return hasattr(scorer, method)
    return check


class FPRThresholdClassifier(ClassifierMixin, BaseEstimator):
    """Binary classifier that flags what its scorer scores above a threshold set at a target
    false-positive rate on held-out clean samples.

    ``fit`` holds out a share of the clean samples (by group, if groups are given, together with
    every other sample of their groups), fits a clone of ``estimator`` on the rest (0 = clean,
    1 = adversarial) and sets the threshold on the held-out clean scores with
    :func:`threshold_at_fpr`. A scorer that is not fitted here (``prefit=True``, or a callable)
    is thresholded on every eligible clean sample given to ``fit``: they must be unseen by it.

    Parameters
    ----------
    estimator : classifier, fitted or not, with ``predict_proba`` or ``decision_function``; or
        a callable X -> (N,) scores (higher = adversarial), which is never fitted and gets X
        unvalidated (images, say).
    target_fpr : float in (0, 1)
        Share of held-out clean samples allowed above the threshold.
    fpr_confidence : float in (0, 1) or None
        None: the threshold flags ``target_fpr`` of the held-out clean samples. c: it flags
        fewer, so that the rate at which it flags new clean samples (from the distribution of
        the held-out ones) is <= ``target_fpr`` with probability >= c over the draw of the
        held-out samples (see :func:`threshold_at_fpr`; needs enough of them).
    threshold_fraction : float in (0, 1)
        Share of the clean samples (or of their groups) held out from fitting to set the
        threshold; unused when the scorer is not fitted here.
    response_method : {"auto", "predict_proba", "decision_function"}
        The scorer's method whose positive-class output is thresholded; "auto" takes
        ``predict_proba`` if there is one. For a prefit classifier, its second class must be
        the adversarial one.
    prefit : bool
        True: ``estimator`` is already fitted; ``fit`` only sets the threshold.
    random_state : int or None
        Seeds the held-out split.

    Attributes
    ----------
    classes_ : (2,) labels; ``classes_[1]`` is "adversarial".
    estimator_ : the fitted scorer (the estimator itself if prefit, or the callable).
    threshold_ : float, score above which an input is flagged.
    clean_fpr_ : float in [0, 1], realised false-positive rate on the held-out clean samples
        (and ``threshold_X``, if given to ``fit``).
    n_features_in_ : int (array input only, not for a callable scorer)
    """

    def __init__(self, estimator: Any, *, target_fpr: float = 0.05,
                 fpr_confidence: float | None = None, threshold_fraction: float = 0.25,
                 response_method: str = "auto", prefit: bool = False,
                 random_state: int | None = None) -> None:
        self.estimator = estimator
        self.target_fpr = target_fpr
        self.fpr_confidence = fpr_confidence
        self.threshold_fraction = threshold_fraction
        self.response_method = response_method
        self.prefit = prefit
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def __setstate__(self, state: dict[str, Any]) -> None:
        # detectors saved before fpr_confidence existed set their threshold without it
        super().__setstate__({"fpr_confidence": None, **state})

    # --- hooks a subclass with a fixed scorer overrides (see detector.estimator.PathDetector)

    def _check_params(self) -> None:
        if self.response_method not in RESPONSE_METHODS:
            raise ValueError(f"response_method must be one of {', '.join(RESPONSE_METHODS)}, "
                             f"got {self.response_method!r}")

    def _fits_scorer(self) -> bool:
        """Whether ``fit`` fits the scorer (and so holds clean samples out of its fitting)."""
        return not (self.prefit or is_callable_scorer(self.estimator))

    def _takes_arrays(self) -> bool:
        """Whether X is validated as a 2-D array (not for a callable scorer)."""
        return not is_callable_scorer(self.estimator)

    def _fit_scorer(self, X: Any, positive: np.ndarray) -> Any:
        """The fitted scorer: a clone of ``estimator`` fitted on X with labels ``positive``
        (0/1), or the estimator itself when it is not fitted here."""
        if not self._fits_scorer():
            return self.estimator
        return clone(self.estimator).fit(X, positive.astype(int))

    def _scores(self, X: Any) -> np.ndarray:
        """(N,) scores of the fitted scorer, higher = adversarial."""
        scorer = self.estimator_
        if is_callable_scorer(scorer):
            return np.asarray(scorer(X), dtype=np.float64).reshape(-1)
        method = self.response_method
        if method == "auto":
            method = "predict_proba" if hasattr(scorer, "predict_proba") else "decision_function"
        out = np.asarray(getattr(scorer, method)(X))
        return out[:, 1] if out.ndim == 2 else out

    # --- the estimator

    def fit(self, X: Any, y: np.ndarray, groups: np.ndarray | None = None,
            threshold_mask: np.ndarray | None = None,
            threshold_X: Any | None = None) -> FPRThresholdClassifier:
        """X: (N, F) features (anything the scorer takes, for a callable); y: (N,) two labels;
        groups: (N,) optional image ids, so that the clean samples held out for the threshold
        share no image with the fitted ones; threshold_mask: (N,) bool, the clean samples that
        may set the threshold (default: all of them; e.g. leave out benign-noise negatives so
        the threshold stays on clean data); threshold_X: (M, F) optional further clean samples,
        never fitted on, whose scores join the held-out clean scores in setting the threshold
        (a threshold read off more clean samples lands closer to ``target_fpr`` on new ones)."""
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr!r}")
        if self.fpr_confidence is not None and not 0.0 < self.fpr_confidence < 1.0:
            raise ValueError(
                f"fpr_confidence must be in (0, 1) or None, got {self.fpr_confidence!r}")
        if not 0.0 < self.threshold_fraction < 1.0:
            raise ValueError(
                f"threshold_fraction must be in (0, 1), got {self.threshold_fraction!r}")
        self._check_params()
        if self._takes_arrays():
            X, y = validate_data(self, X, y)
        else:
            y = np.asarray(y)
            check_consistent_length(X, y)
        check_classification_targets(y)
        self.classes_ = unique_labels(y)
        if len(self.classes_) != 2:
            raise ValueError(f"Only binary classification is supported: {type(self).__name__} "
                             f"needs exactly 2 classes (clean, adversarial), got "
                             f"{len(self.classes_)} class(es): {self.classes_!r}")
        positive = y == self.classes_[1]
        eligible = np.ones(len(y), dtype=bool) if threshold_mask is None else np.asarray(
            threshold_mask, dtype=bool)
        if eligible.shape != positive.shape:
            raise ValueError(f"threshold_mask has shape {eligible.shape}, expected "
                             f"{positive.shape}")
        if self._fits_scorer():
            fit_idx, hold_idx = self._split(positive, groups, eligible)
            self.estimator_ = self._fit_scorer(X[fit_idx], positive[fit_idx])
        else:
            hold_idx = np.flatnonzero(~positive & eligible)
            self.estimator_ = self._fit_scorer(X, positive)
        clean_scores = self._scores(X[hold_idx])
        if threshold_X is not None:
            if self._takes_arrays():
                threshold_X = validate_data(self, threshold_X, reset=False)
            clean_scores = np.r_[clean_scores, self._scores(threshold_X)]
        self.threshold_, self.clean_fpr_ = threshold_at_fpr(clean_scores, self.target_fpr,
                                                           self.fpr_confidence)
        return self

    def _split(self, positive: np.ndarray, groups: np.ndarray | None,
               eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices to fit on, and indices of held-out clean samples for the threshold.

        A share ``threshold_fraction`` of the eligible clean samples (of their groups, if
        given) is held out; with groups, every sample of a held-out group (its adversarial and
        noisy versions too) is left out of fitting."""
        clean = np.flatnonzero(~positive & (True if eligible is None else eligible))
        if len(clean) < 4 or positive.sum() < 2:
            raise ValueError(f"need at least 4 clean and 2 adversarial samples, got "
                             f"{len(clean)} and {int(positive.sum())}")
        if groups is not None:
            groups = np.asarray(groups)
            if len(groups) != len(positive):
                raise ValueError(f"groups has {len(groups)} entries for {len(positive)} samples")
        hold_idx = held_out(clean, groups, self.threshold_fraction, self.random_state)
        if groups is None:
            fit_mask = np.ones(len(positive), dtype=bool)
            fit_mask[hold_idx] = False
        else:  # drop the held-out groups' adversarial versions too
            fit_mask = ~np.isin(groups, np.unique(groups[hold_idx]))
        return np.flatnonzero(fit_mask), hold_idx

    def _checked(self, X: Any) -> Any:
        check_is_fitted(self)
        return validate_data(self, X, reset=False) if self._takes_arrays() else X

    def positive_score(self, X: Any) -> np.ndarray:
        """(N,) the scorer's adversarial score, the quantity the threshold applies to."""
        return self._scores(self._checked(X))

    @available_if(_scorer_has("predict_proba"))
    def predict_proba(self, X: Any) -> np.ndarray:
        """(N, 2) the scorer's probabilities of [clean, adversarial]."""
        X = self._checked(X)
        return self.estimator_.predict_proba(X)

    def decision_function(self, X: Any) -> np.ndarray:
        """(N,) adversarial score minus the threshold; > 0 means flagged."""
        check_is_fitted(self)
        return self.positive_score(X) - self.threshold_

    def predict(self, X: Any) -> np.ndarray:
        """(N,) labels: ``classes_[1]`` where flagged at the threshold, else ``classes_[0]``."""
        check_is_fitted(self)
        return self.classes_[(self.decision_function(X) > 0).astype(int)]
