"""AtMan's per-key bias on attention scores, in PyTorch: the one definition
(ATMAN_SPEC §2) used by the reference explainer, the CPU backend and the
kernels' fallback, and ``KeyBiasCSR``, the one tensor form of key biases from
the worker to the kernels. The Triton kernel is tested against it.

A key bias is a ``core.KeyBias`` (positions, factors, ``core.Mode``) on the
host; as tensors it is always a ``KeyBiasCSR`` over a batch of sequences (a
request's own bias is a batch of one). The mode is ``core.Mode`` throughout;
only the Triton launch maps it to a kernel constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from atman_vllm.core.jobs import KeyBias
from atman_vllm.core.options import Mode


@dataclass(frozen=True)
class KeyBiasCSR:
    """The per-sequence key biases of a batch, CSR over sequences.

    ``values`` hold ``log f`` (both modes), float32; ``positions`` int32,
    absolute key positions; ``multiplicative[s]`` is sequence s's mode. A
    sequence with no entries is unperturbed.
    """

    start_loc: torch.Tensor  # [num_seqs + 1] int32
    positions: torch.Tensor  # [nnz] int32
    values: torch.Tensor  # [nnz] float32
    multiplicative: torch.Tensor  # [num_seqs] bool

    @classmethod
    def from_key_biases(cls, biases: Sequence[KeyBias | None], device: torch.device | str = "cpu") -> "KeyBiasCSR":
        """One entry per sequence, in batch order; ``None`` = unperturbed. Built on the host and
        copied once (non-blocking from pinned memory when ``device`` is CUDA)."""
        start_loc = [0]
        for b in biases:
            start_loc.append(start_loc[-1] + (0 if b is None else len(b.positions)))
        positions = [p for b in biases if b is not None for p in b.positions]
        values = [math.log(f) for b in biases if b is not None for f in b.factors]
        multiplicative = [b is not None and Mode(b.mode) is Mode.MULTIPLICATIVE for b in biases]
        device = torch.device(device)
        pin = device.type == "cuda"

        def to_device(data, dtype):
            t = torch.tensor(data, dtype=dtype)
            if pin:
                t = t.pin_memory()
            return t.to(device, non_blocking=pin)

        return cls(to_device(start_loc, torch.int32), to_device(positions, torch.int32),
                   to_device(values, torch.float32), to_device(multiplicative, torch.bool))

    @classmethod
    def concat(cls, parts: Sequence["KeyBiasCSR"]) -> "KeyBiasCSR":
        """The batches one after the other (the sequences of a step's sub-batch)."""
        offsets = torch.tensor([0] + [int(p.positions.numel()) for p in parts[:-1]]).cumsum(0)
        starts = [parts[0].start_loc[:1]] + [p.start_loc[1:] + int(o) for p, o in zip(parts, offsets)]
        return cls(torch.cat(starts).to(torch.int32), torch.cat([p.positions for p in parts]),
                   torch.cat([p.values for p in parts]), torch.cat([p.multiplicative for p in parts]))

    @property
    def num_seqs(self) -> int:
        return int(self.multiplicative.numel())

    @cached_property  # read per layer by the CPU backend: one host read per request, not per layer
    def mode(self) -> Mode:
        """The batch's one mode (a kernel launch applies one); ValueError when they differ."""
        modes = {Mode.MULTIPLICATIVE if m else Mode.LOG_ADDITIVE for m in self.multiplicative.tolist()}
        if len(modes) > 1:
            raise ValueError(f"one launch applies one mode, got {sorted(m.value for m in modes)}")
        return modes.pop() if modes else Mode.LOG_ADDITIVE

    def dense(self, width: int) -> torch.Tensor:
        """``[num_seqs, width]`` float32 log-factors (0 = key left alone); entries past ``width`` dropped."""
        seq_of_entry = torch.repeat_interleave(torch.arange(self.num_seqs, device=self.positions.device),
                                               (self.start_loc[1:] - self.start_loc[:-1]).long())
        rows = torch.zeros(self.num_seqs, width, dtype=torch.float32, device=self.values.device)
        keep = (self.positions >= 0) & (self.positions < width)
        rows[seq_of_entry[keep], self.positions[keep].long()] = self.values[keep]
        return rows

    def to(self, device: torch.device | str) -> "KeyBiasCSR":
        return KeyBiasCSR(*(t.to(device) for t in (self.start_loc, self.positions, self.values, self.multiplicative)))


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
                         log_factors: torch.Tensor | None, mode: Mode) -> torch.Tensor:
    """Causal attention of the last ``q`` positions of one length-``s`` sequence.

    ``query`` ``[q, heads, d]``; ``keys``/``values`` ``[s, kv_heads, d]`` (GQA:
    each KV head serves ``heads / kv_heads`` query heads); ``log_factors``
    ``[s]`` or None. Computes in float32 (float64 for float64 inputs) and
    returns ``[q, heads, d]`` in the query's dtype. A batch of one for
    ``attend_batch_with_key_bias``.
    """
    q_len, seq_len = query.shape[0], keys.shape[0]
    positions = torch.arange(seq_len - q_len, seq_len, device=query.device)[None]
    rows = None if log_factors is None else log_factors[None]
    bias = CausalKeyBias(positions, rows, Mode(mode), seq_len)
    return attend_batch_with_key_bias(query[None], keys[None], values[None], scale, bias)[0]


@dataclass(frozen=True)
class CausalKeyBias:
    """Which keys each query row of a batch sees, and how they are biased.

    The part of biased attention that every layer of a step shares, so it is
    built once per step (the CPU backend keeps it on the step's metadata).
    ``query_positions`` ``[n, q]``: each query row's absolute position; it sees
    the keys at positions <= its own, so key slots past a sequence's end (a
    batch padded to its longest sequence) stay invisible as long as every
    query row lies inside its sequence. ``log_factors`` ``[n, num_keys]`` or
    None (plain causal attention).
    """

    query_positions: torch.Tensor
    log_factors: torch.Tensor | None
    mode: Mode
    num_keys: int

    @cached_property
    def visible(self) -> torch.Tensor:
        """``[n, q, num_keys]`` bool."""
        key_pos = torch.arange(self.num_keys, device=self.query_positions.device)
        return key_pos[None, None, :] <= self.query_positions[:, :, None]

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``[n, 1, q, num_keys]``: log f on visible keys, -inf elsewhere (the log-additive mode, or no bias)."""
        mask = self.__dict__.get("_mask")
        if mask is None or mask.dtype != dtype:
            n, q = self.query_positions.shape
            mask = torch.zeros(n, q, self.num_keys, dtype=dtype, device=self.query_positions.device)
            if self.log_factors is not None:
                mask += self.log_factors.to(dtype)[:, None, :]
            mask = mask.masked_fill_(~self.visible, -math.inf)[:, None]
            object.__setattr__(self, "_mask", mask)
        return mask


def attend_batch_with_key_bias(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                               bias: CausalKeyBias) -> torch.Tensor:
    """Causal attention of several sequences' query rows at once, each with its own key bias.

    ``query`` ``[n, q, heads, d]``; ``keys``/``values`` ``[n, s, kv_heads, d]``
    with ``s == bias.num_keys``. Computes in float32 (float64 for float64
    inputs); returns ``[n, q, heads, d]`` in the query's dtype.

    One fused kernel per batch where it can be (log-additive: the bias is an
    additive mask, and SDPA serves GQA without repeating KV heads); the
    multiplicative mode needs each row's minimum over its visible raw scores,
    which SDPA does not expose, so it builds the scores explicitly.
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    n, q_len, heads, head_size = query.shape
    kv_heads = keys.shape[2]
    q = query.to(compute).transpose(1, 2)  # [n, heads, q, d]
    k = keys.to(compute).transpose(1, 2)  # [n, kv_heads, s, d]
    v = values.to(compute).transpose(1, 2)
    if bias.log_factors is None or bias.mode is Mode.LOG_ADDITIVE:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.additive_mask(compute), scale=scale,
                                             enable_gqa=heads != kv_heads)
    else:
        group = heads // kv_heads
        # [n, kv_heads, group, q, s]: GQA by viewing the query heads per KV head.
        scores = torch.einsum("nhgqd,nhkd->nhgqk", q.reshape(n, kv_heads, group, q_len, head_size), k) * scale
        biased = apply_key_bias(scores, bias.visible[:, None, None], bias.log_factors[:, None, None, None, :], True)
        out = torch.einsum("nhgqk,nhkd->nhgqd", torch.softmax(biased, dim=-1), v).reshape(n, heads, q_len, head_size)
    return out.transpose(1, 2).to(query.dtype)
