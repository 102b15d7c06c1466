"""Random paged batches in vLLM's GPU cache layout, and a float64 reference.

Shared by the PyTorch-fallback tests (in-process) and the Triton-kernel cases
(run in a child process with TRITON_INTERPRET=1). Imports neither Triton nor
vLLM.

The reference is written independently of both implementations: it rebuilds
each sequence's keys slot by slot from the block table, then loops over
(sequence, head, query) applying ATMAN_SPEC §2 literally.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass

import torch

# Kinds of sequences in one batch, as vLLM schedules them.
PREFIX_CHUNK = "prefill with cached prefix"
PREFILL = "pure prefill"
DECODE = "decode"
DECODE_AT_BLOCK_EDGE = "decode, seq_len a multiple of block_size"
NO_QUERIES = "no query rows this step"
MIXED_BATCH = (PREFIX_CHUNK, PREFILL, DECODE, DECODE_AT_BLOCK_EDGE, NO_QUERIES)


def fresh_seed() -> int:
    """A new seed per run; ATMAN_TEST_SEED=N replays a failure."""
    forced = os.environ.get("ATMAN_TEST_SEED")
    return int(forced) if forced else secrets.randbits(31)


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens (+ padding rows), H, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D] strided view
    value_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks]
    seq_lens: torch.Tensor  # int32
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    max_query_len: int
    scale: float
    bias_start_loc: torch.Tensor | None
    bias_positions: torch.Tensor | None
    bias_values: torch.Tensor | None
    kinds: tuple[str, ...]
    num_real_tokens: int

    def args(self) -> tuple:
        return (
            self.query, self.key_cache, self.value_cache, self.block_table, self.seq_lens,
            self.query_start_loc, self.max_query_len, self.scale,
            self.bias_start_loc, self.bias_positions, self.bias_values,
        )  # fmt: skip

    def describe(self) -> str:
        lens = list(zip(self.kinds, self.seq_lens.tolist(), (self.query_start_loc.diff()).tolist()))
        return f"(kind, seq_len, q_len)={lens}"


def _lengths(kind: str, block_size: int, gen: torch.Generator) -> tuple[int, int]:
    def randint(lo: int, hi: int) -> int:  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    if kind == PREFIX_CHUNK:
        seq_len = randint(block_size + 3, 3 * block_size + 5)
        return seq_len, randint(2, seq_len - block_size)  # prefix covers >= 1 full block
    if kind == PREFILL:
        n = randint(3, 2 * block_size + 3)
        return n, n
    if kind == DECODE:
        return randint(2, 3 * block_size - 1), 1
    if kind == DECODE_AT_BLOCK_EDGE:
        return block_size * randint(1, 2), 1
    if kind == NO_QUERIES:
        return randint(1, block_size), 0
    raise ValueError(kind)


def make_batch(
    gen: torch.Generator,
    *,
    block_size: int,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_size: int = 32,
    dtype: torch.dtype = torch.float32,
    layout: str = "HND",
    kinds: tuple[str, ...] = MIXED_BATCH,
    with_bias: bool = True,
    padding_rows: int = 3,
) -> PagedBatch:
    """A batch over a NaN-poisoned paged cache.

    The cache is allocated like vLLM's TRITON_ATTN backend does it, a
    ``[num_blocks, Hkv, block_size, 2*D]`` tensor (physically HND, or NHD
    and transposed), and ``transpose(1, 2).split(D, -1)`` gives the
    ``[num_blocks, block_size, Hkv, D]`` key/value views. Every slot that is
    not a real token (spare blocks, the tail of each last block) holds NaN,
    so reading anything outside a sequence poisons the output.
    """
    lengths = [_lengths(kind, block_size, gen) for kind in kinds]
    blocks_per_seq = [-(-seq_len // block_size) for seq_len, _ in lengths]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks stay NaN
    if layout == "HND":
        kv = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size), math.nan, dtype=dtype)
    elif layout == "NHD":
        kv = torch.full((num_blocks, block_size, num_kv_heads, 2 * head_size), math.nan, dtype=dtype).transpose(1, 2)
    else:
        raise ValueError(layout)
    key_cache, value_cache = kv.transpose(1, 2).split(head_size, dim=-1)

    max_blocks = max(blocks_per_seq) + 2  # wider than needed, like vLLM's table
    physical = torch.randperm(num_blocks, generator=gen)
    block_table = physical[torch.randint(0, num_blocks, (len(kinds), max_blocks), generator=gen)].to(torch.int32)
    used = 0
    for seq, ((seq_len, _), nblk) in enumerate(zip(lengths, blocks_per_seq)):
        block_table[seq, :nblk] = physical[used : used + nblk].to(torch.int32)
        used += nblk
        for pos in range(seq_len):
            blk, slot = int(block_table[seq, pos // block_size]), pos % block_size
            key_cache[blk, slot] = torch.randn(num_kv_heads, head_size, generator=gen).to(dtype)
            value_cache[blk, slot] = torch.randn(num_kv_heads, head_size, generator=gen).to(dtype)

    q_lens = [q for _, q in lengths]
    num_real_tokens = sum(q_lens)
    query = torch.randn(num_real_tokens + padding_rows, num_heads, head_size, generator=gen).to(dtype)
    query_start_loc = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0).tolist()), dtype=torch.int32)
    # A random temperature so some rows are peaked and some flat.
    scale = float(head_size**-0.5 * (0.5 + 2.0 * torch.rand(1, generator=gen)))

    bias_start_loc = bias_positions = bias_values = None
    if with_bias:
        starts, positions, values = [0], [], []
        for seq, (seq_len, _) in enumerate(lengths):
            if seq == 1:  # one sequence stays unperturbed: plain attention
                starts.append(starts[-1])
                continue
            count = int(torch.randint(1, 6, (1,), generator=gen))
            # Up to 3 positions past the end: entries that must be ignored.
            chosen = torch.randperm(seq_len + 3, generator=gen)[:count].tolist()
            if kinds[seq] == PREFIX_CHUNK and seq_len - 1 not in chosen:
                chosen.append(seq_len - 1)  # a query's own key (the diagonal)
            # Factors in [0.05, 3]: suppression and amplification; one exact
            # f = 1 (log f = 0) entry, which both modes must treat as no-op.
            log_f = torch.empty(len(chosen)).uniform_(math.log(0.05), math.log(3.0), generator=gen)
            if seq == 0:
                log_f[0] = 0.0
            positions += chosen
            values += log_f.tolist()
            starts.append(starts[-1] + len(chosen))
        bias_start_loc = torch.tensor(starts, dtype=torch.int32)
        bias_positions = torch.tensor(positions, dtype=torch.int32)
        bias_values = torch.tensor(values, dtype=torch.float32)

    return PagedBatch(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        seq_lens=torch.tensor([s for s, _ in lengths], dtype=torch.int32),
        query_start_loc=query_start_loc,
        max_query_len=max(q_lens),
        scale=scale,
        bias_start_loc=bias_start_loc,
        bias_positions=bias_positions,
        bias_values=bias_values,
        kinds=tuple(kinds),
        num_real_tokens=num_real_tokens,
    )


def reference_attention(batch: PagedBatch, mode: str) -> torch.Tensor:
    """float64 output rows [num_real_tokens, H, D], from ATMAN_SPEC §2."""
    num_heads, head_size = batch.query.shape[1], batch.query.shape[2]
    num_kv_heads, block_size = batch.key_cache.shape[2], batch.key_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(batch.num_real_tokens, num_heads, head_size, dtype=torch.float64)
    starts = batch.query_start_loc.tolist()
    for seq, seq_len in enumerate(batch.seq_lens.tolist()):
        keys = torch.stack(
            [batch.key_cache[int(batch.block_table[seq, p // block_size]), p % block_size] for p in range(seq_len)]
        ).double()
        values = torch.stack(
            [batch.value_cache[int(batch.block_table[seq, p // block_size]), p % block_size] for p in range(seq_len)]
        ).double()
        log_factor: dict[int, float] = {}
        if batch.bias_start_loc is not None:
            lo, hi = int(batch.bias_start_loc[seq]), int(batch.bias_start_loc[seq + 1])
            for p, v in zip(batch.bias_positions[lo:hi].tolist(), batch.bias_values[lo:hi].tolist()):
                log_factor[p] = v
        q_len = starts[seq + 1] - starts[seq]
        for i in range(q_len):
            position = seq_len - q_len + i
            row = starts[seq] + i
            for head in range(num_heads):
                kv_head = head // group
                q = batch.query[row, head].double()
                scores = keys[: position + 1, kv_head] @ q * batch.scale  # H[q, 0..position]
                row_min = scores.min()  # m_q over the causally visible keys, before any change
                for p, v in log_factor.items():
                    if p > position:
                        continue
                    if mode == "log-additive":
                        scores[p] = scores[p] + v
                    else:
                        scores[p] = row_min + math.exp(v) * (scores[p] - row_min)
                weights = torch.softmax(scores, dim=0)
                out[row, head] = weights @ values[: position + 1, kv_head]
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN anywhere counts as infinite)."""
    got = got.double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
