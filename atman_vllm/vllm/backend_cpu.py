"""The AtMan attention backend for vLLM's CPU platform (CPU_ATTN).

Unperturbed sequences run vLLM's stock kernel untouched. For the rows of a
perturbed sequence the stock result is overwritten by
``attend_batch_with_key_bias``, recomputed from the paged KV cache (so prefix
blocks served from the prefix cache are attended to like any other) for a
chunk of sequences per call: an explanation step holds tens of forks, and
one gather and one fused attention per chunk replace ~20 small PyTorch ops
per fork and layer (benchmarks/vllm_path/analysis.md). The step's per-row biases arrive on
the attention metadata as ``atman_bias`` (see ``runner_hooks``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from atman_vllm.kernels.key_bias import CausalKeyBias, KeyBiasCSR, attend_batch_with_key_bias

from .biased_attention import BATCH_BIAS_ATTR, refuse_unsupported_features


def _plain(raw, bs, hs):
    return raw.view(*raw.shape[:-1], bs, hs)


def _transposed(raw, bs, hs):  # ISA vec: keys as [head_size, block_size]
    return raw.view(*raw.shape[:-1], hs, bs).transpose(-1, -2)


def _amx_keys(raw, bs, hs):  # ISA amx: 16-token tiles of dimension pairs, [bs/16, hs/2, 16, 2]
    t = raw.view(*raw.shape[:-1], bs // 16, hs // 2, 16, 2)
    return t.permute(*range(raw.dim() - 1), -4, -2, -3, -1).reshape(*raw.shape[:-1], bs, hs)


def _amx_values(raw, bs, hs):  # ISA amx: 16-dim tiles of token pairs, [hs/16, bs/2, 16, 2]
    t = raw.view(*raw.shape[:-1], hs // 16, bs // 2, 16, 2)
    return t.permute(*range(raw.dim() - 1), -3, -1, -4, -2).reshape(*raw.shape[:-1], bs, hs)


_KEY_LAYOUTS = {"plain": _plain, "transposed": _transposed, "amx": _amx_keys}
_VALUE_LAYOUTS = {"plain": _plain, "amx": _amx_values}


class PagedKVLayout:
    """How vLLM's CPU kernels pack keys and values inside a cache block.

    The packing depends on the ISA the kernels picked (``vec``: keys
    transposed; ``amx``: bf16 tiles), is not part of vLLM's API and changes
    between releases. So each candidate decoder is checked, the first time an
    ISA is seen, against the keys and values just written to the cache; the
    first exact match is used from then on, and no match is a clear error.
    """

    _by_isa: dict[str, tuple[str, str]] = {}

    @classmethod
    def decoders(cls, isa, key_cache, value_cache, key, value, slot_mapping):
        names = cls._by_isa.get(isa)
        if names is None:
            names = cls._detect(key_cache, value_cache, key, value, slot_mapping)
            if names is None:
                raise RuntimeError(
                    f"atman-vllm cannot read vLLM's CPU KV-cache layout for ISA {isa!r}; AtMan needs a "
                    "float32 or bfloat16 cache without quantisation (see docs/vllm_touchpoints.md)")
            cls._by_isa[isa] = names
        return _KEY_LAYOUTS[names[0]], _VALUE_LAYOUTS[names[1]]

    @staticmethod
    def _detect(key_cache, value_cache, key, value, slot_mapping):
        block_size, head_size = key_cache.shape[2], key_cache.shape[3]
        slots = slot_mapping[: key.shape[0]].long()
        blocks, offsets = slots // block_size, slots % block_size
        rows = torch.arange(len(slots))

        def match(cache, fresh, layouts):
            raw = cache[blocks].reshape(len(slots), cache.shape[1], -1)
            for name, decode in layouts.items():
                try:
                    got = decode(raw, block_size, head_size)[rows, :, offsets]
                except RuntimeError:  # shape does not fit this packing
                    continue
                if torch.equal(got, fresh.to(got.dtype)):
                    return name
            return None

        k, v = match(key_cache, key, _KEY_LAYOUTS), match(value_cache, value, _VALUE_LAYOUTS)
        return (k, v) if k and v else None


class AtmanCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        refuse_unsupported_features(self, windowed=self.sliding_window != -1, quantised_kv=self.is_fp8_kv_cache)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        batch_bias = getattr(attn_metadata, BATCH_BIAS_ATTR, None) if attn_metadata is not None else None
        if not batch_bias or self.attn_type != AttentionType.DECODER:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        # Every row gets overwritten when every sequence is perturbed (the forks
        # of an explanation): then the stock kernel's work would be thrown away.
        if len(batch_bias) < attn_metadata.query_start_loc.shape[0] - 1:
            super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                            output_scale, output_block_scale)
        self._overwrite_perturbed_rows(layer, query, key, value, kv_cache, attn_metadata, output, batch_bias)
        return output

    def _overwrite_perturbed_rows(self, layer, query, key, value, kv_cache, md, output,
                                  batch_bias: dict[int, KeyBiasCSR]) -> None:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
        decoders = PagedKVLayout.decoders(layer.isa, key_cache, value_cache, key, value, md.slot_mapping)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        q_all = query.view(query.shape[0], self.num_heads, self.head_size)
        for chunk in step_recompute_plan(md, batch_bias, block_size, self.num_heads):
            keys, values = chunk.gather_kv(key_cache, value_cache, *decoders)
            attended = attend_batch_with_key_bias(q_all[chunk.q_index], keys, values, self.scale, chunk.bias)
            out[chunk.q_index[chunk.valid]] = attended[chunk.valid]


@dataclass(frozen=True)
class PerturbedRow:
    """One perturbed sequence of a step: its query rows in the step and its length."""

    row: int
    q_start: int
    q_len: int
    seq_len: int
    bias: KeyBiasCSR


@dataclass(frozen=True)
class RecomputeChunk:
    """Perturbed sequences recomputed by one attention call, as every layer of the step needs them."""

    block_ids: torch.Tensor  # [n * blocks_per_row]: each sequence's first blocks_per_row blocks, in order
    blocks_per_row: int
    q_index: torch.Tensor  # [n, q_max]: rows of the step's query; shorter runs repeat their last row
    valid: torch.Tensor  # [n, q_max]: False where a row only pads
    bias: CausalKeyBias

    def gather_kv(self, key_cache, value_cache, decode_keys, decode_values):
        """Keys and values of the chunk's sequences, ``[n, keys, kv_heads, head_size]`` each, one gather.

        Slots past a sequence's end hold whatever its block table points at;
        the causal mask (query positions) keeps them invisible.
        """
        kv_heads, block_size, head_size = key_cache.shape[1:]
        n, nb = self.q_index.shape[0], self.blocks_per_row

        def gather(cache, decode):
            t = decode(cache[self.block_ids].reshape(n * nb, kv_heads, -1), block_size, head_size)
            return t.reshape(n, nb, kv_heads, block_size, head_size).transpose(2, 3).reshape(
                n, nb * block_size, kv_heads, head_size)

        return gather(key_cache, decode_keys), gather(value_cache, decode_values)


# Elements of the biggest per-chunk intermediate (the [rows, heads, queries, keys]
# scores of the multiplicative mode; the log-additive mask is heads times smaller):
# 16 M float32 = 64 MiB, transient, whatever the step holds.
CHUNK_ELEMENTS = 16 << 20
_PLAN_ATTR = "_atman_recompute_plan"


def recompute_chunks(rows: list[PerturbedRow], heads: int) -> list[list[PerturbedRow]]:
    """The step's perturbed rows in batches for one attention call each: one mode per batch,
    similar query lengths together (padding is to the longest), each batch within CHUNK_ELEMENTS."""
    chunks: list[list[PerturbedRow]] = []
    ordered = sorted(rows, key=lambda r: (r.bias.mode.value, r.q_len, r.seq_len), reverse=True)
    for r in ordered:
        chunk = chunks[-1] if chunks else None
        if chunk and chunk[0].bias.mode is r.bias.mode:
            q_max, s_max = chunk[0].q_len, max(max(c.seq_len for c in chunk), r.seq_len)
            if (len(chunk) + 1) * heads * q_max * s_max <= CHUNK_ELEMENTS:
                chunk.append(r)
                continue
        chunks.append([r])
    return chunks


def step_recompute_plan(md, batch_bias: dict[int, KeyBiasCSR], block_size: int, heads: int) -> list[RecomputeChunk]:
    """The step's recompute chunks, built in its first attention layer and kept on its metadata:
    every layer of a step attends with the same rows, lengths, blocks and biases."""
    cached = md.__dict__.get(_PLAN_ATTR)
    if cached is not None and cached[0] is batch_bias:  # the biases are attached anew every step
        return cached[1]
    qsl, seq_lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
    rows = [PerturbedRow(r, qsl[r], qsl[r + 1] - qsl[r], seq_lens[r], b)
            for r, b in batch_bias.items() if qsl[r + 1] > qsl[r]]
    plan = [_chunk(c, md.block_table, block_size) for c in recompute_chunks(rows, heads)]
    md.__dict__[_PLAN_ATTR] = (batch_bias, plan)
    return plan


def _chunk(rows: list[PerturbedRow], block_table: torch.Tensor, block_size: int) -> RecomputeChunk:
    nb = -(-max(r.seq_len for r in rows) // block_size)
    steps = torch.arange(max(r.q_len for r in rows))
    q_len = torch.tensor([r.q_len for r in rows])
    last = torch.minimum(steps, q_len[:, None] - 1)  # padding repeats a run's last row (so no row sees nothing)
    positions = torch.tensor([r.seq_len - r.q_len for r in rows])[:, None] + last
    log_factors = KeyBiasCSR.concat([r.bias for r in rows]).dense(nb * block_size)
    return RecomputeChunk(
        block_ids=block_table[[r.row for r in rows], :nb].long().reshape(-1),
        blocks_per_row=nb,
        q_index=torch.tensor([r.q_start for r in rows])[:, None] + last,
        valid=steps[None, :] < q_len[:, None],
        bias=CausalKeyBias(positions, log_factors, rows[0].bias.mode, nb * block_size),
    )


class AtmanCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return AtmanCPUAttentionBackendImpl
