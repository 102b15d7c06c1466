"""The per-key bias on hand-made pre-softmax score rows (ATMAN_SPEC §2)."""

from __future__ import annotations

import math

import pytest
import torch

from atman_vllm.core import KeyBias, Mode
from atman_vllm.kernels import KeyBiasCSR
from atman_vllm.reference import biased_scores
from tolerances import assert_close

# A handful of float32 roundings: the inputs (0.7, -0.3, log f are not representable), exp(log f),
# one subtraction, one multiplication, one addition.
FEW_OPS = 6

# One query row over five keys: positive and negative raw scores; key 1 is the row minimum.
ROW = torch.tensor([[[[1.5, -2.0, 0.7, -0.3, 2.2]]]])
ALL_VISIBLE = torch.ones(1, 1, 1, 5, dtype=torch.bool)


def _weights(key: int, factor: float, mode: Mode, scores=ROW, visible=ALL_VISIBLE) -> torch.Tensor:
    bias = KeyBiasCSR.from_key_biases([KeyBias((key,), (factor,), mode)])
    return torch.softmax(biased_scores(scores, visible, bias), dim=-1)[0, 0, 0]


def _unbiased_weights() -> torch.Tensor:
    return torch.softmax(biased_scores(ROW, ALL_VISIBLE, None), dim=-1)[0, 0, 0]


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("key", [0, 2, 3, 4])  # raw scores 1.5, 0.7, -0.3 (negative), 2.2 (row max)
def test_suppression_lowers_the_keys_weight_for_positive_and_negative_scores(mode, key):
    before = _unbiased_weights()
    after = _weights(key, 0.1, mode)
    assert after[key] < before[key] - 1e-3
    others = [k for k in range(5) if k != key]
    assert torch.all(after[others] > before[others])  # the mass goes elsewhere, nothing else is touched
    amplified = _weights(key, 3.0, mode)
    assert amplified[key] > before[key] + 1e-3


def test_multiplicative_values_and_the_row_minimum_is_a_fixed_point():
    bias = KeyBiasCSR.from_key_biases([KeyBias((0, 3), (0.5, 0.25), Mode.MULTIPLICATIVE)])
    out = biased_scores(ROW, ALL_VISIBLE, bias)[0, 0, 0]
    m = -2.0
    expected = [m + 0.5 * (1.5 - m), -2.0, 0.7, m + 0.25 * (-0.3 - m), 2.2]
    assert_close(out, expected, torch.float32, ops=FEW_OPS)
    # The key holding the minimum cannot be lowered by m + f (H - m): documented behaviour of Eq. 4.
    # Bitwise: m + f * (m - m) is m exactly, so the softmax sees the very same scores.
    assert torch.equal(_weights(1, 0.1, Mode.MULTIPLICATIVE), _unbiased_weights())


def test_log_additive_adds_log_factor():
    bias = KeyBiasCSR.from_key_biases([KeyBias((2,), (0.1,), Mode.LOG_ADDITIVE)])
    out = biased_scores(ROW, ALL_VISIBLE, bias)[0, 0, 0]
    assert_close(out[2], 0.7 + math.log(0.1), torch.float32, ops=FEW_OPS)
    assert out[[0, 1, 3, 4]].tolist() == ROW[0, 0, 0, [0, 1, 3, 4]].tolist()  # + log 1 = + 0.0: bitwise


def test_multiplicative_minimum_is_over_visible_keys_only():
    scores = torch.tensor([[[[0.5, 1.0, -5.0]]]])
    visible = torch.tensor([[[[True, True, False]]]])  # key 2 is in the future of this query
    bias = KeyBiasCSR.from_key_biases([KeyBias((1,), (0.5,), Mode.MULTIPLICATIVE)])
    out = biased_scores(scores, visible, bias)[0, 0, 0]
    assert_close(out[1], 0.5 + 0.5 * (1.0 - 0.5), torch.float32, ops=FEW_OPS)
    assert out[0].item() == 0.5 and out[2].item() == -math.inf  # left alone / masked: no arithmetic


@pytest.mark.parametrize("mode", list(Mode))
def test_factor_one_is_bit_identical(mode):
    # log 1 = 0: log-additive adds 0.0, multiplicative keeps the score where log f == 0. No rounding.
    bias = KeyBiasCSR.from_key_biases([KeyBias((0, 2, 3), (1.0, 1.0, 1.0), mode)])
    assert torch.equal(biased_scores(ROW, ALL_VISIBLE, bias), ROW)


def test_rows_of_a_batch_get_their_own_bias():
    scores = ROW.expand(3, 2, 1, 5)  # batch 3, 2 heads
    biases = [None, KeyBias((0,), (0.1,), Mode.LOG_ADDITIVE), KeyBias((4,), (0.1,), Mode.MULTIPLICATIVE)]
    out = biased_scores(scores, ALL_VISIBLE, KeyBiasCSR.from_key_biases(biases))
    assert torch.equal(out[0], scores[0])  # unbiased rows and keys: + 0.0 or kept, bitwise
    assert_close(out[1, :, 0, 0], [1.5 + math.log(0.1)] * 2, torch.float32, ops=FEW_OPS)
    assert torch.equal(out[1, :, 0, 1:], scores[1, :, 0, 1:])
    assert_close(out[2, :, 0, 4], [-2.0 + 0.1 * 4.2] * 2, torch.float32, ops=FEW_OPS)
    assert torch.equal(out[2, :, 0, :4], scores[2, :, 0, :4])
