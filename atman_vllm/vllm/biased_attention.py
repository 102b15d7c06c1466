"""AtMan attention for one sequence, recomputed from vLLM's paged KV cache.

Plain PyTorch: the readable definition used on CPU. It takes the query rows of
one sequence in this step and every key/value of that sequence (gathered from
the cache, so a prefix served by the prefix cache is seen too), and applies
the per-key factors of ATMAN_SPEC §2 in every head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atman_vllm.core.options import Mode
from atman_vllm.core.plan import KeyBias

# Attribute on a step's attention metadata: dict[batch row -> KeyBiasTensors].
BATCH_BIAS_ATTR = "atman_bias"


@dataclass(frozen=True)
class KeyBiasTensors:
    """A KeyBias as tensors, built once per request and reused every step."""

    positions: torch.Tensor  # int64 [nnz]
    factors: torch.Tensor  # float32 [nnz]
    log_factors: torch.Tensor  # float32 [nnz]
    mode: Mode

    @classmethod
    def from_bias(cls, bias: KeyBias) -> "KeyBiasTensors":
        return cls(
            positions=torch.tensor(bias.positions, dtype=torch.long),
            factors=torch.tensor(bias.factors, dtype=torch.float32),
            log_factors=torch.tensor([math.log(f) for f in bias.factors], dtype=torch.float32),
            mode=Mode(bias.mode),
        )


def apply_key_bias(scores: torch.Tensor, visible: torch.Tensor, bias: KeyBiasTensors) -> torch.Tensor:
    """Perturb pre-softmax scores ``[heads, q, k]`` on the biased key columns.

    ``visible[q, k]`` is the causal mask. Entries past the key range (keys not
    yet in this sequence) are ignored.
    """
    num_keys = scores.shape[-1]
    keep = bias.positions < num_keys
    cols = bias.positions[keep]
    if cols.numel() == 0:
        return scores
    scores = scores.clone()
    if bias.mode is Mode.LOG_ADDITIVE:
        scores[..., cols] += bias.log_factors[keep].to(scores.dtype)
        return scores
    # Multiplicative: shift each row by its minimum over the causally visible
    # keys, scale the biased columns, shift back. Invisible columns are masked
    # afterwards, so what happens to them here does not matter.
    row_min = scores.masked_fill(~visible, float("inf")).amin(dim=-1, keepdim=True)
    f = bias.factors[keep].to(scores.dtype)
    scores[..., cols] = row_min + f * (scores[..., cols] - row_min)
    return scores


def biased_attention(
    query: torch.Tensor,  # [q, heads, head_size]
    keys: torch.Tensor,  # [s, kv_heads, head_size]
    values: torch.Tensor,  # [s, kv_heads, head_size]
    scale: float,
    bias: KeyBiasTensors,
) -> torch.Tensor:
    """Causal attention of the last ``q`` positions of a length-``s`` sequence."""
    q_len, num_heads, _ = query.shape
    seq_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, s, d]
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    q = query.float().transpose(0, 1)  # [heads, q, d]
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [heads, q, s]
    q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
    visible = torch.arange(seq_len).unsqueeze(0) <= q_pos  # [q, s]
    scores = apply_key_bias(scores, visible, bias)
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [heads, q, d]
    return out.transpose(0, 1).to(query.dtype)
