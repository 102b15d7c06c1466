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
"""

import triton
import triton.language as tl

BIAS_NONE = 0
BIAS_LOG_ADDITIVE = 1
BIAS_MULTIPLICATIVE = 2


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr):
    # fp32 inputs would otherwise go through TF32 tensor cores (10-bit
    # mantissa); "ieee" keeps fp32 attention exact. No effect on fp16/bf16.
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


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
def _load_keys_values(
    key_cache_ptr,
    value_cache_ptr,
    block_table_row_ptr,
    positions,
    valid,
    kv_head,
    dims,
    dim_valid,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    BLOCK_SIZE: tl.constexpr,
):
    """K as [HEAD_SIZE_PADDED, n] and V as [n, HEAD_SIZE_PADDED] for the given
    absolute key positions (any order; a tile or a gathered bias chunk)."""
    block = tl.load(block_table_row_ptr + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    slot = positions % BLOCK_SIZE
    # Integer offsets summed first, one pointer add per tile (64-bit offsets:
    # large caches overflow int32).
    k_offsets = block[None, :] * stride_k_blk + slot[None, :] * stride_k_slot + kv_head * stride_k_head + dims[:, None]
    K = tl.load(key_cache_ptr + k_offsets, mask=dim_valid[:, None] & valid[None, :], other=0.0)
    v_offsets = block[:, None] * stride_v_blk + slot[:, None] * stride_v_slot + kv_head * stride_v_head + dims[None, :]
    V = tl.load(value_cache_ptr + v_offsets, mask=valid[:, None] & dim_valid[None, :], other=0.0)
    return K, V


@triton.jit
def _online_softmax_update(S, V, M, L, acc, IEEE_DOT: tl.constexpr):
    """Fold one block of scores S [BLOCK_M, n] (-inf = not attended) into the
    running max M, normaliser L and unnormalised output acc."""
    m_new = tl.maximum(M, tl.max(S, axis=1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 instead
    # so exp() gives 0 rather than NaN.
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
    row_pos,
    row_valid,
    seq_len,
    bias_lo,
    bias_hi,
    bias_positions_ptr,
    bias_values_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_row_ptr,
    kv_head,
    dims,
    dim_valid,
    scale,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    BLOCK_SIZE: tl.constexpr,
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
    chunk = tl.arange(0, BIAS_CHUNK)
    # m_q is +inf only on padding rows; keep the arithmetic finite there.
    m = tl.where(row_min == float("inf"), 0.0, row_min)
    for start in range(bias_lo, bias_hi, BIAS_CHUNK):
        idx = start + chunk
        in_list = idx < bias_hi
        pos = tl.load(bias_positions_ptr + idx, mask=in_list, other=0)
        log_f = tl.load(bias_values_ptr + idx, mask=in_list, other=0.0)
        # Same rule as the tile loop's exclusion (log f != 0), so every key is
        # counted exactly once.
        use = in_list & (log_f != 0.0) & (pos >= 0) & (pos < seq_len)
        K, V = _load_keys_values(
            key_cache_ptr,
            value_cache_ptr,
            block_table_row_ptr,
            pos,
            use,
            kv_head,
            dims,
            dim_valid,
            stride_k_blk,
            stride_k_slot,
            stride_k_head,
            stride_v_blk,
            stride_v_slot,
            stride_v_head,
            BLOCK_SIZE,
        )
        S = _dot(Q, K, IEEE_DOT) * scale
        f = tl.exp(log_f)
        S = m[:, None] + f[None, :] * (S - m[:, None])
        visible = row_valid[:, None] & use[None, :] & (pos[None, :] <= row_pos[:, None])
        S = tl.where(visible, S, float("-inf"))
        M, L, acc = _online_softmax_update(S, V, M, L, acc, IEEE_DOT)
    return M, L, acc


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
    lo = tl.load(bias_start_loc_ptr + seq)
    hi = tl.load(bias_start_loc_ptr + seq + 1)
    row = log_factors_ptr + seq.to(tl.int64) * stride_lf_seq
    for start in range(lo, hi, CHUNK):
        idx = start + tl.arange(0, CHUNK)
        in_list = idx < hi
        pos = tl.load(bias_positions_ptr + idx, mask=in_list, other=0)
        val = tl.load(bias_values_ptr + idx, mask=in_list, other=0.0)
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
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq = _find_sequence(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row r of the program: query position q_block*BLOCK_Q + r // G, head
    # kv_head*G + r % G. Rows past BLOCK_Q*G (when G does not divide
    # BLOCK_M) would duplicate the next q-block's first row: masked off.
    rows = tl.arange(0, BLOCK_M)
    row_query = q_block * BLOCK_Q + rows // QUERIES_PER_KV
    row_head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (row_query < q_len)
    row_pos = context_len + row_query  # absolute position: sees keys 0..row_pos
    row_token = (q_start + row_query).to(tl.int64)
    dims = tl.arange(0, HEAD_SIZE_PADDED)
    dim_valid = dims < HEAD_SIZE

    Q = tl.load(
        query_ptr + row_token[:, None] * stride_q_tok + row_head[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    num_keys = context_len + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
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

    block_table_row = block_table_ptr + seq.to(tl.int64) * stride_bt_seq
    if BIAS_MODE != 0:
        bias_lo = tl.load(bias_start_loc_ptr + seq)
        bias_hi = tl.load(bias_start_loc_ptr + seq + 1)
        seq_has_bias = bias_hi > bias_lo
        log_factor_row = log_factors_ptr + seq.to(tl.int64) * stride_lf_seq
        # Keys whose log-factor is read: none for a sequence without entries
        # (masked load, no memory traffic). An integer bound rather than
        # `key_valid & seq_has_bias`, which Triton's interpreter rejects.
        biased_keys_end = tl.where(seq_has_bias, num_keys, 0)

    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], dtype=tl.float32)
    row_min = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    tile_keys = tl.arange(0, TILE_SIZE)

    for tile in range(tile_lo, tile_hi):
        key_pos = tile * TILE_SIZE + tile_keys
        key_valid = key_pos < num_keys
        K, V = _load_keys_values(
            key_cache_ptr,
            value_cache_ptr,
            block_table_row,
            key_pos,
            key_valid,
            kv_head,
            dims,
            dim_valid,
            stride_k_blk,
            stride_k_slot,
            stride_k_head,
            stride_v_blk,
            stride_v_slot,
            stride_v_head,
            BLOCK_SIZE,
        )
        S = _dot(Q, K, IEEE_DOT) * scale
        visible = row_valid[:, None] & key_valid[None, :] & (key_pos[None, :] <= row_pos[:, None])
        if BIAS_MODE == 1:
            log_f = tl.load(log_factor_row + key_pos, mask=key_pos < biased_keys_end, other=0.0)
            S = S + log_f[None, :]
        if BIAS_MODE == 2:
            row_min = tl.minimum(row_min, tl.min(tl.where(visible, S, float("inf")), axis=1))
            log_f = tl.load(log_factor_row + key_pos, mask=key_pos < biased_keys_end, other=0.0)
            # Biased keys need the final m_q; _merge_biased_keys adds them.
            visible = visible & (log_f == 0.0)[None, :]
        S = tl.where(visible, S, float("-inf"))
        M, L, acc = _online_softmax_update(S, V, M, L, acc, IEEE_DOT)

    if IS_SPLIT:
        # Partials [token, head, segment]; merge_segments_kernel finishes.
        part = (row_token * NUM_HEADS + row_head) * NUM_SEGMENTS + segment
        tl.store(part_max_ptr + part, M, mask=row_valid)
        tl.store(part_sum_ptr + part, L, mask=row_valid)
        if BIAS_MODE == 2:
            tl.store(part_min_ptr + part, row_min, mask=row_valid)
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_SIZE_PADDED + dims[None, :],
            acc,
            mask=row_valid[:, None],
        )
    else:
        if BIAS_MODE == 2:
            if seq_has_bias:
                M, L, acc = _merge_biased_keys(
                    Q,
                    M,
                    L,
                    acc,
                    row_min,
                    row_pos,
                    row_valid,
                    seq_len,
                    bias_lo,
                    bias_hi,
                    bias_positions_ptr,
                    bias_values_ptr,
                    key_cache_ptr,
                    value_cache_ptr,
                    block_table_row,
                    kv_head,
                    dims,
                    dim_valid,
                    scale,
                    stride_k_blk,
                    stride_k_slot,
                    stride_k_head,
                    stride_v_blk,
                    stride_v_slot,
                    stride_v_head,
                    BLOCK_SIZE,
                    BIAS_CHUNK,
                    IEEE_DOT,
                )
        # L == 0 only on padding rows (never stored); avoid 0/0 there.
        out = acc / tl.where(L > 0.0, L, 1.0)[:, None]
        tl.store(
            out_ptr + row_token[:, None] * stride_o_tok + row_head[:, None] * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )


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
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    row_query = q_block * BLOCK_Q + rows // QUERIES_PER_KV
    row_head = kv_head * QUERIES_PER_KV + rows % QUERIES_PER_KV
    row_valid = (rows < BLOCK_Q * QUERIES_PER_KV) & (row_query < q_len)
    row_pos = context_len + row_query
    row_token = (q_start + row_query).to(tl.int64)
    dims = tl.arange(0, HEAD_SIZE_PADDED)
    dim_valid = dims < HEAD_SIZE

    M = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    L = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE_PADDED], dtype=tl.float32)
    row_min = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
    for segment in range(NUM_SEGMENTS):
        part = (row_token * NUM_HEADS + row_head) * NUM_SEGMENTS + segment
        seg_max = tl.load(part_max_ptr + part, mask=row_valid, other=float("-inf"))
        seg_sum = tl.load(part_sum_ptr + part, mask=row_valid, other=0.0)
        seg_acc = tl.load(
            part_acc_ptr + part[:, None] * HEAD_SIZE_PADDED + dims[None, :],
            mask=row_valid[:, None],
            other=0.0,
        )
        m_new = tl.maximum(M, seg_max)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(M - m_ref)
        beta = tl.exp(seg_max - m_ref)
        L = L * alpha + seg_sum * beta
        acc = acc * alpha[:, None] + seg_acc * beta[:, None]
        M = m_new
        if BIAS_MODE == 2:
            seg_min = tl.load(part_min_ptr + part, mask=row_valid, other=float("inf"))
            row_min = tl.minimum(row_min, seg_min)

    if BIAS_MODE == 2:
        bias_lo = tl.load(bias_start_loc_ptr + seq)
        bias_hi = tl.load(bias_start_loc_ptr + seq + 1)
        if bias_hi > bias_lo:
            Q = tl.load(
                query_ptr + row_token[:, None] * stride_q_tok + row_head[:, None] * stride_q_head + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :],
                other=0.0,
            )
            M, L, acc = _merge_biased_keys(
                Q,
                M,
                L,
                acc,
                row_min,
                row_pos,
                row_valid,
                seq_len,
                bias_lo,
                bias_hi,
                bias_positions_ptr,
                bias_values_ptr,
                key_cache_ptr,
                value_cache_ptr,
                block_table_ptr + seq.to(tl.int64) * stride_bt_seq,
                kv_head,
                dims,
                dim_valid,
                scale,
                stride_k_blk,
                stride_k_slot,
                stride_k_head,
                stride_v_blk,
                stride_v_slot,
                stride_v_head,
                BLOCK_SIZE,
                BIAS_CHUNK,
                IEEE_DOT,
            )
    out = acc / tl.where(L > 0.0, L, 1.0)[:, None]
    tl.store(
        out_ptr + row_token[:, None] * stride_o_tok + row_head[:, None] * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )
