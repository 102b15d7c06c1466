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
from contextvars import ContextVar
from typing import Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from atman_vllm.kernels.key_bias import KeyBiasCSR, apply_key_bias

ATTENTION_NAME = "atman_reference"


# Set only for the duration of one forward pass (``key_bias_scope``), so no
# bias can leak into another call, thread or task.
_ACTIVE_BIAS: ContextVar[KeyBiasCSR | None] = ContextVar("atman_reference_key_bias", default=None)


@contextlib.contextmanager
def key_bias_scope(bias: KeyBiasCSR | None) -> Iterator[None]:
    token = _ACTIVE_BIAS.set(bias)
    try:
        yield
    finally:
        _ACTIVE_BIAS.reset(token)


def biased_scores(scores: torch.Tensor, visible: torch.Tensor, bias: KeyBiasCSR | None) -> torch.Tensor:
    """Apply AtMan to pre-softmax scores ``[B, H, Q, K]`` (batch row b under sequence b of
    ``bias``, each in its own mode) and mask invisible keys with -inf."""
    if bias is None:
        return scores.masked_fill(~visible, -torch.inf)
    return apply_key_bias(scores, visible, bias.dense(scores.shape[-1]).to(scores.device)[:, None, None, :],
                          bias.multiplicative.to(scores.device)[:, None, None, None])


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
