"""Prototype: the CPU backend's perturbed-row recompute, batched over rows.

``AtmanCPUAttentionBackendImpl._overwrite_perturbed_rows`` (atman_vllm/vllm/
backend_cpu.py) loops over the perturbed sequences of a step and, per
sequence and layer, gathers its KV blocks, repeats the KV heads, builds the
score matrix, biases, masks, softmaxes and multiplies: ~20 small PyTorch ops
per fork per layer. An explanation step holds tens of forks, so the step's
attention is dominated by per-op overhead, not arithmetic (see
profile_explain.py). This version does the same computation for a chunk of
rows with one gather of all their blocks and one fused
``scaled_dot_product_attention`` (causal mask + per-key log-factors as an
additive float mask, GQA without materialising repeated KV heads).

Log-additive rows only: a multiplicative bias needs each row's minimum over
its visible raw scores, which SDPA does not expose; those rows keep the
per-row path. Not used by the package: the benchmark installs it with
``install()`` (in-process engine) to measure it; see the report.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from atman_vllm.vllm import backend_cpu

# Elements of the [rows, q, keys] additive mask one chunk may build (x4 bytes).
MASK_BUDGET = 16 << 20

_original = backend_cpu.AtmanCPUAttentionBackendImpl._overwrite_perturbed_rows


def _is_log_additive(bias) -> bool:
    return str(getattr(bias.mode, "value", bias.mode)) == "log-additive"


def overwrite_perturbed_rows_batched(self, layer, query, key, value, kv_cache, md, output, batch_bias) -> None:
    qsl = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    rows = [r for r, b in batch_bias.items() if qsl[r + 1] > qsl[r] and _is_log_additive(b)]
    others = {r: b for r, b in batch_bias.items() if r not in set(rows)}
    if others:
        _original(self, layer, query, key, value, kv_cache, md, output, others)
    if not rows:
        return
    num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, -1).chunk(2, dim=2)
    decode_keys, decode_values = backend_cpu.PagedKVLayout.decoders(
        layer.isa, key_cache, value_cache, key, value, md.slot_mapping)
    heads, head_size = self.num_heads, self.head_size
    out = output.view(output.shape[0], heads, head_size)
    q_all = query.view(query.shape[0], heads, head_size)

    # Similar query lengths together: less padding per chunk.
    rows.sort(key=lambda r: (qsl[r + 1] - qsl[r], seq_lens[r]), reverse=True)
    chunk: list[int] = []
    for r in rows:
        q_max = qsl[chunk[0] + 1] - qsl[chunk[0]] if chunk else qsl[r + 1] - qsl[r]
        s_max = max([seq_lens[c] for c in chunk] + [seq_lens[r]])
        if chunk and (len(chunk) + 1) * q_max * s_max > MASK_BUDGET:
            _attend_chunk(self, chunk, qsl, seq_lens, batch_bias, key_cache, value_cache, decode_keys,
                          decode_values, q_all, out, md.block_table, block_size, num_kv_heads, head_size)
            chunk = []
        chunk.append(r)
    _attend_chunk(self, chunk, qsl, seq_lens, batch_bias, key_cache, value_cache, decode_keys,
                  decode_values, q_all, out, md.block_table, block_size, num_kv_heads, head_size)


def _attend_chunk(self, chunk, qsl, seq_lens, batch_bias, key_cache, value_cache, decode_keys, decode_values,
                  q_all, out, block_table, block_size, num_kv_heads, head_size) -> None:
    n = len(chunk)
    q_lens = torch.tensor([qsl[r + 1] - qsl[r] for r in chunk])
    s_lens = torch.tensor([seq_lens[r] for r in chunk])
    q_max, s_max = int(q_lens.max()), int(s_lens.max())
    nb = -(-s_max // block_size)
    keys_padded = nb * block_size

    # One gather for every row's blocks (table entries past a row's length point at
    # some block; those key columns are masked below).
    block_ids = block_table[torch.tensor(chunk), :nb].long().reshape(-1)
    k = decode_keys(key_cache[block_ids].reshape(n * nb, num_kv_heads, -1), block_size, head_size)
    v = decode_values(value_cache[block_ids].reshape(n * nb, num_kv_heads, -1), block_size, head_size)
    k = k.reshape(n, nb, num_kv_heads, block_size, head_size).transpose(1, 2).reshape(n, num_kv_heads, keys_padded, head_size)
    v = v.reshape(n, nb, num_kv_heads, block_size, head_size).transpose(1, 2).reshape(n, num_kv_heads, keys_padded, head_size)

    # Query rows padded to q_max by repeating each row's last query (discarded after).
    steps = torch.arange(q_max)
    q_index = torch.tensor([qsl[r] for r in chunk])[:, None] + torch.minimum(steps[None, :], (q_lens - 1)[:, None])
    q = q_all[q_index].transpose(1, 2)  # [n, heads, q_max, d]

    # Additive mask: log f on biased keys, -inf on keys a query row cannot see.
    q_pos = (s_lens - q_lens)[:, None] + steps[None, :]  # absolute position of each query row
    visible = torch.arange(keys_padded)[None, None, :] <= q_pos[:, :, None]  # [n, q_max, keys]
    log_f = torch.zeros(n, keys_padded, dtype=torch.float32)
    for i, r in enumerate(chunk):
        b = batch_bias[r]
        keep = b.positions < keys_padded
        log_f[i, b.positions[keep]] = b.log_factors[keep]
    mask = log_f[:, None, :].expand(n, q_max, keys_padded).masked_fill(~visible, -math.inf)

    o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None],
                                       scale=self.scale, enable_gqa=True)  # [n, heads, q_max, d]
    valid = steps[None, :] < q_lens[:, None]
    out[q_index[valid]] = o.transpose(1, 2)[valid].to(out.dtype)


def install() -> None:
    backend_cpu.AtmanCPUAttentionBackendImpl._overwrite_perturbed_rows = overwrite_perturbed_rows_batched


def uninstall() -> None:
    backend_cpu.AtmanCPUAttentionBackendImpl._overwrite_perturbed_rows = _original
