"""The AtMan attention backend for vLLM's CPU platform (CPU_ATTN).

Unperturbed sequences run vLLM's stock kernel untouched. For the rows of a
perturbed sequence the stock result is overwritten by ``biased_attention``,
recomputed from the paged KV cache (so prefix blocks served from the prefix
cache are attended to like any other). The step's per-row biases arrive on
the attention metadata as ``atman_bias`` (see ``runner_hooks``).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from .biased_attention import BATCH_BIAS_ATTR, KeyBiasTensors, biased_attention




class PagedKVLayout:
    """How one ISA packs a block of keys; found by reading back fresh writes.

    The CPU kernels store keys transposed inside a block for some ISAs
    (``vec``: [head_size, block_size]) and plain for others. Rather than hard-code
    a table that changes between vLLM releases, the layout is checked the
    first time each ISA is seen against the keys just written to the cache.
    """

    _transposed_by_isa: dict[str, bool] = {}

    @classmethod
    def keys_transposed(cls, isa: str, key_cache, key, slot_mapping) -> bool:
        known = cls._transposed_by_isa.get(isa)
        if known is not None:
            return known
        block_size, head_size = key_cache.shape[2], key_cache.shape[3]
        slot = int(slot_mapping[0])
        block, offset = divmod(slot, block_size)
        raw = key_cache[block].reshape(key_cache.shape[1], -1)  # [kv_heads, block_size * head_size]
        plain = raw.view(-1, block_size, head_size)[:, offset]
        transposed = raw.view(-1, head_size, block_size)[:, :, offset]
        expected = key[0].to(raw.dtype)
        if torch.equal(transposed, expected) and not torch.equal(plain, expected):
            cls._transposed_by_isa[isa] = True
        elif torch.equal(plain, expected):
            cls._transposed_by_isa[isa] = False
        else:
            raise RuntimeError(
                f"atman-vllm cannot read vLLM's CPU KV-cache layout for ISA {isa!r} "
                "(neither plain nor block-transposed keys); AtMan needs float32/bfloat16 "
                "caches without quantisation"
            )
        return cls._transposed_by_isa[isa]


def gather_sequence_kv(key_cache, value_cache, block_ids, seq_len: int, keys_transposed: bool):
    """All keys and values of one sequence, ``[seq_len, kv_heads, head_size]`` each."""
    k = key_cache[block_ids]  # [n, kv_heads, block_size, head_size] (a copy)
    n, kv_heads, block_size, head_size = k.shape
    if keys_transposed:
        k = k.reshape(n, kv_heads, head_size, block_size).transpose(2, 3)
    v = value_cache[block_ids]
    k = k.permute(0, 2, 1, 3).reshape(n * block_size, kv_heads, head_size)[:seq_len]
    v = v.permute(0, 2, 1, 3).reshape(n * block_size, kv_heads, head_size)[:seq_len]
    return k, v


class AtmanCPUAttentionBackendImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The recomputation implements plain causal softmax attention; refuse
        # model features it would silently get wrong.
        unsupported = {
            "sliding window": self.sliding_window != -1,
            "ALiBi": self.alibi_slopes is not None,
            "attention sinks": self.sinks is not None,
            "logits soft-cap": bool(self.logits_soft_cap),
            "quantised KV cache": self.is_fp8_kv_cache,
        }
        self._unsupported = [name for name, on in unsupported.items() if on]

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        batch_bias = getattr(attn_metadata, BATCH_BIAS_ATTR, None) if attn_metadata is not None else None
        if batch_bias and self.attn_type == AttentionType.DECODER:
            if self._unsupported:
                raise NotImplementedError(
                    f"AtMan perturbations are not supported with {', '.join(self._unsupported)}"
                )
            self._overwrite_perturbed_rows(layer, query, key, kv_cache, attn_metadata, output, batch_bias)
        return output

    def _overwrite_perturbed_rows(self, layer, query, key, kv_cache, md, output,
                                  batch_bias: dict[int, KeyBiasTensors]) -> None:
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
        transposed = PagedKVLayout.keys_transposed(layer.isa, key_cache, key, md.slot_mapping)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        q_all = query.view(query.shape[0], self.num_heads, self.head_size)
        qsl = md.query_start_loc.tolist()
        seq_lens = md.seq_lens.tolist()
        for row, bias in batch_bias.items():
            q_start, q_end, seq_len = qsl[row], qsl[row + 1], seq_lens[row]
            if q_end == q_start:
                continue
            block_ids = md.block_table[row, : -(-seq_len // block_size)].long()
            keys, values = gather_sequence_kv(key_cache, value_cache, block_ids, seq_len, transposed)
            out[q_start:q_end] = biased_attention(q_all[q_start:q_end], keys, values, self.scale, bias)


class AtmanCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return AtmanCPUAttentionBackendImpl
