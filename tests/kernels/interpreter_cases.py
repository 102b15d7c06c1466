"""The Triton kernels, run by Triton's CPU interpreter, against the float64
reference.

Not collected by the normal test run (the name does not match test_*.py):
test_paged_attention_bias_triton.py runs this file in a child pytest with
TRITON_INTERPRET=1. The flag must be set before anything imports
triton.language (Triton's own helpers are decorated then), and setting it
in this process would leak into every other test folder, hence the child.
Run directly with:

    TRITON_INTERPRET=1 python -m pytest tests/kernels/interpreter_cases.py
"""

from __future__ import annotations

import pytest
import torch
from paged_attention_reference import (
    DECODE,
    DECODE_AT_BLOCK_EDGE,
    PREFILL,
    PREFIX_CHUNK,
    fresh_seed,
    make_batch,
    reference_attention,
    relative_error,
)

from atman_vllm.kernels import dense_log_factors, paged_attention_with_key_bias
from atman_vllm.kernels.paged_attention_bias import _launch_shape

FP32_TOLERANCE = 1e-4
# fp16 inputs; the kernel rounds the softmax weights to fp16 before P @ V,
# as vLLM's kernel does.
FP16_TOLERANCE = 2e-2


@pytest.fixture
def gen() -> torch.Generator:
    seed = fresh_seed()
    print(f"seed={seed} (replay with ATMAN_TEST_SEED={seed})")  # shown by pytest on failure
    return torch.Generator().manual_seed(seed)


def run_kernel(batch, mode: str, **kwargs) -> torch.Tensor:
    out = torch.full_like(batch.query, 7.0)
    result = paged_attention_with_key_bias(*batch.args(), mode, out, implementation="interpreter", **kwargs)
    assert result is out
    assert (out[batch.num_real_tokens :] == 7.0).all(), "padding rows past query_start_loc[-1] were written"
    return out[: batch.num_real_tokens]


@pytest.mark.parametrize("kv_splits", [1, 3], ids=["one-pass", "split-kv"])
@pytest.mark.parametrize("block_size, layout", [(16, "HND"), (32, "NHD")])
@pytest.mark.parametrize("mode", ["plain", "log-additive", "multiplicative"])
def test_mixed_batch_matches_reference(gen, mode, block_size, layout, kv_splits):
    """Prefill with a cached prefix, pure prefill, decodes (one at a block
    edge) and a sequence with no rows, GQA 4:2, partial last blocks, over a
    NaN-poisoned cache; with bias on all but one sequence."""
    batch = make_batch(gen, block_size=block_size, layout=layout, with_bias=mode != "plain")
    mode = "log-additive" if mode == "plain" else mode
    got = run_kernel(batch, mode, kv_splits=kv_splits)
    err = relative_error(got, reference_attention(batch, mode))
    assert err <= FP32_TOLERANCE, f"seed={gen.initial_seed()} rel err {err:.2e} {batch.describe()}"


@pytest.mark.parametrize("kv_splits", [1, 2], ids=["one-pass", "split-kv"])
def test_group_that_does_not_divide_the_block_and_odd_head_size(gen, kv_splits):
    """6 query heads on 2 KV heads (BLOCK_M 16 holds 5 queries x 3 heads, one
    row unused) and head_size 24 padded to 32."""
    batch = make_batch(gen, block_size=16, num_heads=6, num_kv_heads=2, head_size=24)
    got = run_kernel(batch, "multiplicative", kv_splits=kv_splits)
    err = relative_error(got, reference_attention(batch, "multiplicative"))
    assert err <= FP32_TOLERANCE, f"seed={gen.initial_seed()} rel err {err:.2e} {batch.describe()}"


def test_decode_batch_picks_split_kv_by_itself(gen):
    batch = make_batch(gen, block_size=16, kinds=(DECODE, DECODE_AT_BLOCK_EDGE, DECODE))
    shape = _launch_shape(batch.query, 3, 2, 2, batch.max_query_len, None)
    assert shape.kv_splits > 1, shape
    got = run_kernel(batch, "multiplicative")
    err = relative_error(got, reference_attention(batch, "multiplicative"))
    assert err <= FP32_TOLERANCE, f"seed={gen.initial_seed()} rel err {err:.2e} {batch.describe()}"


@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
def test_float16(gen, mode):
    """fp16 cache: 16-key tiles on the split-KV path, fp16 P @ V."""
    batch = make_batch(gen, block_size=16, dtype=torch.float16, kinds=(PREFIX_CHUNK, DECODE, DECODE))
    for kv_splits in (1, 2):
        got = run_kernel(batch, mode, kv_splits=kv_splits)
        err = relative_error(got, reference_attention(batch, mode))
        assert err <= FP16_TOLERANCE, f"seed={gen.initial_seed()} kv_splits={kv_splits} rel err {err:.2e}"


def test_empty_bias_list_is_plain_attention(gen):
    """A CSR with no entries at all takes the bias-free specialisation."""
    batch = make_batch(gen, block_size=16, kinds=(PREFIX_CHUNK, PREFILL), with_bias=False)
    batch.bias_start_loc = torch.zeros(3, dtype=torch.int32)
    batch.bias_positions = torch.zeros(0, dtype=torch.int32)
    batch.bias_values = torch.zeros(0, dtype=torch.float32)
    got = run_kernel(batch, "multiplicative")
    err = relative_error(got, reference_attention(batch, "log-additive"))
    assert err <= FP32_TOLERANCE, f"seed={gen.initial_seed()} rel err {err:.2e}"


def test_prebuilt_log_factors_and_strided_output(gen):
    """The dense log-factor rows a backend builds once per step, reused by a
    call that writes into a strided output (a head stride > head_size)."""
    batch = make_batch(gen, block_size=32, kinds=(PREFIX_CHUNK, DECODE, PREFILL))
    width = int(batch.seq_lens.max()) + 5
    log_factors = dense_log_factors(
        batch.bias_start_loc, batch.bias_positions, batch.bias_values, width, implementation="interpreter"
    )
    expected = torch.zeros(3, width)
    for seq in range(3):
        lo, hi = int(batch.bias_start_loc[seq]), int(batch.bias_start_loc[seq + 1])
        for p, v in zip(batch.bias_positions[lo:hi].tolist(), batch.bias_values[lo:hi].tolist()):
            if p < width:
                expected[seq, p] = v
    assert torch.equal(log_factors, expected)

    wide = torch.full((batch.query.shape[0], batch.query.shape[1], batch.query.shape[2] + 8), 7.0)
    out = wide[:, :, : batch.query.shape[2]]
    paged_attention_with_key_bias(
        *batch.args(), "log-additive", out, implementation="interpreter", log_factors=log_factors
    )
    err = relative_error(out[: batch.num_real_tokens], reference_attention(batch, "log-additive"))
    assert err <= FP32_TOLERANCE, f"seed={gen.initial_seed()} rel err {err:.2e}"
    assert (wide[:, :, batch.query.shape[2] :] == 7.0).all(), "wrote outside the output view"
