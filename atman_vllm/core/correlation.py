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


def cosine_similarity(rows: np.ndarray, token_ids: Sequence[int] | None = None) -> np.ndarray:
    """Pairwise cosine similarity of embedding rows [n, d] -> [n, n].

    A zero row is similar to nothing (0.0). Identical rows (and, if
    ``token_ids`` is given, equal token ids) are set to exactly 1.0 so that
    kappa = 1 always catches exact duplicates despite rounding.
    """
    x = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    sim = np.clip(unit @ unit.T, -1.0, 1.0)
    # u·u of a normalised row can come out as 1 - 1e-16; duplicates must compare exactly.
    _, row_class = np.unique(x, axis=0, return_inverse=True)
    row_class = row_class.reshape(-1)
    nonzero = norms.reshape(-1) > 0
    same = (row_class[:, None] == row_class[None, :]) & nonzero[:, None] & nonzero[None, :]
    np.fill_diagonal(same, True)
    if token_ids is not None:
        ids = np.asarray(token_ids)
        same |= ids[:, None] == ids[None, :]
    sim[same] = 1.0
    return sim


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
