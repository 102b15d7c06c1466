"""Ranking quality of an explanation against known evidence (ATMAN_SPEC §8).

One explanation gives a score to each prompt unit of the context; a unit is
*positive* if its characters overlap an evidence span. Per example:

- **AP** (average precision), with ties handled as scikit-learn's
  ``average_precision_score`` does: the ranking is cut at each distinct score,
  ``AP = Σ_n (R_n − R_{n−1}) · P_n`` over those cuts (highest score first),
  so tied units are taken together and the order inside a tie cannot help or
  hurt.
- **recall** = recall@k with k = the number of positive units: the share of
  positives among the k highest-scored units. Tied units at the k-th score
  count with their expected share (as if the tie were broken at random).
  Because k equals the number of positives, this is also R-precision.

Over examples: the mean (mAP, mAR) and the interquartile mean, IQM: sort the
values and average the middle half — drop ⌊n/4⌋ values at each end
(``scipy.stats.trim_mean(x, 0.25)``). That is "the mean of the values between
the 25th and 75th percentile", well defined when many values tie (an AP of 1
is common here).

Examples without any positive unit (evidence outside the scored units) have
no AP; they are counted in ``skipped`` and left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np


def average_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """AP of ranking ``scores`` (higher = more relevant) against binary ``labels``."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of equal length")
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive unit")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    # Indices of the last element of each group of tied scores.
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[last_of_group]
    seen = last_of_group + 1
    precision = tp / seen
    recall = tp / n_pos
    prev_recall = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev_recall) * precision))


def recall_at_k(scores: Sequence[float], labels: Sequence[bool], k: int | None = None) -> float:
    """Expected share of positives among the ``k`` top-scored units (k = #positives by default)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise ValueError("recall needs at least one positive unit")
    k = n_pos if k is None else int(k)
    if not 1 <= k <= len(s):
        raise ValueError(f"k must be in 1..{len(s)}")
    kth = np.sort(s)[::-1][k - 1]
    above = s > kth
    tied = s == kth
    slots = k - int(above.sum())  # how many of the tied units make the cut
    hits = float(y[above].sum()) + slots * float(y[tied].sum()) / float(tied.sum())
    return hits / n_pos


def interquartile_mean(values: Iterable[float]) -> float:
    """Mean of the middle half of the sorted values (⌊n/4⌋ dropped at each end)."""
    v = np.sort(np.asarray(list(values), dtype=np.float64))
    if len(v) == 0:
        return float("nan")
    cut = len(v) // 4
    return float(v[cut:len(v) - cut].mean())


def overlaps(span: tuple[int, int], evidence: Sequence[tuple[int, int]]) -> bool:
    """Whether char span (start, end) shares at least one character with an evidence span."""
    s, e = span
    return any(s < ee and ss < e for ss, ee in evidence)


@dataclass(frozen=True)
class ExampleScore:
    ap: float
    recall: float
    qtype: str
    n_units: int
    n_positive: int


@dataclass
class Summary:
    """mAP/mAR and their IQMs, overall and per question type."""

    n: int
    mAP: float
    mAR: float
    iqm_AP: float
    iqm_AR: float
    skipped: int = 0
    by_qtype: dict[str, "Summary"] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"n": self.n, "mAP": self.mAP, "mAR": self.mAR, "iqm_AP": self.iqm_AP,
             "iqm_AR": self.iqm_AR, "skipped": self.skipped}
        if self.by_qtype:
            d["by_qtype"] = {k: v.to_dict() for k, v in self.by_qtype.items()}
        return d


def score_example(unit_spans: Sequence[tuple[int, int]], unit_scores: Sequence[float],
                  evidence: Sequence[tuple[int, int]], qtype: str) -> ExampleScore | None:
    """AP and recall@#positives of one explanation; None if no unit is positive."""
    labels = [overlaps(sp, evidence) for sp in unit_spans]
    if not any(labels):
        return None
    return ExampleScore(average_precision(unit_scores, labels), recall_at_k(unit_scores, labels),
                        qtype, len(labels), sum(labels))


def summarize(scores: Sequence[ExampleScore | None], per_qtype: bool = True) -> Summary:
    kept = [s for s in scores if s is not None]
    skipped = len(scores) - len(kept)
    if not kept:
        return Summary(0, float("nan"), float("nan"), float("nan"), float("nan"), skipped)
    aps = [s.ap for s in kept]
    ars = [s.recall for s in kept]
    out = Summary(len(kept), float(np.mean(aps)), float(np.mean(ars)),
                  interquartile_mean(aps), interquartile_mean(ars), skipped)
    if per_qtype:
        for q in sorted({s.qtype for s in kept}):
            out.by_qtype[q] = summarize([s for s in kept if s.qtype == q], per_qtype=False)
    return out
