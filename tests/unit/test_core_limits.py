"""Limits are checked before the work they bound, planning can be cancelled, and no factor
outside the accepted range reaches a KeyBias."""

from __future__ import annotations

import time

import numpy as np
import pytest

from atman_vllm.core import (
    ExplainOptions,
    ExplainRequest,
    InvalidRequestError,
    KeyBias,
    Limit,
    PlanCancelled,
    PlanLimits,
    plan_controls,
    plan_explanation,
)
from atman_vllm.core.correlation import CosineSimilarity, cosine_similarity

from fake_tokenizer import FakeTokenizer


class CountingTokenizer(FakeTokenizer):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return super().encode(text)


def _request(words: int, **options) -> ExplainRequest:
    return ExplainRequest(" ".join(f"w{i}" for i in range(words)), " end", ExplainOptions(**options))


def test_prompt_characters_are_refused_before_tokenizing():
    tok = CountingTokenizer()
    with pytest.raises(InvalidRequestError) as err:
        plan_explanation(_request(1000), tok, limits=PlanLimits(prompt_chars=Limit(100, "the test's limit")))
    assert err.value.field == "prompt" and "100" in err.value.message and "the test's limit" in err.value.message
    assert tok.calls == 0


def test_tokens_are_refused_before_segmentation_and_units_before_correlation():
    def no_embeddings(ids):
        raise AssertionError("correlated suppression ran although the units were over the limit")

    with pytest.raises(InvalidRequestError) as err:
        plan_explanation(_request(50, granularity="token"), FakeTokenizer(), limits=PlanLimits(tokens=Limit(20)))
    assert err.value.field == "prompt" and "20" in err.value.message
    with pytest.raises(InvalidRequestError) as err:
        plan_explanation(_request(50, granularity="token", kappa=0.5), FakeTokenizer(), no_embeddings,
                         limits=PlanLimits(units=Limit(10)))
    assert err.value.field == "granularity" and "coarser" in err.value.message
    plan = plan_explanation(_request(8, granularity="token"), FakeTokenizer(),
                            limits=PlanLimits(Limit(1000), Limit(20), Limit(10)))
    assert plan.num_units == 8


def test_planning_stops_when_cancelled():
    polls = []

    def cancelled():
        polls.append(time.monotonic())
        return len(polls) > 3

    with pytest.raises(PlanCancelled):
        plan_explanation(_request(200, granularity="token"), FakeTokenizer(), cancelled=cancelled)
    assert len(polls) == 4  # it stopped at the first poll that said so


def test_key_bias_refuses_factors_outside_the_range():
    for bad in (0.0, 1e-7, 101.0, float("nan"), float("inf"), 1):  # 1: an int, not a float
        with pytest.raises(ValueError):
            KeyBias((3,), (bad,))
    assert KeyBias((3,), (1e-6,)).factors == (1e-6,)


def test_controls_that_multiply_out_of_range_are_refused():
    tok = FakeTokenizer()
    prompt = "alpha beta gamma"
    # One control at 100 is allowed; a second on the same token cannot be (controls may not overlap),
    # but correlated suppression can reach a token another control already scaled.
    ids, bias = plan_controls(prompt, tok, [(0, 5, 100.0)])
    assert bias.factors == (100.0,)

    def same_rows(ids):
        return np.ones((len(ids), 4))  # every token looks alike: kappa reaches all of them

    with pytest.raises(InvalidRequestError) as err:
        plan_controls(prompt, tok, [(0, 5, 100.0), (6, 4, 100.0)], kappa=0.0, embedding_rows=same_rows)
    assert err.value.field == "controls" and "outside" in err.value.message


def test_blockwise_cosine_similarity_equals_the_full_matrix():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, 8))
    rows[5] = rows[3]  # an exact duplicate
    rows[7] = 0.0  # a zero row
    full = cosine_similarity(rows)
    sim = CosineSimilarity(rows)
    a, b = [3, 5, 7, 10], list(range(40))
    # The same float64 products in both: identical by construction.
    assert np.array_equal(sim.block(a, b), full[np.ix_(a, b)])
    assert full[3, 5] == 1.0 and full[7, 7] == 1.0 and full[7, 3] == 0.0
