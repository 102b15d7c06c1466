"""AtMan's per-key bias as a transformers attention function (ATMAN_SPEC §2).

``ATTENTION_NAME`` is registered with transformers' ``AttentionInterface``
(the attention math) and ``AttentionMaskInterface`` (its mask: without a
registered mask function transformers hands a custom implementation *no*
causal mask at all). A model loaded with ``attn_implementation=ATTENTION_NAME``
runs plain eager attention, except inside ``key_bias_scope(...)``, where every
layer and head applies the given per-row key bias before the softmax.
"""

from __future__ import annotations

import contextlib
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from atman_vllm.core.options import Mode
from atman_vllm.core.jobs import KeyBias
from atman_vllm.kernels.key_bias import apply_key_bias

ATTENTION_NAME = "atman_reference"


@dataclass(frozen=True)
class RowKeyBias:
    """Dense per-batch-row key factors for one forward pass.

    ``log_factor[b, k]`` is ``log f_k`` for row b (0 = key left alone);
    ``multiplicative[b]`` is row b's mode.
    """

    log_factor: torch.Tensor  # [B, K] float32
    multiplicative: torch.Tensor  # [B] bool

    @classmethod
    def from_key_biases(cls, biases: Sequence[KeyBias | None], length: int) -> "RowKeyBias":
        log_factor = torch.zeros(len(biases), length, dtype=torch.float32)
        multiplicative = torch.zeros(len(biases), dtype=torch.bool)
        for row, bias in enumerate(biases):
            if bias is None:
                continue
            if bias.positions and bias.positions[-1] >= length:
                raise ValueError(f"bias position {bias.positions[-1]} is outside a sequence of {length} tokens")
            multiplicative[row] = Mode(bias.mode) is Mode.MULTIPLICATIVE
            for pos, f in zip(bias.positions, bias.factors):
                log_factor[row, pos] = math.log(f)
        return cls(log_factor, multiplicative)


# Set only for the duration of one forward pass (``key_bias_scope``), so no
# bias can leak into another call, thread or task.
_ACTIVE_BIAS: ContextVar[RowKeyBias | None] = ContextVar("atman_reference_key_bias", default=None)


@contextlib.contextmanager
def key_bias_scope(bias: RowKeyBias | None) -> Iterator[None]:
    token = _ACTIVE_BIAS.set(bias)
    try:
        yield
    finally:
        _ACTIVE_BIAS.reset(token)


def biased_scores(scores: torch.Tensor, visible: torch.Tensor, bias: RowKeyBias | None) -> torch.Tensor:
    """Apply AtMan to pre-softmax scores ``[B, H, Q, K]`` and mask invisible keys with -inf."""
    if bias is None:
        return scores.masked_fill(~visible, -torch.inf)
    return apply_key_bias(scores, visible, bias.log_factor[:, None, None, :],
                          bias.multiplicative[:, None, None, None])


def _visible_keys(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device) -> torch.Tensor:
    if attention_mask is None:  # causal, queries are the last q_len positions
        q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        return (torch.arange(k_len, device=device)[None, :] <= q)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] == 0  # eager float mask: 0 = visible, dtype min = masked


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, S, D] -> [B, kv_heads * n_rep, S, D], each KV head serving n_rep query heads (GQA)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def atman_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention (as in transformers' ``eager_attention_forward``) plus the active key bias."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    visible = _visible_keys(attention_mask, query.shape[2], key.shape[2], query.device)
    scores = biased_scores(scores, visible, _ACTIVE_BIAS.get())
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, Q, H, D], as transformers expects
    return out, weights


AttentionInterface.register(ATTENTION_NAME, atman_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
