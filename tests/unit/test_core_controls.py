"""Attention steering controls for generation."""

import math

import numpy as np
import pytest

from atman_vllm.core import Control, InvalidRequestError, Mode, plan_controls
from fake_tokenizer import FakeTokenizer

PROMPT = "abcd efgh ijkl"  # tokens "abcd" (0, 4) " efgh" (4, 9) " ijkl" (9, 14) at positions 1, 2, 3


def test_partial_overlap_interpolates_by_covered_fraction():
    ids, bias = plan_controls(PROMPT, FakeTokenizer(), [Control(0, 2, 2.0)])
    assert ids[0] == 0 and len(ids) == 4  # BOS + 3 tokens
    assert bias.positions == (1,) and bias.factors == pytest.approx((1.5,))
    _, bias = plan_controls(PROMPT, FakeTokenizer(), [Control(0, 2, 2.0)], overlap="complete")
    assert bias.factors == (2.0,)  # complete overlap: the control's factor, copied (exact)


def test_span_over_several_tokens_and_multiplying_controls():
    # (2, 5) covers "cd" of "abcd" (half) and " ef" of " efgh" (3 of 5 chars).
    _, bias = plan_controls(PROMPT, FakeTokenizer(), [Control(2, 5, 0.5)], mode="multiplicative")
    assert bias.positions == (1, 2) and bias.mode is Mode.MULTIPLICATIVE
    assert bias.factors == pytest.approx((1 - 0.5 * 0.5, 1 - 0.5 * 0.6))
    _, bias = plan_controls(PROMPT, FakeTokenizer(), [Control(0, 2, 2.0), {"start": 2, "length": 2, "factor": 0.5}])
    assert bias.positions == (1,) and bias.factors == pytest.approx((1.5 * 0.75,))


def test_no_controls_means_no_bias():
    ids, bias = plan_controls(PROMPT, FakeTokenizer(), [])
    assert bias is None and len(ids) == 4
    _, bias = plan_controls(PROMPT, FakeTokenizer(), [Control(0, 4, 1.0)])
    assert bias is None  # factor 1 changes nothing


def test_kappa_extends_a_control_to_similar_tokens():
    tok = FakeTokenizer()

    def rows(ids):
        out = np.zeros((len(ids), 8))
        for r, i in enumerate(ids):
            piece = tok.inverse[i]
            out[r, 0] = 1.0 if "a" in piece or "i" in piece else 0.0  # "abcd" ~ " ijkl"
            out[r, 1 + (i % 7)] = 1.0
        return out

    _, bias = plan_controls(PROMPT, tok, [Control(0, 4, 0.1)], kappa=0.4, embedding_rows=rows)
    s = 0.5  # both rows are (1, one-hot) with different one-hots: cosine 1/2
    assert bias.positions == (1, 3)
    assert bias.factors == pytest.approx((0.1, (1 - 0.1) * (1 - s) + 0.1))
    with pytest.raises(InvalidRequestError) as e:
        plan_controls(PROMPT, tok, [Control(0, 4, 0.1)], kappa=0.4)
    assert e.value.field == "kappa"


@pytest.mark.parametrize("controls, needle", [
    ([Control(10, 10, 2.0)], "outside"),
    ([Control(-1, 2, 2.0)], "outside"),
    ([Control(0, 0, 2.0)], "empty"),
    ([Control(0, 2, 0.0)], "factor"),
    ([Control(0, 2, -1.0)], "factor"),
    ([Control(0, 2, math.nan)], "factor"),
    ([Control(0, 2, math.inf)], "factor"),
    ([Control(0, 2, "big")], "factor"),
    ([Control(0, 5, 2.0), Control(3, 2, 0.5)], "overlap"),
    ([Control(0.5, 2, 2.0)], "integer"),
    (["nonsense"], "(start, length, factor)"),
    ([(1, 2)], "(start, length, factor)"),
])
def test_bad_controls_are_rejected_naming_controls(controls, needle):
    with pytest.raises(InvalidRequestError) as e:
        plan_controls(PROMPT, FakeTokenizer(), controls)
    assert e.value.field == "controls" and needle in e.value.message


def test_unknown_overlap_mode_and_kappa_are_named():
    for kwargs, field in [(dict(overlap="half"), "overlap"), (dict(mode="add"), "mode"), (dict(kappa=2), "kappa")]:
        with pytest.raises(InvalidRequestError) as e:
            plan_controls(PROMPT, FakeTokenizer(), [Control(0, 2, 2.0)], **kwargs)
        assert e.value.field == field
