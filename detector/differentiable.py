"""The fitted detector's calibrated score as torch operations, where that is exact: logistic
regression and the multi-layer perceptron (differentiable), and the tree ensembles (random
forest, extremely randomized trees: piecewise constant).

:class:`detector.estimator.PathDetector` is fitted with scikit-learn (a scaler, the inner model,
sigmoid or isotonic calibration). For a linear or MLP inner model with sigmoid calibration the
whole map features -> calibrated probability is a small differentiable function; its fitted
parameters are copied into :class:`TorchDetector`, which gives the same scores as
``predict_proba`` up to rounding (it computes in float64; scikit-learn keeps float32 features
and weights fitted on them in float32: differences of order 1e-7) and gradients with respect to
the features. A tree ensemble's trees are copied into :class:`TorchForest`, which walks every
tree at once with tensor lookups and gives ``predict_proba``'s scores (the same float32
comparisons; the tree average may round differently in the last bits). It is piecewise
constant: its gradient is zero almost everywhere, so attacks need a stand-in for it
(:mod:`evaluation.adaptive.surrogate`); ``differentiable`` says which kind an export is.
Serving uses either because it is much cheaper than scikit-learn's per-call overhead at batch 1
(the forest: docs/RESULTS.md 2.7), and adaptive attacks descend on the differentiable score
that ships instead of a stand-in. Gradient boosting and isotonic calibration have no export
(:func:`torch_detector` returns None) and scikit-learn scores them.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from torch import nn

from detector.estimator import PathDetector

#: Largest (inputs x split nodes) table :class:`TorchForest` decides at once (a 100-tree forest
#: has some 15,000 split nodes: a few inputs); more inputs walk the trees level by level.
_TABLE_ELEMENTS = 1 << 17

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

    differentiable = True

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


class TorchForest(nn.Module):
    """features (N, F) -> (N,) float64 calibrated probability in [0, 1] that the input is
    adversarial, equal to ``PathDetector.predict_proba(features)[:, 1]`` for a random forest or
    extremely randomized trees as the inner model; not differentiable (piecewise constant).

    Built by :func:`torch_detector` from a random forest or extremely randomized trees. The T
    trees' nodes are stored end to end: per node the feature it splits on, its threshold, the
    indices of its children (a leaf's point to itself) and its share of adversarial training
    samples times -a / T (leaves; a, b the sigmoid calibration's parameters, so that the
    calibrated probability is sigmoid(sum over the trees' leaves - b)); ``roots`` (T,) are the
    first node of each tree, ``depth`` the deepest tree's depth.
    """

    differentiable = False

    def __init__(self, mean: np.ndarray, scale: np.ndarray,
                 forest: RandomForestClassifier | ExtraTreesClassifier, a: float, b: float
                 ) -> None:
        super().__init__()
        trees = [e.tree_ for e in forest.estimators_]
        # every tree's nodes in one numbering: first the split nodes of all trees, then the
        # leaves, so that the splits a batch-1 walk decides are one contiguous slice
        leaf = np.concatenate([t.children_left < 0 for t in trees])
        sizes = np.array([t.node_count for t in trees])
        offsets = np.r_[0, np.cumsum(sizes)[:-1]]
        order = np.argsort(leaf, kind="stable")  # new id -> old id
        new_id = np.empty(len(leaf), dtype=np.int64)
        new_id[order] = np.arange(len(leaf))
        old = np.arange(len(leaf))

        def cat(part: str) -> np.ndarray:
            return np.concatenate([getattr(t, part) for t in trees])

        def renumbered(children: np.ndarray) -> np.ndarray:  # a leaf's child: itself
            return new_id[np.where(leaf, old, children + np.repeat(offsets, sizes))]

        right, left = renumbered(cat("children_right")), renumbered(cat("children_left"))
        positive = np.concatenate([t.value[:, 0, 1] for t in trees])  # class shares (>= 1.4)
        # StandardScaler casts its mean and scale to the features' float32 before using them
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, dtype=np.float32)))
        # per node, in the new numbering: the feature and threshold it splits on (leaves: 0),
        # its left and right children (a leaf's: itself), its class share. Node ids and features
        # are int32: half the bytes of the tables a walk reads, which at batch 1 are mostly out
        # of cache after the network's pass
        ids = dict(dtype=torch.int32)
        self.register_buffer("feature", torch.as_tensor(np.where(leaf, 0, cat("feature"))[order],
                                                        **ids))
        self.register_buffer("threshold", torch.as_tensor(_float32_below(
            np.where(leaf, 0.0, cat("threshold"))[order])))
        self.register_buffer("left", torch.as_tensor(left[order], **ids))
        self.register_buffer("right", torch.as_tensor(right[order], **ids))
        # each leaf's term of the calibrated logit: -(a * mean of the T shares + b) is the sum
        # of the T leaves' terms - b
        self.register_buffer("leaf_logit", _t(-float(a) / len(trees) * positive[order]))
        self.register_buffer("roots", torch.as_tensor(new_id[offsets], **ids))
        self.splits = int((~leaf).sum())
        self.register_buffer("leaves", torch.arange(self.splits, len(leaf), **ids))
        self.depth = max(t.max_depth for t in trees)
        self.b = float(b)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # StandardScaler and the trees work on float32 as scikit-learn does (each operation
        # correctly rounded, in numpy as in torch); the float32 thresholds split alike
        x = (features.detach().to(torch.float32) - self.mean) / self.scale
        n, nodes = len(x), len(self.leaf_logit)
        if n * self.splits <= _TABLE_ELEMENTS:  # few inputs: fewest operations
            # decide every split at once, giving each node's successor for each input (a leaf
            # is its own); the walk is then one lookup per level, in one flat table where
            # input r's node j is at r * nodes + j
            s = self.splits
            goes_left = x.index_select(1, self.feature[:s]) <= self.threshold[:s]  # (N, splits)
            successor = torch.cat([torch.where(goes_left, self.left[:s], self.right[:s]),
                                   self.leaves.expand(n, -1)], 1)  # (N, nodes)
            node = self.roots
            if n > 1:
                base = torch.arange(0, n * nodes, nodes, dtype=torch.int32)[:, None]  # (N, 1)
                successor, node = successor + base, node + base
            table, node = successor.flatten(), node.flatten()
            for _ in range(self.depth):
                node = table.index_select(0, node)
            node = node.view(n, -1) if n == 1 else node.view(n, -1) - base  # (N, T)
        else:  # many inputs: decide only the splits on their paths, (N, T) nodes at a time
            node = self.roots.long().expand(n, -1)
            for _ in range(self.depth):  # take(): cheaper than indexing with a tensor
                at = x.gather(1, self.feature.take(node).long())
                node = torch.where(at <= self.threshold.take(node), self.left.take(node),
                                   self.right.take(node)).long()
        return torch.sigmoid(self.leaf_logit[node].sum(1) - self.b)


def _float32_below(threshold: np.ndarray) -> np.ndarray:
    """The largest float32 at or below each float64 threshold: for a float32 value x,
    ``x <= threshold`` exactly when ``x <= _float32_below(threshold)`` (scikit-learn's trees
    compare float32 features with float64 thresholds)."""
    below = threshold.astype(np.float32)
    up = below.astype(np.float64) > threshold
    below[up] = np.nextafter(below[up], np.float32(-np.inf))
    return below


def torch_detector(detector: PathDetector) -> TorchDetector | TorchForest | None:
    """The torch version of a fitted detector, or None where none is exact (gradient boosting,
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
    if isinstance(model, RandomForestClassifier | ExtraTreesClassifier) and model.n_outputs_ == 1:
        return TorchForest(scaler.mean_, scale, model, calibrator.a_, calibrator.b_)
    return None
