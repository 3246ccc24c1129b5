"""evaluation.metrics on hand-computed cases (named apart from tests/service/test_metrics.py:
the test directories are not packages, so test module names must differ)."""

import numpy as np
import pytest

from evaluation.metrics import attack_metrics, detection_metrics, tpr_at_fpr, worst_case

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
    attacks = {"a": {"n_adv": 3, "auroc": 0.9, "tpr_at_5": 0.2},
               "b": {"n_adv": 5, "auroc": 0.8, "tpr_at_5": 0.7}, "c": {"n_adv": 0}}
    assert worst_case(attacks) == {"auroc": 0.8, "auroc_attack": "b", "tpr_at_5": 0.2,
                                   "tpr_at_5_attack": "a"}
    tied = {"x": {"n_adv": 1, "auroc": 0.7, "tpr_at_5": 0.1},
            "y": {"n_adv": 1, "auroc": 0.7, "tpr_at_5": 0.1}}
    assert worst_case(tied)["auroc_attack"] == "x"  # the first in order
    with pytest.raises(ValueError, match="no successful adversarial example"):
        worst_case({"c": {"n_adv": 0}})


def test_attack_metrics_add_success_and_fitted():
    out = attack_metrics(CLEAN, {"FGSM": ADV, "CW": np.empty(0)}, 0.3,
                         attempts={"FGSM": 4, "CW": 0}, fitted={"FGSM"}, seed=0)
    assert out["FGSM"] == {"fitted": True, "success": 0.75,
                           **detection_metrics(CLEAN, ADV, 0.3, 0)}
    assert out["CW"] == {"fitted": False, "success": 0.0, "n_adv": 0}
