"""The CUDA backend's sub-batch plumbing, checked on the CPU (torch fallback):
perturbed rows are picked out of a mixed batch, attended with their own bias
and mode, and land back on their own rows."""

from __future__ import annotations

import torch

from atman_vllm.core import KeyBias, Mode
from atman_vllm.kernels.key_bias import attend_with_key_bias
from atman_vllm.vllm.backend_gpu import PerturbedSubBatch
from atman_vllm.kernels import KeyBiasCSR
from tolerances import assert_close


def test_sub_batches_reproduce_per_sequence_attention():
    torch.manual_seed(0)
    heads, kv_heads, d, block = 4, 2, 32, 16
    seq_lens = [40, 23, 17]  # prefill over a cached prefix, pure prefill, decode
    q_lens = [8, 23, 1]
    num_blocks = 16
    key_cache = torch.randn(num_blocks, block, kv_heads, d)
    value_cache = torch.randn(num_blocks, block, kv_heads, d)
    block_table = torch.tensor([[3, 7, 1, 0], [9, 2, 0, 0], [5, 11, 0, 0]], dtype=torch.int32)
    qsl = torch.tensor([0, 8, 31, 32], dtype=torch.int32)
    query = torch.randn(32, heads, d)
    biases = {0: KeyBiasCSR.from_key_biases([KeyBias((2, 30), (0.1, 3.0), Mode.LOG_ADDITIVE)]),
              2: KeyBiasCSR.from_key_biases([KeyBias((4,), (0.2,), Mode.MULTIPLICATIVE)])}

    out = torch.zeros_like(query)
    for mode in Mode:
        sub = PerturbedSubBatch.build(biases, mode, qsl, torch.tensor(seq_lens, dtype=torch.int32), block_table)
        out[sub.rows] = sub.attend(query, key_cache, value_cache, scale=d ** -0.5)

    for seq in (0, 2):
        blocks = block_table[seq, : -(-seq_lens[seq] // block)].long()
        k = key_cache[blocks].reshape(-1, kv_heads, d)[: seq_lens[seq]]
        v = value_cache[blocks].reshape(-1, kv_heads, d)[: seq_lens[seq]]
        rows = slice(int(qsl[seq]), int(qsl[seq + 1]))
        expected = attend_with_key_bias(query[rows], k, v, d ** -0.5, biases[seq].dense(seq_lens[seq])[0], biases[seq].mode)
        # The paged torch path vs. attend_with_key_bias on gathered keys: other code and shapes,
        # equal up to float32 rounding.
        assert_close(out[rows], expected, torch.float32, what=f"sequence {seq}")
    assert torch.count_nonzero(out[8:31]) == 0  # the unperturbed sequence's rows were not touched
