"""Correlated suppression (ATMAN_SPEC §5), alone and through the planner."""

import numpy as np
import pytest

from atman_vllm.core import (
    ExplainOptions,
    ExplainRequest,
    InvalidRequestError,
    correlated_factors,
    cosine_similarity,
    plan_explanation,
)
from fake_tokenizer import FakeTokenizer


def test_factors_follow_the_interpolation_formula():
    sim = np.array([[0.9, 0.5, 0.7, 0.2],
                    [0.3, 0.8, 0.1, 0.2]])  # unit tokens 1, 2 vs candidates 5..8
    got = correlated_factors([1, 2], [5, 6, 7, 8], sim, kappa=0.6, factor=0.1)
    f = 0.1
    assert got == pytest.approx({1: f, 2: f,
                                 5: (1 - f) * (1 - 0.9) + f,  # max over the unit's tokens
                                 6: (1 - f) * (1 - 0.8) + f,
                                 7: (1 - f) * (1 - 0.7) + f})
    assert 8 not in got  # 0.2 < kappa: untouched


def test_unit_tokens_get_the_full_factor_even_as_candidates():
    sim = np.array([[1.0, 0.0]])
    # Exact: the unit's own token gets the factor itself, copied.
    assert correlated_factors([3], [3, 4], sim, kappa=0.0, factor=0.2) == {3: 0.2}  # s=0 -> factor 1: left out


def test_kappa_one_reaches_only_exact_duplicates():
    rows = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3001], [0.1, 0.2, 0.3], [0.3, -0.1, 0.0]])
    sim = cosine_similarity(rows)
    # Exact by construction: cosine_similarity sets identical rows to 1.0 rather than computing them.
    assert 0.99 < sim[0, 1] < 1.0 and sim[0, 2] == 1.0
    got = correlated_factors([0], [1, 2, 3], sim[[0]][:, [1, 2, 3]], kappa=1.0, factor=0.1)
    assert got == {0: 0.1, 2: pytest.approx(0.1)}


def test_equal_token_ids_are_exactly_similar_and_zero_rows_similar_to_nothing():
    rows = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.2, 0.1]])
    sim = cosine_similarity(rows, token_ids=[7, 7, 9, 10, 11])
    # Exact by construction: duplicates are set to 1.0, zero rows normalise to 0 and give 0.0 products.
    assert sim[0, 1] == 1.0 and sim[0, 2] == 0.0 and sim[2, 3] == 0.0 and sim[2, 2] == 1.0
    sim = cosine_similarity(rows[[0, 4]], token_ids=[5, 5])  # equal ids count as duplicates whatever the rows
    assert sim[0, 1] == 1.0


def _embeddings_for(tok: FakeTokenizer):
    """Rows chosen per token string: " burgers" and "burgers" alike, everything else orthogonal."""
    def rows(ids):
        out = np.zeros((len(ids), 64))
        for r, i in enumerate(ids):
            piece = tok.inverse[i].strip().lower()
            if piece == "burgers":
                out[r, 0] = 1.0
                out[r, 1] = 0.0 if tok.inverse[i].startswith(" ") else 0.5  # similarity 1/sqrt(1.25) ~ 0.894
            else:
                out[r, 2 + i] = 1.0
        return out
    return rows


def test_planner_spreads_suppression_to_similar_tokens_never_to_bos():
    tok = FakeTokenizer()
    prompt, target = "burgers and more burgers", " burgers"
    opts = ExplainOptions(granularity="token", kappa=0.8, factor=0.1)
    plan = plan_explanation(ExplainRequest(prompt, target, opts), tok, _embeddings_for(tok))
    # positions: 0 BOS, 1 "burgers", 2 " and", 3 " more", 4 " burgers", 5 target " burgers"
    first = plan.jobs[1].bias
    s = 1 / np.sqrt(1.25)
    assert first.positions == (1, 4, 5)
    assert first.factors == pytest.approx((0.1, 0.9 * (1 - s) + 0.1, 0.9 * (1 - s) + 0.1))
    last = plan.jobs[4].bias  # " burgers" in the prompt: its exact duplicate in the target gets f
    # Exact: similarity exactly 1.0 gives (1 - f) * 0.0 + f = f.
    assert last.positions == (1, 4, 5) and last.factors[1:] == (0.1, 0.1)
    assert plan.jobs[2].bias.positions == (2,)  # " and" resembles nothing
    assert all(0 not in j.bias.positions for j in plan.jobs[1:])


def test_kappa_needs_embeddings_from_the_backend():
    with pytest.raises(InvalidRequestError) as e:
        plan_explanation(ExplainRequest("a b", " c", ExplainOptions(kappa=0.5)), FakeTokenizer())
    assert e.value.field == "kappa" and "backend" in e.value.message
    with pytest.raises(InvalidRequestError):
        plan_explanation(ExplainRequest("a b", " c", ExplainOptions(kappa=0.5)), FakeTokenizer(), lambda ids: None)
