"""The adversarial-input detector: a calibrated scikit-learn binary classifier on path features.

:class:`PathDetector` wraps an inner model (logistic regression, a one-hidden-layer perceptron,
random forest, extremely randomized trees or histogram gradient boosting) behind feature
scaling, calibrates its probability with :class:`~sklearn.calibration.CalibratedClassifierCV`,
and is a :class:`~detector.threshold.FPRThresholdClassifier` over that scorer: one decision
threshold set on clean samples it held out from fitting, at ``target_fpr``. Labels: any two
classes; the second of the sorted labels (e.g. 1) is "adversarial".

Extremely randomized trees (Geurts et al., 2006) draw each split's threshold at random
instead of at the best cut: their score changes in many small steps where a random forest's
jumps at the cuts that separate the fitted attacks best, so inputs unlike any fitted attack
(other families, other strengths) land less often on the wrong side of a cut: on CIFAR-10's
full suite they raise the worst case over unseen attacks, but on a few hundred fitting
images (digits) their random cuts are too coarse and the random forest does better
(docs/RESULTS.md 2.8). Shallow trees with large leaves (depth <= 12, >= 10 samples) keep the
torch walk short (one lookup per level).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from detector.threshold import FPRThresholdClassifier

INNER_MODELS = ("logistic", "mlp", "random_forest", "extra_trees", "hist_gb")


def make_inner(name: str, random_state: int | None) -> Pipeline:
    """Scaler + the named inner classifier; ValueError naming an unknown name."""
    if name == "logistic":
        clf = LogisticRegression(C=1.0, max_iter=2000)
    elif name == "mlp":
        clf = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500,
                            early_stopping=True, random_state=random_state)
    elif name == "random_forest":
        clf = RandomForestClassifier(n_estimators=100, min_samples_leaf=3,
                                     random_state=random_state, n_jobs=1)
    elif name == "extra_trees":
        clf = ExtraTreesClassifier(n_estimators=100, min_samples_leaf=10, max_depth=12,
                                   random_state=random_state, n_jobs=1)
    elif name == "hist_gb":
        clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1,
                                             random_state=random_state)
    else:
        raise ValueError(f"unknown inner model {name!r}; choose one of {', '.join(INNER_MODELS)}")
    return make_pipeline(StandardScaler(), clf)


class PathDetector(FPRThresholdClassifier):
    """Calibrated adversarial-input detector with a threshold set at a target FPR.

    Parameters
    ----------
    model : {"logistic", "mlp", "random_forest", "extra_trees", "hist_gb"}
        Inner classifier.
    target_fpr : float in (0, 1)
        Share of held-out clean samples allowed above the threshold.
    fpr_confidence : float in (0, 1) or None
        None: the threshold flags ``target_fpr`` of the held-out clean samples; c: the rate
        at which new clean samples are flagged is <= ``target_fpr`` with probability >= c
        over the draw of the held-out ones (:func:`~detector.threshold.threshold_at_fpr`).
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
    clean_fpr_ : realised false-positive rate on the held-out clean samples (and
        ``threshold_X``, if given to ``fit``).
    n_features_in_ : int

    ``fit(X, y, groups=None, threshold_mask=None, threshold_X=None)``, ``predict`` and
    ``decision_function`` are :class:`~detector.threshold.FPRThresholdClassifier`'s.
    """

    def __init__(self, *, model: str = "logistic", target_fpr: float = 0.05,
                 fpr_confidence: float | None = None, threshold_fraction: float = 0.25,
                 calibration: str = "sigmoid", random_state: int | None = None) -> None:
        self.model = model
        self.target_fpr = target_fpr
        self.fpr_confidence = fpr_confidence
        self.threshold_fraction = threshold_fraction
        self.calibration = calibration
        self.random_state = random_state

    def _check_params(self) -> None:
        if self.calibration not in ("sigmoid", "isotonic"):
            raise ValueError(f"calibration must be 'sigmoid' or 'isotonic', "
                             f"got {self.calibration!r}")

    def _fits_scorer(self) -> bool:
        return True

    def _takes_arrays(self) -> bool:
        return True

    def _fit_scorer(self, X: Any, positive: np.ndarray) -> CalibratedClassifierCV:
        inner = make_inner(self.model, self.random_state)
        n_min = int(np.bincount(positive.astype(int), minlength=2).min())
        # ensemble=False: calibrate on cross-validated predictions, then keep one inner model
        # fitted on all the data (a third of the prediction cost of keeping one per fold)
        calibrated = CalibratedClassifierCV(inner, method=self.calibration,
                                            cv=max(2, min(3, n_min)), ensemble=False)
        return calibrated.fit(X, positive.astype(int))

    def _scores(self, X: Any) -> np.ndarray:
        return self.estimator_.predict_proba(X)[:, 1]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, 2) calibrated probabilities of [clean, adversarial]."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.estimator_.predict_proba(X)
