"""Triton kernels: paged causal attention with a per-sequence key bias.

Only ``@triton.jit`` code lives here; ``paged_attention_bias.py`` owns the
host side (validation, launch shapes, dispatch) and imports this module on
first use, so CPU-only installs never import Triton.

Cache layout (vLLM 0.32 TRITON_ATTN / FLASH_ATTN): ``key_cache`` and
``value_cache`` are ``[num_blocks, block_size, num_kv_heads, head_size]``
views with arbitrary strides on the first three dims (the backend makes
them with ``kv_cache.transpose(1, 2).split(head_size, -1)`` from an NHD- or
HND-ordered allocation) and a unit stride on ``head_size``.

One program = one *q-block* (``BLOCK_Q`` consecutive query positions of one
sequence) x one KV head. Its ``BLOCK_M = BLOCK_Q * QUERIES_PER_KV`` rows are
the query heads that share that KV head, so each K/V tile is loaded once per
GQA group. The grid's first axis is an upper bound on the number of
q-blocks, ``num_tokens // BLOCK_Q + num_seqs``; sequence ``s`` owns the
q-blocks starting at ``query_start_loc[s] // BLOCK_Q + s`` and a binary
search recovers it, so the host never reads ``query_start_loc`` (no sync).

Bias modes (``BIAS_MODE``): 0 none, 1 log-additive (``S += log f`` read from a
dense per-sequence row of log-factors), 2 multiplicative (see
``_merge_biased_keys``).

Two kernels launch on the same grid: ``paged_attention_key_bias_kernel``
(the tile loop; in split-KV mode it writes per-segment partials) and
``merge_segments_kernel`` (split-KV only: combines the partials). What they
both do is written once, in the ``@triton.jit`` helpers below, which Triton
inlines: locating the program and its rows, the Q load and output store,
scoring keys gathered through the block table, the causal mask, the online
softmax, the multiplicative pass over the biased keys and the partials'
layout. ``QBlock`` and ``PagedKV`` bundle the per-program values those
helpers take: Triton passes named tuples through ``@triton.jit`` calls (and
the interpreter runs them as plain Python), and they compile to the same
code as separate arguments.
"""

from typing import NamedTuple

import triton
import triton.language as tl

from atman_vllm.core.options import Mode

BIAS_NONE = 0
BIAS_LOG_ADDITIVE = 1
BIAS_MULTIPLICATIVE = 2
# core.Mode -> the kernels' constexpr (the one place the mode becomes a number).
BIAS_MODES = {Mode.LOG_ADDITIVE: BIAS_LOG_ADDITIVE, Mode.MULTIPLICATIVE: BIAS_MULTIPLICATIVE}


class QBlock(NamedTuple):
    """The rows one program computes: row ``r`` is query position
    ``q_block * BLOCK_Q + r // G`` of sequence ``seq``, query head
    ``kv_head * G + r % G`` (``G = QUERIES_PER_KV``)."""

    seq_len: tl.tensor  # scalar: the sequence's length, cached + new tokens
    token: tl.tensor  # [BLOCK_M] int64: row of query / out
    head: tl.tensor  # [BLOCK_M]: query head
    pos: tl.tensor  # [BLOCK_M]: absolute position; the row sees keys 0..pos
    valid: tl.tensor  # [BLOCK_M]: False on spare rows and rows past the sequence's queries
    dims: tl.tensor  # [HEAD_SIZE_PADDED]
    dim_valid: tl.tensor  # [HEAD_SIZE_PADDED]: dims < HEAD_SIZE


class PagedKV(NamedTuple):
    """One sequence's keys and values for one KV head, in vLLM's paged cache."""

    key_cache_ptr: tl.tensor
    value_cache_ptr: tl.tensor
    block_table_row: tl.tensor  # &block_table[seq, 0]
    kv_head: tl.tensor
    stride_k_blk: tl.tensor
    stride_k_slot: tl.tensor
    stride_k_head: tl.tensor
    stride_v_blk: tl.tensor
    stride_v_slot: tl.tensor
    stride_v_head: tl.tensor
    BLOCK_SIZE: tl.constexpr


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    # fp32 inputs would otherwise go through TF32 tensor cores (10-bit
    # mantissa); "ieee" keeps fp32 attention exact. No effect on fp16/bf16.
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _csr_range(start_loc_ptr, seq):
    """Sequence ``seq``'s slice ``[lo, hi)`` of a CSR offsets array."""
    lo = tl.load(start_loc_ptr + seq)
    hi = tl.load(start_loc_ptr + seq + 1)
    return lo, hi


