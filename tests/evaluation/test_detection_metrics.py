"""evaluation.metrics on hand-computed cases (named apart from tests/service/test_metrics.py:
the test directories are not packages, so test module names must differ)."""

import numpy as np
import pytest

from evaluation.catalogue import ITERATIVE_CE, MINIMAL, SINGLE_STEP, family_of_label
from evaluation.metrics import (
    attack_metrics,
    benign_change_metrics,
    detection_metrics,
    tpr_at_fpr,
    worst_benign,
    worst_case,
    worst_case_unseen_family,
)

# 3 clean and 3 adversarial scores. Adversarial-above-clean pairs: 0.25 beats 0.1 and 0.2,
# 0.35 and 0.9 beat all three: 8 of 9 pairs, AUROC 8/9. Nothing clean is above 0.3, so at FPR 0
# the two adversarial scores above 0.3 are caught (TPR 2/3); at FPR 1/3 (0.3 flagged) all are.
CLEAN = np.array([0.1, 0.2, 0.3])
ADV = np.array([0.25, 0.35, 0.9])


def test_three_clean_three_adversarial_by_hand():
    m = detection_metrics(CLEAN, ADV, threshold=0.3, seed=0)
    assert m["n_adv"] == 3
    assert m["auroc"] == pytest.approx(8 / 9)
    assert m["tpr_at_5"] == pytest.approx(2 / 3) and m["tpr_at_1"] == pytest.approx(2 / 3)
    # flagged strictly above 0.3: 0.35 and 0.9
    assert m["tpr_at_threshold"] == pytest.approx(2 / 3)
    # balanced set = all 3 of each: 3 clean at or below 0.3, 2 adversarial above it
    assert m["balanced_accuracy"] == pytest.approx(5 / 6)


@pytest.mark.parametrize(("fpr", "tpr"), [(0.0, 2 / 3), (0.3, 2 / 3), (1 / 3, 1.0), (1.0, 1.0)])
def test_tpr_at_fpr_reads_the_roc_curve(fpr, tpr):
    assert tpr_at_fpr(CLEAN, ADV, fpr) == pytest.approx(tpr)


def test_ties_count_half_and_are_not_flagged():
    # pairs: 0.5 > 0.2 (1), 0.5 = 0.5 (1/2), 0.9 beats both (2): 3.5 / 4
    clean, adv = np.array([0.2, 0.5]), np.array([0.5, 0.9])
    m = detection_metrics(clean, adv, threshold=0.5)
    assert m["auroc"] == pytest.approx(0.875)
    assert m["tpr_at_5"] == pytest.approx(0.5)  # only 0.9 is above every clean score
    assert m["tpr_at_threshold"] == pytest.approx(0.5)  # 0.5 is not above the threshold 0.5
    assert detection_metrics(np.full(3, 0.5), np.full(2, 0.5), 0.5)["auroc"] == 0.5


def test_empty_adversarial_set():
    assert detection_metrics(CLEAN, np.empty(0), threshold=0.3) == {"n_adv": 0}


def test_balanced_accuracy_draws_the_smaller_side():
    # 4 clean scores, 2 adversarial: 2 clean drawn with the seed; all clean are below 0.5
    m = detection_metrics(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.6, 0.45]), 0.5, seed=3)
    assert m["balanced_accuracy"] == pytest.approx((2 + 1) / 4)


def test_worst_case_over_attacks_with_examples():
    attacks = {"a": {"n_adv": 3, "auroc": 0.9, "tpr_at_5": 0.2, "tpr_at_threshold": 0.6},
               "b": {"n_adv": 5, "auroc": 0.8, "tpr_at_5": 0.7, "tpr_at_threshold": 0.5},
               "c": {"n_adv": 0}}
    assert worst_case(attacks) == {"auroc": 0.8, "auroc_attack": "b", "tpr_at_5": 0.2,
                                   "tpr_at_5_attack": "a", "tpr_at_threshold": 0.5,
                                   "tpr_at_threshold_attack": "b"}
    tied = {"x": {"n_adv": 1, "auroc": 0.7, "tpr_at_5": 0.1, "tpr_at_threshold": 0.1},
            "y": {"n_adv": 1, "auroc": 0.7, "tpr_at_5": 0.1, "tpr_at_threshold": 0.1}}
    assert worst_case(tied)["auroc_attack"] == "x"  # the first in order
    with pytest.raises(ValueError, match="no successful adversarial example"):
        worst_case({"c": {"n_adv": 0}})


def test_attack_metrics_add_success_family_and_fitted():
    out = attack_metrics(CLEAN, {"FGSM eps=0.1": ADV, "CW": np.empty(0)}, 0.3,
                         attempts={"FGSM eps=0.1": 4, "CW": 0}, fitted={"FGSM eps=0.1"},
                         seed=0)
    assert out["FGSM eps=0.1"] == {"family": SINGLE_STEP, "fitted": True, "family_fitted": True,
                                   "images": 4, "success": 0.75,
                                   **detection_metrics(CLEAN, ADV, 0.3, 0)}
    assert out["CW"] == {"family": MINIMAL, "fitted": False, "family_fitted": False,
                         "images": 0, "success": 0.0, "n_adv": 0}


def test_a_family_is_fitted_when_any_of_its_attacks_is():
    advs = {"FGSM eps=0.3": ADV, "RFGSM eps=0.1": ADV, "BIM eps=0.3": ADV, "DEEPFOOL": ADV}
    out = attack_metrics(CLEAN, advs, 0.3, attempts=dict.fromkeys(advs, 3),
                         fitted=["FGSM eps=0.1", "PGD eps=0.2"], seed=0)
    assert [m["fitted"] for m in out.values()] == [False] * 4  # no label fitted exactly
    assert [m["family_fitted"] for m in out.values()] == [True, True, True, False]
    assert out["BIM eps=0.3"]["family"] == ITERATIVE_CE == family_of_label("PGD eps=8/255")


def test_family_of_an_unknown_label_is_its_name():
    assert family_of_label("FOO eps=0.1") == "foo"
    assert family_of_label("PGD-TARGETED eps=1/255") == "targeted"


def _attack(family, fitted, auroc, tpr, n_adv=10):
    return {"family": family, "family_fitted": fitted, "n_adv": n_adv, "auroc": auroc,
            "tpr_at_5": tpr, "tpr_at_threshold": tpr}


def test_worst_case_over_unseen_families_only():
    attacks = {"PGD eps=0.3": _attack(ITERATIVE_CE, True, 0.6, 0.1),  # worst, but fitted
               "CW": _attack(MINIMAL, False, 0.9, 0.5),
               "DEEPFOOL": _attack(MINIMAL, False, 0.8, 0.7),
               "SQUARE eps=0.3": _attack("black-box score-based", False, 0.95, 0.4),
               "FAB": _attack(MINIMAL, False, 0.1, 0.0, n_adv=0)}  # no example: left out
    worst = worst_case_unseen_family(attacks)
    assert worst == {"auroc": 0.8, "auroc_attack": "DEEPFOOL", "tpr_at_5": 0.4,
                     "tpr_at_5_attack": "SQUARE eps=0.3", "tpr_at_threshold": 0.4,
                     "tpr_at_threshold_attack": "SQUARE eps=0.3",
                     "families": [MINIMAL, "black-box score-based"]}
    assert worst_case(attacks)["auroc_attack"] == "PGD eps=0.3"
    fitted_only = {"PGD eps=0.3": attacks["PGD eps=0.3"], "FAB": attacks["FAB"]}
    assert worst_case_unseen_family(fitted_only) is None


def test_benign_change_counts_false_alarms_on_images_still_right():
    before = np.array([True, True, True, True, False])
    after = np.array([True, True, False, True, True])  # one lost, one gained
    flagged = np.array([True, False, True, False, True])  # only rows 0, 1, 3 count
    m = benign_change_metrics(flagged, before, after)
    assert m["n"] == 3 and m["flagged"] == pytest.approx(1 / 3)
    assert m["accuracy_clean"] == m["accuracy"] == pytest.approx(0.8)
    assert m["accuracy_drop"] == pytest.approx(0.0) and m["within_tolerance"]


@pytest.mark.parametrize(("lost", "within"), [(2, True), (3, False)])
def test_accuracy_within_two_points(lost, within):
    before = np.ones(100, bool)
    after = np.r_[np.zeros(lost, bool), np.ones(100 - lost, bool)]
    m = benign_change_metrics(np.zeros(100, bool), before, after)
    assert m["accuracy_drop"] == pytest.approx(lost / 100)
    assert m["within_tolerance"] is within


def test_benign_change_with_no_image_still_right():
    m = benign_change_metrics(np.ones(2, bool), np.ones(2, bool), np.zeros(2, bool))
    assert m["n"] == 0 and m["flagged"] is None and not m["within_tolerance"]


def test_worst_benign_change_among_those_keeping_accuracy():
    benign = {"noise": {"within_tolerance": True, "flagged": 0.04},
              "jpeg 30": {"within_tolerance": False, "flagged": 0.5},  # breaks the classifier
              "shift": {"within_tolerance": True, "flagged": 0.12},
              "empty": {"within_tolerance": True, "flagged": None}}
    assert worst_benign(benign) == {"flagged": 0.12, "change": "shift"}
    assert worst_benign({"jpeg 30": benign["jpeg 30"]}) is None
