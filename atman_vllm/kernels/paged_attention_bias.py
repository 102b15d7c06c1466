"""Paged causal attention with a sparse per-key bias (AtMan's perturbation).

``paged_attention_with_key_bias`` computes, for the query rows of a varlen
batch, causal attention over vLLM's paged KV cache and applies each
sequence's key bias in one of the two AtMan modes (docs/gpu_kernel.md and
ATMAN_SPEC §2):

- ``log-additive``: ``H[q, k] += log f_k``
- ``multiplicative``: ``H[q, k] = m_q + f_k (H[q, k] - m_q)`` for biased
  keys, ``m_q`` the minimum of row ``q`` over its causally visible keys.

The bias arrives as CSR over the batch's sequences: ``bias_start_loc
[num_seqs + 1]`` (int32), ``bias_positions [nnz]`` (int32, absolute key
positions, unique within a sequence) and ``bias_values [nnz]`` (float32,
``log f``; the same log-factor in both modes). A sequence with no entries
gets plain attention.

Implementations: Triton on CUDA tensors; the pure-PyTorch
``paged_attention_with_key_bias_torch`` (the readable definition and the
CPU fallback) otherwise; ``implementation="interpreter"`` runs the Triton
kernels in Triton's CPU interpreter, in a process started with
``TRITON_INTERPRET=1`` (tests). Design and measurements: docs/gpu_kernel.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from atman_vllm.core.options import Mode

from .key_bias import KeyBiasCSR, attend_with_key_bias, dense_row

Implementation = Literal["auto", "triton", "interpreter", "torch"]

# Mirrors vLLM's unified_attention so unperturbed batches run the same
# shapes as the stock kernel: 16 query rows per program (GQA group packed
# into them), 32-key tiles for prefill, 16-key tiles (2-byte dtypes) for
# split-KV decode, 16 segments for decode batches of <= 128 // num_kv_heads
# sequences.
_MIN_BLOCK_M = 16
_PREFILL_TILE = 32
_MIN_LAUNCH_GRID_2D = 128  # vLLM: MIN_LAUNCH_GRID_SIZE_2D
_DEFAULT_KV_SPLITS = 16
_BIAS_CHUNK = 16  # biased keys gathered per step (tl.dot needs >= 16)
_SCATTER_CHUNK = 128


# --------------------------------------------------------------------------
# Bias inputs
# --------------------------------------------------------------------------


def _mode(mode) -> Mode:
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"mode must be one of {[m.value for m in Mode]}, got {mode!r}") from None


# --------------------------------------------------------------------------
# Readable definition / CPU fallback
# --------------------------------------------------------------------------


def paged_attention_with_key_bias_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    bias_start_loc: torch.Tensor | None = None,
    bias_positions: torch.Tensor | None = None,
    bias_values: torch.Tensor | None = None,
    mode: Mode = Mode.LOG_ADDITIVE,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as ``paged_attention_with_key_bias``, in plain PyTorch.

    Loops over sequences on the host (reads the metadata with ``.tolist()``),
    computes in float32 (float64 if the inputs are float64) and writes
    ``out`` in the query's dtype. ``max_query_len`` is accepted for signature
    parity and not needed here.
    """
    del max_query_len
    mode = _mode(mode)
    _check_shapes(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    has_bias = _check_bias(bias_start_loc, bias_positions, bias_values, seq_lens.shape[0])
    if out is None:
        out = torch.empty_like(query)
    num_kv_heads = key_cache.shape[2]
    block_size = key_cache.shape[1]

    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    bias_starts = bias_start_loc.tolist() if has_bias else None
    for seq, seq_len in enumerate(lens):
        q_lo, q_hi = starts[seq], starts[seq + 1]
        if q_hi == q_lo:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_table[seq, :num_blocks].long()
        # [seq_len, num_kv_heads, head_size]: the sequence's pages, in order.
        k = key_cache[blocks].reshape(-1, num_kv_heads, key_cache.shape[-1])[:seq_len]
        v = value_cache[blocks].reshape(-1, num_kv_heads, value_cache.shape[-1])[:seq_len]
        row = None
        if has_bias and bias_starts[seq + 1] > bias_starts[seq]:
            lo, hi = bias_starts[seq], bias_starts[seq + 1]
            row = dense_row(bias_positions[lo:hi], bias_values[lo:hi], seq_len)
        out[q_lo:q_hi] = attend_with_key_bias(query[q_lo:q_hi], k, v, scale, row, mode).to(out.dtype)
    return out


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------


def paged_attention_with_key_bias(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    bias_start_loc: torch.Tensor | None = None,
    bias_positions: torch.Tensor | None = None,
    bias_values: torch.Tensor | None = None,
    mode: Mode = Mode.LOG_ADDITIVE,
    out: torch.Tensor | None = None,
    *,
    implementation: Implementation = "auto",
    kv_splits: int | None = None,
    log_factors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal paged attention for a varlen batch, with a per-sequence key bias.

    Args:
        query: ``[num_tokens, num_heads, head_size]``; rows of sequence ``s``
            are ``query_start_loc[s]:query_start_loc[s+1]``; query ``i`` of a
            sequence with ``seq_len`` L and ``q_len`` n sits at position
            ``L - n + i`` and sees keys ``0..L-n+i``.
        key_cache, value_cache: ``[num_blocks, block_size, num_kv_heads,
            head_size]`` (vLLM TRITON_ATTN / FLASH_ATTN views; any strides
            except a unit stride on head_size), same dtype as ``query``.
        block_table: ``[num_seqs, max_blocks]`` int32 physical block ids.
        seq_lens: ``[num_seqs]`` int32 total length (cached + new).
        query_start_loc: ``[num_seqs + 1]`` int32.
        max_query_len: host int, the largest ``q_len`` (picks decode vs
            prefill launch shapes; 1 = decode-only batch).
        scale: softmax scale (``H = scale * Q K^T``).
        bias_start_loc, bias_positions, bias_values: the CSR key bias (see
            module doc), or all three None for plain attention.
        mode: ``"log-additive"`` or ``"multiplicative"`` (a ``Mode`` works).
        out: optional ``[num_tokens, num_heads, head_size]`` output (any
            row/head strides, unit stride on head_size).
        implementation: ``"auto"`` (Triton on CUDA, PyTorch otherwise),
            ``"triton"``, ``"interpreter"`` (the same Triton kernels in Triton's
            CPU interpreter; needs ``TRITON_INTERPRET=1`` set before triton is
            first imported, see ``_kernels``) or ``"torch"``.
        kv_splits: split-KV segments for the Triton path; None picks like
            vLLM (16 for decode-only batches with few programs, else 1).
        log_factors: optional dense ``[num_seqs, width]`` float32 from
            ``dense_log_factors`` (width >= every seq_len) so a caller can build
            it once per step and reuse it in every layer; built here if None.

    Returns ``out``.
    """
    mode = _mode(mode)
    if implementation == "auto":
        implementation = "triton" if query.is_cuda else "torch"
    if implementation == "torch":
        return paged_attention_with_key_bias_torch(
            query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
            max_query_len, scale, bias_start_loc, bias_positions, bias_values, mode, out,
        )  # fmt: skip
    if implementation not in ("triton", "interpreter"):
        raise ValueError(f"unknown implementation {implementation!r}")
    return _paged_attention_triton(
        _kernels(interpreted=implementation == "interpreter"),
        query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
        max_query_len, scale, bias_start_loc, bias_positions, bias_values, mode, out,
        kv_splits, log_factors,
    )  # fmt: skip


def dense_log_factors(
    bias_start_loc: torch.Tensor,
    bias_positions: torch.Tensor,
    bias_values: torch.Tensor,
    width: int,
    *,
    implementation: Literal["triton", "interpreter"] = "triton",
) -> torch.Tensor:
    """Scatter the CSR bias into a zero ``[num_seqs, width]`` float32 buffer.

    The attention kernel reads one contiguous slice of it per key tile. The
    bias is the same in every layer and head, so a backend builds this once
    per step (``width`` >= every seq_len) and passes it as ``log_factors`` to
    every layer's call.
    """
    kernels = _kernels(interpreted=implementation == "interpreter")
    return _dense_log_factors(kernels, bias_start_loc, bias_positions, bias_values, width)


def _dense_log_factors(kernels: ModuleType, bias_start_loc, bias_positions, bias_values, width: int) -> torch.Tensor:
    num_seqs = bias_start_loc.shape[0] - 1
    buf = torch.zeros((num_seqs, width), dtype=torch.float32, device=bias_values.device)
    if num_seqs > 0 and bias_positions.numel() > 0:
        kernels.scatter_log_factors_kernel[(num_seqs,)](
            buf, buf.stride(0), width, bias_start_loc, bias_positions, bias_values,
            CHUNK=_SCATTER_CHUNK,
        )  # fmt: skip
    return buf


# --------------------------------------------------------------------------
# Triton launch
# --------------------------------------------------------------------------

def _kernels(interpreted: bool) -> ModuleType:
    """The jit kernels (imported on first use, so CPU installs never need Triton).

    Triton chooses compiled vs. interpreted when each ``@triton.jit`` runs,
    and that includes Triton's own helpers (``tl.max``, ``tl.sum``,
    ``tl.cdiv``, ``tl.zeros``) when ``triton.language`` is first imported.
    The interpreter cannot call compiled helpers, so it works only in a
    process started with ``TRITON_INTERPRET=1`` (the kernel tests run in
    such a child process); asking for it anywhere else is an error, not a
    silent fallback.
    """
    from atman_vllm.kernels import paged_attention_bias_kernels as kernels

    if interpreted:
        from triton.runtime.interpreter import InterpretedFunction

        if not isinstance(kernels.paged_attention_key_bias_kernel, InterpretedFunction):
            raise RuntimeError(
                "implementation='interpreter' needs TRITON_INTERPRET=1 in the environment "
                "before anything imports triton (start the process with it set)"
            )
    return kernels


@dataclass(frozen=True)
class _LaunchShape:
    block_m: int  # query rows per program (BLOCK_Q positions x GQA group)
    block_q: int
    tile_size: int  # keys per inner-loop step
    kv_splits: int  # 1 = one program covers all keys of its q-block


def _launch_shape(
    query: torch.Tensor, num_seqs: int, num_kv_heads: int, group: int, max_query_len: int, kv_splits: int | None
) -> _LaunchShape:
    block_m = _MIN_BLOCK_M if group <= _MIN_BLOCK_M else 1 << (group - 1).bit_length()
    block_q = block_m // group
    if kv_splits is None:
        # vLLM's rule (TritonAttentionMetadataBuilder.seq_threshold_3D without
        # CUDA graphs): split decode-only batches of <= 128 // num_kv_heads
        # sequences, which would otherwise leave most SMs idle.
        few_programs = num_seqs <= _MIN_LAUNCH_GRID_2D // num_kv_heads
        kv_splits = _DEFAULT_KV_SPLITS if (max_query_len <= 1 and few_programs) else 1
    if kv_splits < 1:
        raise ValueError(f"kv_splits must be >= 1, got {kv_splits}")
    tile = _PREFILL_TILE if (kv_splits == 1 or query.element_size() < 2) else 16
    return _LaunchShape(block_m=block_m, block_q=block_q, tile_size=tile, kv_splits=kv_splits)


def _paged_attention_triton(
    kernels: ModuleType,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    bias_start_loc: torch.Tensor | None,
    bias_positions: torch.Tensor | None,
    bias_values: torch.Tensor | None,
    mode: str,
    out: torch.Tensor | None,
    kv_splits: int | None,
    log_factors: torch.Tensor | None,
) -> torch.Tensor:
    _check_shapes(query, key_cache, value_cache, block_table, seq_lens, query_start_loc)
    has_bias = _check_bias(bias_start_loc, bias_positions, bias_values, seq_lens.shape[0])
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("query, key_cache and value_cache need a unit stride on head_size")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.stride(-1) != 1:
        raise ValueError("out must match query's shape and have a unit stride on head_size")

    num_tokens, num_heads, head_size = query.shape
    num_seqs = seq_lens.shape[0]
    num_kv_heads = key_cache.shape[2]
    block_size = key_cache.shape[1]
    group = num_heads // num_kv_heads
    if num_tokens == 0 or num_seqs == 0:
        return out
    shape = _launch_shape(query, num_seqs, num_kv_heads, group, max_query_len, kv_splits)

    # An empty CSR (no perturbed sequence in the batch) is known on the host:
    # run the bias-free specialisation, same work as the stock kernel.
    bias_mode = kernels.BIAS_NONE
    if has_bias and bias_positions.numel() > 0:
        bias_mode = kernels.BIAS_MODES[mode]
        if bias_positions.dtype != torch.int32:
            bias_positions = bias_positions.to(torch.int32)
        if bias_start_loc.dtype != torch.int32:
            bias_start_loc = bias_start_loc.to(torch.int32)
        if bias_values.dtype != torch.float32:
            bias_values = bias_values.to(torch.float32)
        if log_factors is None:
            width = block_table.shape[1] * block_size  # >= every seq_len, no device read
            log_factors = _dense_log_factors(kernels, bias_start_loc, bias_positions, bias_values, width)
        elif log_factors.dtype != torch.float32 or log_factors.shape[0] != num_seqs:
            raise ValueError("log_factors must be float32 [num_seqs, width]")
    else:
        bias_start_loc = bias_positions = bias_values = log_factors = None

    grid_q = num_tokens // shape.block_q + num_seqs
    head_size_padded = _next_power_of_2(head_size)
    common = dict(
        NUM_HEADS=num_heads,
        QUERIES_PER_KV=group,
        HEAD_SIZE=head_size,
        HEAD_SIZE_PADDED=head_size_padded,
        BLOCK_SIZE=block_size,
        BLOCK_Q=shape.block_q,
        BLOCK_M=shape.block_m,
        BIAS_MODE=bias_mode,
        BIAS_CHUNK=_BIAS_CHUNK,
        NUM_SEGMENTS=shape.kv_splits,
        IEEE_DOT=query.dtype == torch.float32,
    )
    strides = (
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
    )  # fmt: skip
    is_split = shape.kv_splits > 1
    if is_split:
        parts = num_tokens * num_heads * shape.kv_splits
        part_acc = torch.empty((parts, head_size_padded), dtype=torch.float32, device=query.device)
        part_max = torch.empty(parts, dtype=torch.float32, device=query.device)
        part_sum = torch.empty(parts, dtype=torch.float32, device=query.device)
        needs_min = bias_mode == kernels.BIAS_MULTIPLICATIVE
        part_min = torch.empty(parts, dtype=torch.float32, device=query.device) if needs_min else None
    else:
        part_acc = part_max = part_sum = part_min = None

    kernels.paged_attention_key_bias_kernel[(grid_q, num_kv_heads, shape.kv_splits)](
        out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
        log_factors, bias_start_loc, bias_positions, bias_values,
        part_acc, part_max, part_sum, part_min,
        scale, num_seqs, *strides,
        log_factors.stride(0) if log_factors is not None else 0,
        TILE_SIZE=shape.tile_size, IS_SPLIT=is_split, **common,
    )  # fmt: skip
    if is_split:
        kernels.merge_segments_kernel[(grid_q, num_kv_heads)](
            out, query, key_cache, value_cache, block_table, seq_lens, query_start_loc,
            bias_start_loc, bias_positions, bias_values,
            part_acc, part_max, part_sum, part_min,
            scale, num_seqs, *strides, **common,
        )  # fmt: skip
    return out


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# --------------------------------------------------------------------------
# Validation (host-side shapes only: never reads device memory)
# --------------------------------------------------------------------------


def _check_shapes(query, key_cache, value_cache, block_table, seq_lens, query_start_loc) -> None:
    if query.dim() != 3 or key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(
            "expected query [num_tokens, num_heads, head_size] and key/value caches "
            f"[num_blocks, block_size, num_kv_heads, head_size], got {tuple(query.shape)}, "
            f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}"
        )
    num_heads, head_size = query.shape[1], query.shape[2]
    if key_cache.shape[3] != head_size:
        raise ValueError(f"head_size differs: query {head_size}, cache {key_cache.shape[3]}")
    if num_heads % key_cache.shape[2] != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {key_cache.shape[2]}")
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise ValueError(f"cache dtype {key_cache.dtype} differs from query dtype {query.dtype} (no fp8 support)")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_table.shape[0] < num_seqs:
        raise ValueError("need query_start_loc [num_seqs + 1] and block_table [>= num_seqs, max_blocks]")


def _check_bias(bias_start_loc, bias_positions, bias_values, num_seqs: int) -> bool:
    given = [t is not None for t in (bias_start_loc, bias_positions, bias_values)]
    if not any(given):
        return False
    if not all(given):
        raise ValueError("pass bias_start_loc, bias_positions and bias_values together, or none")
    if bias_start_loc.shape[0] != num_seqs + 1 or bias_positions.shape != bias_values.shape:
        raise ValueError("bias CSR: need start_loc [num_seqs + 1] and positions/values of equal length")
    return True
