"""greg.metrics: hand-computed values, tie rules of both FPR95 conventions, sklearn agreement, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from greg.metrics import accuracy, auroc, id_threshold, ood_metrics


def test_hand_computed_small_case():
    # ID 1,2,3,4 ; OOD 3.5, 5 (higher = more OOD).
    m = ood_metrics([1, 2, 3, 4], [3.5, 5])
    # ID recall 3/4 (accept s<=3 or s<=3.5) vs 4/4 (accept s<=4, lets 3.5 in): 1.0 is closest to 0.95.
    assert m["fpr95"] == 0.5 and m["fpr95_idpos"] == 0.5
    # OOD recall reaches 1 at threshold 3.5; ID sample 4 is then flagged: 1/4.
    assert m["fpr95_oodpos"] == 0.25
    assert m["auroc"] == pytest.approx(7 / 8)
    # AP (OOD positive): R .5 at P 1 (s>=5), R 1 at P 2/3 (s>=3.5).
    assert m["aupr_out"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # AP (ID positive, ascending s): three steps at P 1, the last at P 4/5.
    assert m["aupr_in"] == pytest.approx(0.75 + 0.25 * 0.8)


def test_all_equal_scores():
    m = ood_metrics(np.zeros(3), np.zeros(2))
    assert m["fpr95"] == 1.0
    assert m["fpr95_oodpos"] == 1.0
    assert m["auroc"] == 0.5
    assert m["aupr_in"] == pytest.approx(3 / 5)
    assert m["aupr_out"] == pytest.approx(2 / 5)


def test_single_sample_each():
    good = ood_metrics([0.0], [1.0])
    assert good == {
        "fpr95": 0.0,
        "fpr95_idpos": 0.0,
        "fpr95_oodpos": 0.0,
        "auroc": 1.0,
        "aupr_in": 1.0,
        "aupr_out": 1.0,
    }
    bad = ood_metrics([1.0], [0.0])
    assert bad["fpr95"] == 1.0 and bad["fpr95_oodpos"] == 1.0 and bad["auroc"] == 0.0
    assert bad["aupr_in"] == 0.5 and bad["aupr_out"] == 0.5


def test_ties_between_id_and_ood_count_half():
    # ID 0,1 ; OOD 1,2: pairs (1>0),(1=1 -> 1/2),(2>0),(2>1) -> 3.5/4.
    assert auroc([0, 1], [1, 2]) == pytest.approx(3.5 / 4)
    m = ood_metrics([0, 1], [1, 2])
    # Paper rule: full ID recall needs s<=1, which accepts the tied OOD sample; recall 1/2 is farther.
    assert m["fpr95"] == 0.5
    # OOD-positive: 100% OOD recall needs s>=1, which also flags the tied ID sample.
    assert m["fpr95_oodpos"] == 0.5


def test_closest_recall_rule_can_pick_recall_below_95():
    # 10 ID samples: recall steps of 0.1, and in float |0.9 - 0.95| < |1.0 - 0.95|, so the OE rule
    # takes 90 % ID recall. OOD tied with the top ID score: full recall would accept it, 90 % does not.
    assert ood_metrics(np.arange(10.0), [9.0])["fpr95"] == 0.0
    # Among thresholds with equal recall the one nearest full recall wins (the walk starts there):
    # OOD at 8.5 lies between ID 8 and 9, so "s <= 8.5" (recall 0.9, accepts it) is taken over "s <= 8".
    assert ood_metrics(np.arange(10.0), [8.5])["fpr95"] == 1.0
    # With 20 ID samples recall 0.95 exists exactly: accept s<=18 -> the OOD sample at 17.5 is accepted.
    assert ood_metrics(np.arange(20.0), [17.5, 30.0])["fpr95"] == 0.5


def test_conventions_disagree_by_tens_of_points():
    # Wide OOD distribution: 60 easy OOD samples far above ID, 40 spread over the ID range.
    s_id = np.arange(100.0)
    s_ood = np.r_[2.5 * np.arange(40) + 0.5, 1000.0 + np.arange(60)]
    m = ood_metrics(s_id, s_ood)
    # Paper: accept ID s<=94 (95 %): OOD 0.5, 3.0, ..., 93.0 accepted = 38 of 100.
    assert m["fpr95"] == pytest.approx(0.38)
    # OOD-positive: 95 OOD flagged needs threshold 13.0 (k=5): ID 13..99 flagged = 87 of 100.
    assert m["fpr95_oodpos"] == pytest.approx(0.87)
    # Tied OOD scores in the middle of the ID range: 100 vs 50.
    m = ood_metrics(np.arange(100.0), np.full(100, 50.0))
    assert m["fpr95"] == 1.0 and m["fpr95_oodpos"] == 0.5


@pytest.mark.parametrize("levels", [None, 3])
def test_agrees_with_sklearn(levels):
    rng = np.random.default_rng(0)
    for _ in range(30):
        n_id, n_ood = rng.integers(1, 80, size=2)
        s_id, s_ood = rng.normal(0, 1, n_id), rng.normal(0.8, 2, n_ood)
        if levels:  # many ties
            s_id, s_ood = np.round(s_id * levels) / levels, np.round(s_ood * levels) / levels
        y = np.r_[np.zeros(n_id), np.ones(n_ood)]
        s = np.r_[s_id, s_ood]
        m = ood_metrics(s_id, s_ood)
        assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert m["aupr_out"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
        assert m["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-12)
        fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
        assert m["fpr95_oodpos"] == fpr[np.argmax(tpr >= 0.95)]


def test_accepts_tensors_and_lists():
    a = ood_metrics(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([3.5, 5.0]))
    b = ood_metrics([1, 2, 3, 4], np.array([3.5, 5]))
    assert a == b


@pytest.mark.parametrize(
    "s_id, s_ood, match",
    [
        ([], [1.0], "scores_id: empty"),
        ([1.0], [], "scores_ood: empty"),
        ([1.0, np.nan], [1.0], "scores_id: 1 of 2 scores are NaN"),
        ([1.0], [np.inf], "scores_ood: 1 of 1 scores are NaN or infinite"),
        (np.zeros((2, 2)), [1.0], "1-D"),
    ],
)
def test_validation(s_id, s_ood, match):
    with pytest.raises(ValueError, match=match):
        ood_metrics(s_id, s_ood)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0], [0.0, 0.1]])
    labels = torch.tensor([0, 1, 1, 0])
    assert accuracy(logits, labels) == 0.5
    assert accuracy(logits.numpy(), labels.numpy()) == 0.5
    with pytest.raises(ValueError, match="3 entries"):
        accuracy(logits, labels[:3])
    with pytest.raises(ValueError, match="shape"):
        accuracy(logits[:, 0], labels)


def test_id_threshold():
    assert id_threshold(np.arange(1.0, 101.0)) == 95.0  # 95 of 100 at or below
    assert id_threshold(np.arange(20.0)[::-1]) == 18.0  # 19 of 20
    assert id_threshold([3.0]) == 3.0
    with pytest.raises(ValueError):
        id_threshold([1.0], tpr=0.0)
