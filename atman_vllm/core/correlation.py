"""Correlated (conceptual) suppression, ATMAN_SPEC §5.

Suppressing a unit also suppresses tokens whose input embeddings are similar
(cosine >= kappa), with a factor interpolated by similarity:
``f_k = (1 - f)(1 - s) + f``, so a duplicate (s = 1) gets f and a token at
s = kappa proportionally less. The candidates are all content tokens of the
sequence, prompt and target, never the BOS: the BOS carries no content and is
the attention sink every row relies on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


class CosineSimilarity:
    """Pairwise cosine similarity of embedding rows [n, d], computed block by block on demand.

    Memory is O(n·d) whatever n is (never an n × n matrix), so correlated
    suppression stays bounded for any prompt. A zero row is similar to
    nothing (0.0). Identical rows (and, if ``token_ids`` is given, equal token
    ids) are exactly 1.0 similar, so kappa = 1 always catches exact duplicates
    despite rounding (u·u of a normalised row can come out as 1 - 1e-16).
    """

    def __init__(self, rows: np.ndarray, token_ids: Sequence[int] | None = None):
        x = np.asarray(rows, dtype=np.float64)
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        self._unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        _, row_class = np.unique(x, axis=0, return_inverse=True)
        self._class = row_class.reshape(-1)
        self._nonzero = norms.reshape(-1) > 0
        self._ids = None if token_ids is None else np.asarray(token_ids)

    def block(self, a: Sequence[int], b: Sequence[int]) -> np.ndarray:
        """[len(a), len(b)] similarities of rows ``a`` to rows ``b``."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        sim = np.clip(self._unit[a] @ self._unit[b].T, -1.0, 1.0)
        same = ((self._class[a][:, None] == self._class[b][None, :])
                & self._nonzero[a][:, None] & self._nonzero[b][None, :])
        same |= a[:, None] == b[None, :]
        if self._ids is not None:
            same |= self._ids[a][:, None] == self._ids[b][None, :]
        sim[same] = 1.0
        return sim


def cosine_similarity(rows: np.ndarray, token_ids: Sequence[int] | None = None) -> np.ndarray:
    """The full [n, n] matrix of ``CosineSimilarity`` (for small n: tests, tools)."""
    n = np.asarray(rows).shape[0]
    return CosineSimilarity(rows, token_ids).block(range(n), range(n))


def correlated_factors(
    unit_positions: Sequence[int],
    candidate_positions: Sequence[int],
    similarity: np.ndarray,
    kappa: float,
    factor: float,
) -> dict[int, float]:
    """Per-position factors for suppressing one unit with correlated suppression.

    ``similarity[a, b]`` is the cosine similarity between the token at
    ``unit_positions[a]`` and the one at ``candidate_positions[b]``. The unit's
    own tokens get ``factor``; a candidate k outside the unit with
    s = max_a similarity[a, k] >= kappa gets ``(1 - factor)(1 - s) + factor``.
    Candidates whose factor would be exactly 1 (s = 0) are left out: they
    change nothing.
    """
    sim = np.asarray(similarity, dtype=np.float64).reshape(len(unit_positions), len(candidate_positions))
    best = np.clip(sim.max(axis=0), -1.0, 1.0) if len(unit_positions) else np.zeros(len(candidate_positions))
    factors = {int(p): float(factor) for p in unit_positions}
    for k, s in zip(candidate_positions, best):
        k = int(k)
        if k in factors or s < kappa:
            continue
        f_k = (1.0 - factor) * (1.0 - float(s)) + factor
        if f_k != 1.0:
            factors[k] = f_k
    return factors
