"""The fitted detector's calibrated score as torch operations, for inner models where that is
exact: logistic regression and the multi-layer perceptron.

:class:`detector.estimator.PathDetector` is fitted with scikit-learn (a scaler, the inner model,
sigmoid or isotonic calibration). For a linear or MLP inner model with sigmoid calibration the
whole map features -> calibrated probability is a small differentiable function; its fitted
parameters are copied into :class:`TorchDetector`, which gives the same scores as
``predict_proba`` up to rounding (it computes in float64; scikit-learn keeps float32 features
and weights fitted on them in float32: differences of order 1e-7) and gradients with respect to
the features.
Serving uses it because it is cheaper than scikit-learn's per-call overhead at batch 1, and
adaptive attacks descend on the score that ships instead of a stand-in. Tree ensembles (random
forest, gradient boosting) and isotonic calibration are piecewise constant: there is no such
export (:func:`torch_detector` returns None) and scikit-learn scores them.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from torch import nn

from detector.estimator import PathDetector

_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "logistic": torch.sigmoid,
                "identity": lambda t: t}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


class TorchDetector(nn.Module):
    """features (N, F) -> (N,) float64 calibrated probability in [0, 1] that the input is
    adversarial, equal to ``PathDetector.predict_proba(features)[:, 1]``.

    Built by :func:`torch_detector` from a fitted detector; holds the scaler's mean and scale,
    the inner model's weights (one linear layer, or the MLP's layers) and the sigmoid
    calibration's ``a`` and ``b``: p = sigmoid(-(a * f(x) + b)), f the inner model's decision
    value (logistic regression) or probability (MLP), as scikit-learn calibrates them.
    """

    def __init__(self, mean: np.ndarray, scale: np.ndarray, weights: list[np.ndarray],
                 biases: list[np.ndarray], activation: str, output: str,
                 a: float, b: float) -> None:
        super().__init__()
        self.register_buffer("mean", _t(mean))
        self.register_buffer("scale", _t(scale))
        for i, (w, c) in enumerate(zip(weights, biases, strict=True)):
            self.register_buffer(f"weight{i}", _t(w))
            self.register_buffer(f"bias{i}", _t(c))
        self.layers = len(weights)
        self.activation = activation
        self.output = output  # "decision" (a logit) or "probability" (MLP's sigmoid output)
        self.a, self.b = float(a), float(b)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = (features.to(torch.float64) - self.mean) / self.scale
        act = _ACTIVATIONS[self.activation]
        for i in range(self.layers):
            h = h @ getattr(self, f"weight{i}") + getattr(self, f"bias{i}")
            if i < self.layers - 1:
                h = act(h)
        f = h[:, 0]
        if self.output == "probability":
            f = torch.sigmoid(f)
        return torch.sigmoid(-(self.a * f + self.b))


def torch_detector(detector: PathDetector) -> TorchDetector | None:
    """The torch version of a fitted detector, or None where none is exact (tree ensembles,
    isotonic calibration, calibration that kept one model per fold)."""
    calibrated = detector.estimator_
    parts = calibrated.calibrated_classifiers_
    if len(parts) != 1 or len(parts[0].calibrators) != 1:
        return None
    calibrator = parts[0].calibrators[0]
    if not hasattr(calibrator, "a_"):  # isotonic
        return None
    pipeline = parts[0].estimator
    scaler, model = pipeline[0], pipeline[-1]
    if len(pipeline) != 2 or not hasattr(scaler, "mean_"):
        return None
    scale = np.where(scaler.scale_ == 0, 1.0, scaler.scale_)  # as StandardScaler treats zeros
    if isinstance(model, LogisticRegression):
        return TorchDetector(scaler.mean_, scale, [model.coef_.T], [model.intercept_],
                             "identity", "decision", calibrator.a_, calibrator.b_)
    if isinstance(model, MLPClassifier) and model.out_activation_ == "logistic":
        return TorchDetector(scaler.mean_, scale, list(model.coefs_), list(model.intercepts_),
                             model.activation, "probability", calibrator.a_, calibrator.b_)
    return None
