"""AtMan's per-key bias on attention scores, in PyTorch: the one definition
(ATMAN_SPEC §2) used by the reference explainer, the CPU backend and the
kernels' fallback. The Triton kernel is tested against it."""

from __future__ import annotations

import math

import torch

LOG_ADDITIVE = "log-additive"
MULTIPLICATIVE = "multiplicative"


def apply_key_bias(scores: torch.Tensor, visible: torch.Tensor, log_factors: torch.Tensor,
                   multiplicative: bool | torch.Tensor) -> torch.Tensor:
    """Perturbed pre-softmax scores, invisible keys masked with -inf.

    ``scores``: ``[..., Q, K]`` (``Q Kᵀ · scale``); ``visible``: bool,
    broadcastable to ``scores``; ``log_factors``: ``log f_k`` per key,
    broadcastable to ``[..., 1, K]``, 0 for keys left alone.
    ``multiplicative``: the mode, or a bool tensor broadcastable to the rows.

    Log-additive: ``H + log f_k``. Multiplicative: ``m_q + f_k (H − m_q)``
    with ``m_q`` the minimum over the keys row q can see; unbiased columns
    stay bit-identical.
    """
    log_factors = log_factors.to(scores.dtype)
    if multiplicative is False:
        out = scores + log_factors
    else:
        row_min = scores.masked_fill(~visible, math.inf).amin(dim=-1, keepdim=True)
        scaled = torch.where(log_factors != 0, row_min + log_factors.exp() * (scores - row_min), scores)
        out = scaled if multiplicative is True else torch.where(multiplicative, scaled, scores + log_factors)
    return out.masked_fill(~visible, -math.inf)


def dense_row(positions: torch.Tensor, log_factors: torch.Tensor, length: int) -> torch.Tensor:
    """Sparse (position, log f) entries as a dense ``[length]`` row; entries past the end are dropped."""
    row = torch.zeros(length, dtype=log_factors.dtype, device=log_factors.device)
    keep = (positions >= 0) & (positions < length)
    row[positions[keep].long()] = log_factors[keep]
    return row


def attend_with_key_bias(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                         log_factors: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Causal attention of the last ``q`` positions of one length-``s`` sequence.

    ``query`` ``[q, heads, d]``; ``keys``/``values`` ``[s, kv_heads, d]`` (GQA:
    each KV head serves ``heads / kv_heads`` query heads); ``log_factors``
    ``[s]`` or None. Computes in float32 (float64 for float64 inputs) and
    returns ``[q, heads, d]`` in the query's dtype.
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q_len, seq_len = query.shape[0], keys.shape[0]
    group = query.shape[1] // keys.shape[1]
    k = keys.to(compute).repeat_interleave(group, dim=1)
    v = values.to(compute).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.to(compute), k) * scale
    key_pos = torch.arange(seq_len, device=query.device)
    visible = key_pos[None, :] <= torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
    if log_factors is None:
        scores = scores.masked_fill(~visible, -math.inf)
    else:
        scores = apply_key_bias(scores, visible, log_factors, mode == MULTIPLICATIVE)
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).to(query.dtype)
