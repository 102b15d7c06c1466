"""Ranking metrics: AP, recall@#positives, IQM, and their tie handling.

The exact comparisons (``== 1.0``, ``== 0.5``) are on means of precisions like 1/1, 2/2 and 1/2:
dyadic fractions that float64 represents exactly, so no rounding can occur.
"""

from __future__ import annotations

import numpy as np
import pytest

from atman_vllm.quality.metrics import (
    average_precision, interquartile_mean, overlaps, recall_at_k, score_example, summarize,
)


def test_perfect_and_worst_rankings():
    assert average_precision([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert recall_at_k([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    # Positives last of 4: precision 1/3 at rank 3, 2/4 at rank 4.
    assert average_precision([3, 2, 1, 0], [0, 0, 1, 1]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert recall_at_k([3, 2, 1, 0], [0, 0, 1, 1]) == 0.0


def test_ap_matches_hand_computation():
    # ranking: P N P N N -> precisions at hits 1/1, 2/3
    assert average_precision([5, 4, 3, 2, 1], [1, 0, 1, 0, 0]) == pytest.approx((1 + 2 / 3) / 2)


def test_ap_agrees_with_sklearn_definition_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        y = rng.random(n) < 0.3
        if not y.any():
            y[0] = True
        s = rng.integers(0, 4, n).astype(float)  # many ties
        # Reference: sklearn's step-wise AP over distinct thresholds.
        thresholds = np.unique(s)[::-1]
        ap, prev_r = 0.0, 0.0
        for t in thresholds:
            sel = s >= t
            tp = (y & sel).sum()
            r, p = tp / y.sum(), tp / sel.sum()
            ap += (r - prev_r) * p
            prev_r = r
        assert average_precision(s, y) == pytest.approx(ap)


def test_ties_cannot_be_exploited():
    """A constant score is no better than chance, whatever order the units come in."""
    labels = [1, 0, 0, 0]
    assert average_precision([0, 0, 0, 0], labels) == pytest.approx(0.25)
    assert average_precision([0, 0, 0, 0], labels[::-1]) == pytest.approx(0.25)
    assert recall_at_k([1, 1, 1, 1], labels) == pytest.approx(0.25)


def test_recall_at_k_counts_expected_share_of_a_tie_at_the_cut():
    # k = 2 positives; top unit positive, then a tie of 2 units (1 positive) for 1 slot.
    assert recall_at_k([9, 5, 5, 0], [1, 1, 0, 0]) == pytest.approx((1 + 0.5) / 2)
    assert recall_at_k([9, 5, 5, 0], [1, 1, 0, 0], k=3) == pytest.approx(1.0)


def test_errors_on_no_positive_or_bad_input():
    with pytest.raises(ValueError):
        average_precision([1, 2], [0, 0])
    with pytest.raises(ValueError):
        recall_at_k([1, 2], [0, 0])
    with pytest.raises(ValueError):
        average_precision([1, float("nan")], [1, 0])
    with pytest.raises(ValueError):
        average_precision([1, 2, 3], [1, 0])


def test_interquartile_mean_drops_a_quarter_at_each_end():
    assert interquartile_mean([0, 1, 2, 3, 4, 5, 6, 100]) == pytest.approx(np.mean([2, 3, 4, 5]))
    assert interquartile_mean([1.0, 1.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert interquartile_mean([7.0]) == 7.0


def test_overlap_is_strict_about_touching_spans():
    assert overlaps((0, 5), [(4, 10)])
    assert not overlaps((0, 4), [(4, 10)])
    assert not overlaps((10, 12), [(4, 10)])


def test_score_example_and_summary_by_qtype():
    spans = [(0, 5), (6, 10), (11, 15)]
    a = score_example(spans, [0.1, 0.9, 0.0], [(6, 10)], "q1")
    b = score_example(spans, [0.9, 0.1, 0.0], [(6, 10)], "q2")
    none = score_example(spans, [1, 2, 3], [(20, 30)], "q1")
    assert a.ap == 1.0 and b.ap == 0.5 and none is None
    summary = summarize([a, b, none])
    assert summary.n == 2 and summary.skipped == 1
    assert summary.mAP == pytest.approx(0.75)
    assert summary.by_qtype["q1"].mAP == 1.0 and summary.by_qtype["q2"].mAP == 0.5