@triton.jit
def _find_sequence(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with query_start_loc[s] // BLOCK_Q + s <= q_block_global."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _locate_program(query_start_loc_ptr, num_seqs, BLOCK_Q: tl.constexpr):
    """Where this program sits (grid axes 0 and 1): its sequence, that
    sequence's query rows ``q_start .. q_start + q_len``, the index of this
    program's q-block among them, and its KV head. A program of the grid's
    spare upper bound gets ``q_block * BLOCK_Q >= q_len`` and must return at
    once."""
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start, q_end = _csr_range(query_start_loc_ptr, seq)
    q_len = q_end - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    return seq, q_start, q_len, q_block, kv_head


@triton.jit
def _q_block_rows(
    seq_lens_ptr,
    seq,
    q_start,
    q_len,
    q_block,
    kv_head,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The ``QBlock`` of a live program (see ``_locate_program``)."""
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len
    rows = tl.arange(0, BLOCK_M)
    row_query = q_block * BLOCK_Q + rows // QUERIES_PER_KV
    row_head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    # Rows past BLOCK_Q*G (when G does not divide BLOCK_M) would duplicate
    # the next q-block's first row: masked off.
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (row_query < q_len)
    row_pos = context_len + row_query
    row_token = (q_start + row_query).to(tl.int64)
    dims = tl.arange(0, HEAD_SIZE_PADDED)
    dim_valid = dims < HEAD_SIZE
    return QBlock(seq_len, row_token, row_head, row_pos, row_valid, dims, dim_valid)


@triton.jit
def _paged_kv(
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    stride_bt_seq,
    seq,
    kv_head,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    BLOCK_SIZE: tl.constexpr,
):
    """The ``PagedKV`` of sequence ``seq`` and one KV head."""
    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    return PagedKV(
        key_cache_ptr, value_cache_ptr, block_table_row, kv_head,
        stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
        BLOCK_SIZE,
    )  # fmt: skip


@triton.jit
def _row_pointers(base_ptr, q, stride_tok, stride_head):
    """Pointers to the rows' [BLOCK_M, HEAD_SIZE_PADDED] elements of a
    [num_tokens, num_heads, head_size] tensor (query or out)."""
    return base_ptr + q.token[:, None] * stride_tok + q.head[:, None] * stride_head + q.dims[None, :]


@triton.jit
def _load_queries(query_ptr, q, stride_q_tok, stride_q_head):
    """Q [BLOCK_M, HEAD_SIZE_PADDED], zero on masked rows and dims."""
    return tl.load(
        _row_pointers(query_ptr, q, stride_q_tok, stride_q_head),
        mask=q.valid[:, None] & q.dim_valid[None, :],
        other=0.0,
    )


@triton.jit
def _store_output(out_ptr, acc, L, q, stride_o_tok, stride_o_head):
    """Normalise the finished rows and write them."""
    # L == 0 only on padding rows (never stored); avoid 0/0 there.
    out = acc / tl.where(L > 0.0, L, 1.0)[:, None]
    tl.store(
        _row_pointers(out_ptr, q, stride_o_tok, stride_o_head),
        out.to(out_ptr.dtype.element_ty),
        mask=q.valid[:, None] & q.dim_valid[None, :],
    )


@triton.jit
def _load_bias_chunk(bias_positions_ptr, bias_values_ptr, start, hi, CHUNK: tl.constexpr):
    """CSR entries ``start .. start + CHUNK`` that lie before ``hi``:
    (positions, log-factors, in_list)."""
    idx = start + tl.arange(0, CHUNK)
    in_list = idx < hi
    pos = tl.load(bias_positions_ptr + idx, mask=in_list, other=0)
    log_f = tl.load(bias_values_ptr + idx, mask=in_list, other=0.0)
    return pos, log_f, in_list


@triton.jit
def _scores_and_values(Q, kv, positions, valid, q, scale, IEEE_DOT: tl.constexpr):
    """Scores ``S = scale * Q K^T`` [BLOCK_M, n] and V [n, HEAD_SIZE_PADDED]
    for the given absolute key positions (any order: a tile or a gathered
    bias chunk); keys with ``valid`` False are not read."""
    block = tl.load(kv.block_table_row + positions // kv.BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slot = positions % kv.BLOCK_SIZE
    # Integer offsets summed first, one pointer add per tile (64-bit offsets:
    # large caches overflow int32).
    k_offsets = (
        block[None, :] * kv.stride_k_blk + slot[None, :] * kv.stride_k_slot + kv.kv_head * kv.stride_k_head
        + q.dims[:, None]
    )  # fmt: skip
    K = tl.load(kv.key_cache_ptr + k_offsets, mask=q.dim_valid[:, None] & valid[None, :], other=0.0)
    v_offsets = (
        block[:, None] * kv.stride_v_blk + slot[:, None] * kv.stride_v_slot + kv.kv_head * kv.stride_v_head
        + q.dims[None, :]
    )  # fmt: skip
    V = tl.load(kv.value_cache_ptr + v_offsets, mask=valid[:, None] & q.dim_valid[None, :], other=0.0)
    S = _dot(Q, K, IEEE_DOT) * scale
    return S, V


@triton.jit
def _causally_visible(q, key_pos, key_valid):
    """[BLOCK_M, n]: which keys each row attends (causal, real rows and keys only)."""
    return q.valid[:, None] & key_valid[None, :] & (key_pos[None, :] <= q.pos[:, None])


@triton.jit
def _initial_row_state(BLOCK_M: tl.constexpr, HEAD_SIZE_PADDED: tl.constexpr):
    """Per-row state before any key is folded in: running max M, normaliser
    L, unnormalised output acc, and (multiplicative mode) the row minimum of
    the raw scores."""
    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], dtype=tl.float32)
    row_min = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    return M, L, acc, row_min


@triton.jit
def _online_softmax_update(S, visible, V, M, L, acc, IEEE_DOT: tl.constexpr):
    """Fold one block of scores S [BLOCK_M, n], of which only the ``visible``
    ones are attended, into the running max M, normaliser L and
    unnormalised output acc."""
    S = tl.where(visible, S, float("-inf"))
    m_new = tl.maximum(M, tl.max(S, axis=1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 instead
    # so exp() gives 0 rather than NaN. (merge_segments_kernel repeats these
    # two lines: as a helper, the debug-scope label Triton's inlining leaves
    # here in the PTX cost the fp32 split kernels 4-7 registers in ptxas.)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    P = tl.exp(S - m_ref[:, None])
    alpha = tl.exp(M - m_ref)
    L = L * alpha + tl.sum(P, axis=1)
    acc = acc * alpha[:, None] + _dot(P.to(V.dtype), V, IEEE_DOT)
    return m_new, L, acc


@triton.jit
def _merge_biased_keys(
    Q,
    M,
    L,
    acc,
    row_min,
    q,
    kv,
    bias_lo,
    bias_hi,
    bias_positions_ptr,
    bias_values_ptr,
    scale,
    BIAS_CHUNK: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Multiplicative mode, second half: the biased keys.

    The tile loop has folded every unbiased visible key into (M, L, acc) and
    computed m_q = row_min over all visible keys. Now, with m_q final, gather
    the sequence's biased keys straight from its CSR list (BIAS_CHUNK at a
    time), recompute their scores, apply m + f (H - m) and fold them in. Cost:
    nnz extra key reads and dot products per q-block, instead of a second
    full pass over the sequence to find m_q first.
    """
    # m_q is +inf only on padding rows; keep the arithmetic finite there.
    m = tl.where(row_min == float("inf"), 0.0, row_min)
    for start in range(bias_lo, bias_hi, BIAS_CHUNK):
        pos, log_f, in_list = _load_bias_chunk(bias_positions_ptr, bias_values_ptr, start, bias_hi, BIAS_CHUNK)
        # Same rule as the tile loop's exclusion (log f != 0), so every key is
        # counted exactly once.
        use = in_list & (log_f != 0.0) & (pos >= 0) & (pos < q.seq_len)
        S, V = _scores_and_values(Q, kv, pos, use, q, scale, IEEE_DOT)
        f = tl.exp(log_f)
        S = m[:, None] + f[None, :] * (S - m[:, None])
        M, L, acc = _online_softmax_update(S, _causally_visible(q, pos, use), V, M, L, acc, IEEE_DOT)
    return M, L, acc


# Split-KV partials are laid out [token, head, segment]; acc has
# HEAD_SIZE_PADDED more elements per entry.


@triton.jit
def _partial_index(q, segment, NUM_HEADS: tl.constexpr, NUM_SEGMENTS: tl.constexpr):
    """[BLOCK_M]: this program's rows' entries for one segment."""
    return (q.token * NUM_HEADS + q.head) * NUM_SEGMENTS + segment


@triton.jit
def _partial_acc_pointers(part_acc_ptr, part, q, HEAD_SIZE_PADDED: tl.constexpr):
    """[BLOCK_M, HEAD_SIZE_PADDED]: where those entries' acc rows are."""
    return part_acc_ptr + part[:, None] * HEAD_SIZE_PADDED + q.dims[None, :]


@triton.jit
def scatter_log_factors_kernel(
    log_factors_ptr,  # [num_seqs, width] float32, zero-filled by the caller
    stride_lf_seq,
    width,
    bias_start_loc_ptr,
    bias_positions_ptr,
    bias_values_ptr,
    CHUNK: tl.constexpr,
):
    """Pre-pass: write each sequence's sparse (position, log f) list into its
    dense row. One program per sequence."""
    seq = tl.program_id(0)
    lo, hi = _csr_range(bias_start_loc_ptr, seq)
    row = log_factors_ptr + seq.to(tl.int64) * stride_lf_seq
    for start in range(lo, hi, CHUNK):
        pos, val, in_list = _load_bias_chunk(bias_positions_ptr, bias_values_ptr, start, hi, CHUNK)
        tl.store(row + pos, val, mask=in_list & (pos >= 0) & (pos < width))


@triton.jit
def paged_attention_key_bias_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    log_factors_ptr,  # dense [num_seqs, width] float32 log f (0 = no bias); None if BIAS_MODE == 0
    bias_start_loc_ptr,  # CSR, None if BIAS_MODE == 0
    bias_positions_ptr,
    bias_values_ptr,
    part_acc_ptr,  # split-KV partials, None unless IS_SPLIT
    part_max_ptr,
    part_sum_ptr,
    part_min_ptr,
    scale,
    num_seqs,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    stride_lf_seq,
    NUM_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BIAS_MODE: tl.constexpr,
    BIAS_CHUNK: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    seq, q_start, q_len, q_block, kv_head = _locate_program(query_start_loc_ptr, num_seqs, BLOCK_Q)
    if q_block * BLOCK_Q >= q_len:
        return
    q = _q_block_rows(
        seq_lens_ptr, seq, q_start, q_len, q_block, kv_head,
        QUERIES_PER_KV, HEAD_SIZE, HEAD_SIZE_PADDED, BLOCK_Q, BLOCK_M,
    )  # fmt: skip
    Q = _load_queries(query_ptr, q, stride_q_tok, stride_q_head)

    num_keys = q.seq_len - q_len + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    num_tiles = tl.cdiv(num_keys, TILE_SIZE)
    if IS_SPLIT:
        segment = tl.program_id(2)
        tiles_per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
        tile_lo = segment * tiles_per_segment
        tile_hi = tl.minimum(tile_lo + tiles_per_segment, num_tiles)
    else:
        segment = 0
        tile_lo = 0
        tile_hi = num_tiles

    kv = _paged_kv(
        key_cache_ptr, value_cache_ptr, block_table_ptr, stride_bt_seq, seq, kv_head,
        stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head, BLOCK_SIZE,
    )  # fmt: skip
    if BIAS_MODE != 0:
        bias_lo, bias_hi = _csr_range(bias_start_loc_ptr, seq)
        seq_has_bias = bias_hi > bias_lo
        log_factor_row = log_factors_ptr + seq.to(tl.int64) * stride_lf_seq
        # Keys whose log-factor is read: none for a sequence without entries
        # (masked load, no memory traffic). An integer bound rather than
        # `key_valid & seq_has_bias`, which Triton's interpreter rejects.
        biased_keys_end = tl.where(seq_has_bias, num_keys, 0)

    M, L, acc, row_min = _initial_row_state(BLOCK_M, HEAD_SIZE_PADDED)
    tile_keys = tl.arange(0, TILE_SIZE)

    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_SIZE + tile_keys
        key_valid = key_pos < num_keys
        S, V = _scores_and_values(Q, kv, key_pos, key_valid, q, scale, IEEE_DOT)
        visible = _causally_visible(q, key_pos, key_valid)
        if BIAS_MODE == 2:
            # m_q: the minimum raw score over every visible key, biased or not.
            row_min = tl.minimum(row_min, tl.min(tl.where(visible, S, float("inf")), axis=1))
        if BIAS_MODE != 0:
            log_f = tl.load(log_factor_row + key_pos, mask=key_pos < biased_keys_end, other=0.0)
        if BIAS_MODE == 1:
            S = S + log_f[None, :]
        if BIAS_MODE == 2:
            # Biased keys need the final m_q; _merge_biased_keys adds them.
            visible = visible & (log_f == 0.0)[None, :]
        M, L, acc = _online_softmax_update(S, visible, V, M, L, acc, IEEE_DOT)

    if IS_SPLIT:
        # merge_segments_kernel finishes the rows.
        part = _partial_index(q, segment, NUM_HEADS, NUM_SEGMENTS)
        tl.store(part_max_ptr + part, M, mask=q.valid)
        tl.store(part_sum_ptr + part, L, mask=q.valid)
        if BIAS_MODE == 2:
            tl.store(part_min_ptr + part, row_min, mask=q.valid)
        tl.store(_partial_acc_pointers(part_acc_ptr, part, q, HEAD_SIZE_PADDED), acc, mask=q.valid[:, None])
    else:
        if BIAS_MODE == 2:
            if seq_has_bias:
                M, L, acc = _merge_biased_keys(
                    Q, M, L, acc, row_min, q, kv, bias_lo, bias_hi, bias_positions_ptr, bias_values_ptr, scale,
                    BIAS_CHUNK, IEEE_DOT,
                )  # fmt: skip
        _store_output(out_ptr, acc, L, q, stride_o_tok, stride_o_head)


@triton.jit
def merge_segments_kernel(
    out_ptr,
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    bias_start_loc_ptr,
    bias_positions_ptr,
    bias_values_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_min_ptr,
    scale,
    num_seqs,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    stride_bt_seq,
    NUM_HEADS: tl.constexpr,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_SIZE_PADDED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BIAS_MODE: tl.constexpr,
    BIAS_CHUNK: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Split-KV epilogue: combine the segments' (max, sum, acc) per row; in
    multiplicative mode, also the segments' row minima, then fold in the
    biased keys with the global m_q. Same grid and row mapping as the
    attention kernel."""
    seq, q_start, q_len, q_block, kv_head = _locate_program(query_start_loc_ptr, num_seqs, BLOCK_Q)
    if q_block * BLOCK_Q >= q_len:
        return
    q = _q_block_rows(
        seq_lens_ptr, seq, q_start, q_len, q_block, kv_head,
        QUERIES_PER_KV, HEAD_SIZE, HEAD_SIZE_PADDED, BLOCK_Q, BLOCK_M,
    )  # fmt: skip

    M, L, acc, row_min = _initial_row_state(BLOCK_M, HEAD_SIZE_PADDED)
    for segment in range(NUM_SEGMENTS):
        part = _partial_index(q, segment, NUM_HEADS, NUM_SEGMENTS)
        seg_max = tl.load(part_max_ptr + part, mask=q.valid, other=float("-inf"))
        seg_sum = tl.load(part_sum_ptr + part, mask=q.valid, other=0.0)
        seg_acc_ptrs = _partial_acc_pointers(part_acc_ptr, part, q, HEAD_SIZE_PADDED)
        seg_acc = tl.load(seg_acc_ptrs, mask=q.valid[:, None], other=0.0)
        m_new = tl.maximum(M, seg_max)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in _online_softmax_update
        alpha = tl.exp(M - m_ref)
        beta = tl.exp(seg_max - m_ref)
        L = L * alpha + seg_sum * beta
        acc = acc * alpha[:, None] + seg_acc * beta[:, None]
        M = m_new
        if BIAS_MODE == 2:
            seg_min = tl.load(part_min_ptr + part, mask=q.valid, other=float("inf"))
            row_min = tl.minimum(row_min, seg_min)

    if BIAS_MODE == 2:
        bias_lo, bias_hi = _csr_range(bias_start_loc_ptr, seq)
        if bias_hi > bias_lo:
            Q = _load_queries(query_ptr, q, stride_q_tok, stride_q_head)
            kv = _paged_kv(
                key_cache_ptr, value_cache_ptr, block_table_ptr, stride_bt_seq, seq, kv_head,
                stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head, BLOCK_SIZE,
            )  # fmt: skip
            M, L, acc = _merge_biased_keys(
                Q, M, L, acc, row_min, q, kv, bias_lo, bias_hi, bias_positions_ptr, bias_values_ptr, scale,
                BIAS_CHUNK, IEEE_DOT,
            )  # fmt: skip
    _store_output(out_ptr, acc, L, q, stride_o_tok, stride_o_head)
