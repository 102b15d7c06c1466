"""The batched biased attention (the CPU backend's recompute of perturbed rows, many
sequences per call) against a per-sequence float64 computation written out here,
and the CPU backend's chunking of a step's perturbed rows."""

from __future__ import annotations

import math

import pytest
import torch

from atman_vllm.core.jobs import KeyBias
from atman_vllm.core.options import Mode
from atman_vllm.kernels.key_bias import CausalKeyBias, KeyBiasCSR, attend_batch_with_key_bias
from atman_vllm.vllm.backend_cpu import CHUNK_ELEMENTS, PerturbedRow, recompute_chunks
from tolerances import assert_close


def one_sequence(q, k, v, scale, first_position, log_f, mode):
    """Causal attention of one sequence's query rows in float64, the spec's two modes (ATMAN_SPEC §2)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    key_pos = torch.arange(k.shape[0])
    visible = key_pos[None] <= (first_position + torch.arange(q.shape[0]))[:, None]
    f = log_f.double().exp()
    if mode is Mode.LOG_ADDITIVE:
        scores = scores + log_f.double()
    else:
        row_min = scores.masked_fill(~visible, math.inf).amin(-1, keepdim=True)
        scores = torch.where(f != 1, row_min + f * (scores - row_min), scores)
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_batch_equals_each_sequence_alone(mode, heads, kv_heads):
    gen = torch.Generator().manual_seed(7)
    d, s_max = 16, 40
    # Ragged: (query rows, sequence length) per sequence; padding rows and keys must not leak in.
    shapes = [(40, 40), (5, 33), (1, 17), (12, 12)]
    n, q_max = len(shapes), max(q for q, _ in shapes)
    query = torch.randn(n, q_max, heads, d, generator=gen)
    keys = torch.randn(n, s_max, kv_heads, d, generator=gen) * 2
    values = torch.randn(n, s_max, kv_heads, d, generator=gen)
    biases = [KeyBias((2, 3, s - 1), (0.1, 0.5, 3.0), mode) for _, s in shapes]
    log_f = KeyBiasCSR.from_key_biases(biases).dense(s_max)
    steps = torch.arange(q_max)
    positions = torch.stack([s - q + torch.minimum(steps, torch.tensor(q - 1)) for q, s in shapes])
    got = attend_batch_with_key_bias(query, keys, values, 0.25, CausalKeyBias(positions, log_f, mode, s_max))
    for i, (q, s) in enumerate(shapes):
        want = one_sequence(query[i, :q], keys[i, :s], values[i, :s], 0.25, s - q, log_f[i, :s], mode)
        assert_close(got[i, :q], want, torch.float32, what=f"sequence {i} ({mode.value}, {heads}/{kv_heads} heads)")


def test_no_bias_is_plain_causal_attention():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=gen) for _ in range(3))
    got = attend_batch_with_key_bias(q, k, v, 0.3, CausalKeyBias(torch.arange(9)[None], None, Mode.LOG_ADDITIVE, 9))
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(), is_causal=True,
        scale=0.3).transpose(1, 2)
    assert_close(got, want, torch.float32)


def _row(r, q_len, seq_len, mode):
    return PerturbedRow(r, 0, q_len, seq_len, KeyBiasCSR.from_key_biases([KeyBias((0,), (0.1,), mode)]))


def test_chunks_cover_every_row_once_with_one_mode_and_within_budget():
    heads = 8
    rows = [_row(i, q, s, mode) for i, (q, s, mode) in enumerate(
        [(512, 512, Mode.LOG_ADDITIVE), (300, 512, Mode.MULTIPLICATIVE), (64, 512, Mode.LOG_ADDITIVE)]
        + [(32, 2048, Mode.LOG_ADDITIVE)] * 40 + [(1, 100, Mode.MULTIPLICATIVE)] * 5)]
    chunks = recompute_chunks(rows, heads)
    assert sorted(r.row for c in chunks for r in c) == list(range(len(rows)))
    for chunk in chunks:
        assert len({r.bias.mode for r in chunk}) == 1
        if len(chunk) > 1:  # a single row too big for the budget still runs, alone
            assert len(chunk) * heads * max(r.q_len for r in chunk) * max(r.seq_len for r in chunk) <= CHUNK_ELEMENTS
    # The 40 similar rows share chunks rather than running one by one.
    assert len(chunks) < 10
