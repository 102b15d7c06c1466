"""The AtMan attention backend for CUDA: a subclass of vLLM's TRITON_ATTN.

Unperturbed sequences run vLLM's stock ``unified_attention`` untouched. The
rows of perturbed sequences are then recomputed by the Triton kernel in
``atman_vllm.kernels`` (paged, per-key bias, both modes) on a compact
sub-batch and scattered back. The sub-batch and its dense bias rows are built
once per step (first layer) and reused by every layer.

On CUDA ``AtmanLLM`` selects TRITON_ATTN (``attention_backend``), since its
KV-cache layout is the one the kernel reads. Not run in CI (no GPU there);
``PerturbedSubBatch`` is tested on the CPU with the kernels' torch fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl

from atman_vllm.core.options import Mode
from atman_vllm.kernels import KeyBiasCSR, paged_attention_with_key_bias

from .biased_attention import BATCH_BIAS_ATTR, refuse_unsupported_features

_SUB_BATCH_ATTR = "atman_sub_batches"  # per-mode sub-batches cached on the step's metadata


@dataclass(frozen=True)
class PerturbedSubBatch:
    """The perturbed sequences of one step that share a mode, as a compact batch."""

    rows: torch.Tensor  # token indices of their query rows in the full batch
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    mode: Mode  # the one mode of its sequences (kept on the host: read in every layer)
    bias: KeyBiasCSR  # the sub-batch's sequences' biases, in its order
    log_factors: torch.Tensor  # the same, dense [num_seqs, max_seq_len], for the Triton path

    @classmethod
    def build(cls, batch_bias: dict[int, KeyBiasCSR], mode: Mode, query_start_loc: torch.Tensor,
              seq_lens: torch.Tensor, block_table: torch.Tensor) -> "PerturbedSubBatch | None":
        seqs = sorted(r for r, b in batch_bias.items() if b.mode is Mode(mode))
        if not seqs:
            return None
        device = query_start_loc.device
        qsl = query_start_loc.tolist()  # one host sync per step, not per layer
        q_lens = [qsl[r + 1] - qsl[r] for r in seqs]
        index = torch.tensor(seqs, device=device)
        sub_seq_lens = seq_lens[index]
        bias = KeyBiasCSR.concat([batch_bias[r] for r in seqs]).to(device)
        return cls(
            rows=torch.cat([torch.arange(qsl[r], qsl[r + 1]) for r in seqs]).to(device),
            query_start_loc=torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32,
                                         device=device),
            seq_lens=sub_seq_lens,
            block_table=block_table[index],
            max_query_len=max(q_lens),
            mode=Mode(mode),
            bias=bias,
            log_factors=bias.dense(int(sub_seq_lens.max())),
        )

    def attend(self, query, key_cache, value_cache, scale: float) -> torch.Tensor:
        """The sub-batch's attention rows, ``[len(rows), heads, head_size]``."""
        return paged_attention_with_key_bias(
            query[self.rows], key_cache, value_cache, self.block_table, self.seq_lens, self.query_start_loc,
            self.max_query_len, scale, self.bias.start_loc, self.bias.positions, self.bias.values, self.mode,
            log_factors=self.log_factors if query.is_cuda else None)


class AtmanTritonAttentionImpl(TritonAttentionImpl):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm.utils.torch_utils import is_quantized_kv_cache

        refuse_unsupported_features(self, windowed=self.sliding_window not in (None, (-1, -1), -1),
                                    quantised_kv=is_quantized_kv_cache(self.kv_cache_dtype))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                        output_scale, output_block_scale)
        batch_bias = getattr(attn_metadata, BATCH_BIAS_ATTR, None) if attn_metadata is not None else None
        if not batch_bias or self.attn_type != AttentionType.DECODER:
            return output
        if output_scale is not None:
            # Only with vLLM's attention+quant fusion pass, which is not known when the layer is
            # built; left to raise (GPU only, never measured: docs/vllm_touchpoints.md).
            raise NotImplementedError("AtMan perturbations need unquantised attention output")
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        out = output.view(output.shape[0], self.num_heads, self.head_size)
        for sub in _sub_batches(attn_metadata, batch_bias):
            out[sub.rows] = sub.attend(query, key_cache, value_cache, self.scale)
        return output


def _sub_batches(md, batch_bias) -> list[PerturbedSubBatch]:
    cached = getattr(md, _SUB_BATCH_ATTR, None)
    if cached is None or cached[0] is not batch_bias:
        subs = [PerturbedSubBatch.build(batch_bias, mode, md.query_start_loc, md.seq_lens, md.block_table)
                for mode in Mode]
        cached = (batch_bias, [s for s in subs if s is not None])
        setattr(md, _SUB_BATCH_ATTR, cached)
    return cached[1]


class AtmanTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return AtmanTritonAttentionImpl
