"""The adversarial-input detector: a calibrated scikit-learn binary classifier on path features.

:class:`PathDetector` wraps an inner model (logistic regression, random forest or histogram
gradient boosting) behind feature scaling, calibrates its probability with
:class:`~sklearn.calibration.CalibratedClassifierCV` and sets one decision threshold on clean
samples it held out from fitting, at ``target_fpr``. Labels: any two classes; the second of the
sorted labels (e.g. 1) is "adversarial".
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted, validate_data

INNER_MODELS = ("logistic", "random_forest", "hist_gb")


def threshold_at_fpr(clean_scores: np.ndarray, target_fpr: float) -> tuple[float, float]:
    """The decision threshold that flags at most ``target_fpr`` of clean samples.

    clean_scores: (N,) scores of clean samples, higher = more adversarial; target_fpr in (0, 1).
    Returns the threshold (the ``1 - target_fpr`` quantile, rounded up to an observed score;
    a sample is flagged when its score is strictly above it) and the share of ``clean_scores``
    it flags (the realised FPR, <= target_fpr).
    """
    threshold = float(np.quantile(clean_scores, 1.0 - target_fpr, method="higher"))
    return threshold, float((np.asarray(clean_scores) > threshold).mean())


def make_inner(name: str, random_state: int | None) -> Pipeline:
    """Scaler + the named inner classifier; ValueError naming an unknown name."""
    if name == "logistic":
        clf = LogisticRegression(C=1.0, max_iter=2000)
    elif name == "random_forest":
        clf = RandomForestClassifier(n_estimators=100, min_samples_leaf=3,
                                     random_state=random_state, n_jobs=1)
    elif name == "hist_gb":
        clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1,
                                             random_state=random_state)
    else:
        raise ValueError(f"unknown inner model {name!r}; choose one of {', '.join(INNER_MODELS)}")
    return make_pipeline(StandardScaler(), clf)


class PathDetector(ClassifierMixin, BaseEstimator):
    """Calibrated adversarial-input detector with a threshold set at a target FPR.

    Parameters
    ----------
    model : {"logistic", "random_forest", "hist_gb"}
        Inner classifier.
    target_fpr : float in (0, 1)
        Share of held-out clean samples allowed above the threshold.
    threshold_fraction : float in (0, 1)
        Share of the clean samples (or of the groups, if given) held out from fitting and used
        only to set the threshold.
    calibration : {"sigmoid", "isotonic"}
        Probability calibration method (3-fold cross-validated).
    random_state : int or None

    Attributes
    ----------
    classes_ : (2,) labels; ``classes_[1]`` is "adversarial".
    estimator_ : the fitted CalibratedClassifierCV.
    threshold_ : float in [0, 1], probability above which an input is flagged.
    clean_fpr_ : realised false-positive rate on the held-out clean samples.
    n_features_in_ : int
    """

    def __init__(self, *, model: str = "logistic", target_fpr: float = 0.05,
                 threshold_fraction: float = 0.25, calibration: str = "sigmoid",
                 random_state: int | None = None) -> None:
        self.model = model
        self.target_fpr = target_fpr
        self.threshold_fraction = threshold_fraction
        self.calibration = calibration
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    def fit(self, X: np.ndarray, y: np.ndarray, groups: np.ndarray | None = None,
            threshold_mask: np.ndarray | None = None) -> PathDetector:
        """X: (N, F) features; y: (N,) two labels; groups: (N,) optional image ids, so that the
        clean samples held out for the threshold share no image with the fitted ones;
        threshold_mask: (N,) bool, the clean samples that may set the threshold (default: all
        of them; e.g. leave out benign-noise negatives so the threshold stays on clean data)."""
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr!r}")
        if not 0.0 < self.threshold_fraction < 1.0:
            raise ValueError(
                f"threshold_fraction must be in (0, 1), got {self.threshold_fraction!r}")
        if self.calibration not in ("sigmoid", "isotonic"):
            raise ValueError(f"calibration must be 'sigmoid' or 'isotonic', "
                             f"got {self.calibration!r}")
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_ = unique_labels(y)
        if len(self.classes_) != 2:
            raise ValueError(f"Only binary classification is supported: PathDetector needs "
                             f"exactly 2 classes (clean, adversarial), got "
                             f"{len(self.classes_)} class(es): {self.classes_!r}")
        positive = y == self.classes_[1]
        eligible = np.ones(len(y), dtype=bool) if threshold_mask is None else np.asarray(
            threshold_mask, dtype=bool)
        if eligible.shape != positive.shape:
            raise ValueError(f"threshold_mask has shape {eligible.shape}, expected "
                             f"{positive.shape}")
        fit_idx, hold_idx = self._split(positive, groups, eligible)
        inner = make_inner(self.model, self.random_state)
        n_min = int(np.bincount(positive[fit_idx].astype(int), minlength=2).min())
        # ensemble=False: calibrate on cross-validated predictions, then keep one inner model
        # fitted on all the data (a third of the prediction cost of keeping one per fold)
        self.estimator_ = CalibratedClassifierCV(inner, method=self.calibration,
                                                 cv=max(2, min(3, n_min)), ensemble=False)
        self.estimator_.fit(X[fit_idx], positive[fit_idx].astype(int))
        clean_scores = self.estimator_.predict_proba(X[hold_idx])[:, 1]
        self.threshold_, self.clean_fpr_ = threshold_at_fpr(clean_scores, self.target_fpr)
        return self

    def _split(self, positive: np.ndarray, groups: np.ndarray | None,
               eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Indices to fit on, and indices of held-out clean samples for the threshold."""
        clean = np.flatnonzero(~positive & (True if eligible is None else eligible))
        if len(clean) < 4 or positive.sum() < 2:
            raise ValueError(f"need at least 4 clean and 2 adversarial samples, got "
                             f"{len(clean)} and {int(positive.sum())}")
        if groups is None:
            split = ShuffleSplit(1, test_size=self.threshold_fraction,
                                 random_state=self.random_state)
            _, hold = next(split.split(clean))
            hold_idx = clean[hold]
            fit_mask = np.ones(len(positive), dtype=bool)
            fit_mask[hold_idx] = False
        else:
            groups = np.asarray(groups)
            if len(groups) != len(positive):
                raise ValueError(f"groups has {len(groups)} entries for {len(positive)} samples")
            split = GroupShuffleSplit(1, test_size=self.threshold_fraction,
                                      random_state=self.random_state)
            _, hold = next(split.split(clean, groups=groups[clean]))
            held_groups = np.unique(groups[clean[hold]])
            hold_idx = clean[hold]
            fit_mask = ~np.isin(groups, held_groups)  # drop their adversarial versions too
        return np.flatnonzero(fit_mask), hold_idx

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, 2) calibrated probabilities of [clean, adversarial]."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.estimator_.predict_proba(X)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(N,) adversarial probability minus the threshold; > 0 means flagged."""
        check_is_fitted(self)
        return self.predict_proba(X)[:, 1] - self.threshold_

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(N,) labels: ``classes_[1]`` where flagged at the threshold, else ``classes_[0]``."""
        check_is_fitted(self)
        return self.classes_[(self.decision_function(X) > 0).astype(int)]
