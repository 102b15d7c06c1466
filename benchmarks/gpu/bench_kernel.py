#!/usr/bin/env python
"""Stock vLLM paged attention vs. atman's key-bias kernel, on a CUDA GPU.

    python benchmarks/gpu/bench_kernel.py [--quick] [--dtype bfloat16] [--json-out results.json]

For each batch shape (decode, AtMan fork prefill over a cached prefix, full
prefill, mixed) it times, with the same paged KV cache and metadata:

- ``stock``: vLLM 0.32's ``unified_attention`` Triton op, called the way
  ``TritonAttentionImpl.forward`` calls it (incl. the 3D split-softmax
  scratch for small decode batches);
- ``fa`` (if importable): ``vllm_flash_attn.flash_attn_varlen_func`` with a
  block table, as the FLASH_ATTN backend calls it;
- ``plain``: ``paged_attention_with_key_bias`` with no bias (goal: <= 1.2x
  ``stock``);
- ``log``/``mult``: every sequence perturbed (an AtMan unit of 4 keys, or
  ``--correlated``: 4 + 60 scattered keys), with the dense log-factor rows
  prebuilt once per step as a backend would (``*_prepass`` rebuilds them
  inside the call; ``prepass`` is the scatter alone).

It checks the outputs too: ``plain`` against ``stock``, and the biased runs
against the PyTorch definition, and prints JSON then a table. Needs vLLM
with its CUDA kernels (the ``gpu`` extra); exits with a message elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class BatchShape:
    name: str
    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...]


@dataclass
class Row:
    case: str
    num_seqs: int
    query_tokens: int
    key_tokens: int
    times_ms: dict[str, float] = field(default_factory=dict)
    ratio_vs_stock: dict[str, float] = field(default_factory=dict)
    max_abs_err: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def batch_shapes(block_size: int, quick: bool) -> list[BatchShape]:
    shapes = []
    decode = [(1, 8192), (16, 2048), (128, 1024)] if quick else [
        (1, 1024), (1, 8192), (16, 2048), (16, 8192), (64, 4096), (256, 1024)
    ]  # fmt: skip
    for num_seqs, ctx in decode:
        shapes.append(BatchShape(f"decode {num_seqs}x{ctx}", (ctx,) * num_seqs, (1,) * num_seqs))
    forks = [(16, 1024)] if quick else [(8, 512), (32, 1024), (16, 4096)]
    for num_forks, length in forks:
        # AtMan forks: fork i perturbs position p_i (spread over the prompt)
        # and reuses the cache up to p_i rounded down to a block.
        firsts = [int(length * (i + 0.5) / num_forks) for i in range(num_forks)]
        q_lens = tuple(length - (p // block_size) * block_size for p in firsts)
        shapes.append(BatchShape(f"atman forks {num_forks}x{length}", (length,) * num_forks, q_lens))
    shapes.append(BatchShape("prefill 4x2048", (2048,) * 4, (2048,) * 4))
    if not quick:
        shapes.append(
            BatchShape("mixed 8x(1024+512) + 64 decodes@2048", (1536,) * 8 + (2048,) * 64, (512,) * 8 + (1,) * 64)
        )
    return shapes


def make_inputs(shape: BatchShape, args, device: torch.device, gen: torch.Generator):
    dtype = getattr(torch, args.dtype)
    bs, hkv, hd = args.block_size, args.num_kv_heads, args.head_size
    blocks_per_seq = [math.ceil(s / bs) for s in shape.seq_lens]
    num_blocks = sum(blocks_per_seq) + 1
    # The cache as vLLM allocates it for TRITON_ATTN / FLASH_ATTN: logical
    # [blocks, kv_heads, block_size, 2*head_size], key/value as views.
    if args.layout == "HND":
        kv = torch.empty(num_blocks, hkv, bs, 2 * hd, dtype=dtype, device=device)
    else:
        kv = torch.empty(num_blocks, bs, hkv, 2 * hd, dtype=dtype, device=device).transpose(1, 2)
    kv.normal_(generator=gen)
    key_cache, value_cache = kv.transpose(1, 2).split(hd, dim=-1)

    perm = torch.randperm(num_blocks, generator=gen, device=device).to(torch.int32)
    max_blocks = max(blocks_per_seq)
    block_table = torch.zeros(len(shape.seq_lens), max_blocks, dtype=torch.int32, device=device)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        block_table[i, :n] = perm[used : used + n]
        used += n
    q_lens = torch.tensor(shape.q_lens, dtype=torch.int32)
    query_start_loc = torch.zeros(len(shape.q_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = q_lens.cumsum(0)
    num_tokens = int(query_start_loc[-1])
    query = torch.randn(num_tokens, args.num_heads, hd, dtype=dtype, device=device, generator=gen)
    return dict(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        seq_lens=torch.tensor(shape.seq_lens, dtype=torch.int32, device=device),
        query_start_loc=query_start_loc.to(device),
        max_query_len=max(shape.q_lens),
        max_seq_len=max(shape.seq_lens),
        scale=hd**-0.5,
    )


def make_bias(shape: BatchShape, correlated: bool, device: torch.device, host_gen: torch.Generator):
    """Per sequence: an AtMan unit of 4 consecutive keys at factor 0.1 just
    before the first query row (or at a random earlier spot for decodes),
    optionally plus 60 scattered correlated keys with factors in [0.1, 0.9]."""
    from atman_vllm.core.jobs import KeyBias
    from atman_vllm.kernels import KeyBiasCSR

    biases = []
    for seq_len, q_len in zip(shape.seq_lens, shape.q_lens):
        first = max(0, seq_len - q_len - 4) if q_len > 1 else int(torch.randint(0, seq_len - 4, (1,), generator=host_gen))
        positions = set(range(first, first + 4))
        if correlated:
            extra = torch.randperm(seq_len, generator=host_gen)[:60].tolist()
            positions |= set(extra)
        positions = sorted(positions)
        factors = [0.1 if first <= p < first + 4 else 0.1 + 0.8 * float(torch.rand(1, generator=host_gen)) for p in positions]
        biases.append(KeyBias(tuple(positions), tuple(factors)))
    return KeyBiasCSR.from_key_biases(biases, device)


def stock_runner(inputs, args, out):
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    num_seqs = inputs["seq_lens"].shape[0]
    h, hkv, hd = args.num_heads, args.num_kv_heads, args.head_size
    # As TritonAttentionMetadataBuilder sizes them (no CUDA graphs): the 3D
    # (split-softmax) kernel runs for decode-only batches of <= 128 // hkv
    # sequences.
    seq_threshold_3d = 128 // hkv
    segments = 16
    hd_padded = 1 << (hd - 1).bit_length()
    dev = inputs["query"].device
    segm_output = torch.empty(seq_threshold_3d, h, segments, hd_padded, dtype=torch.float32, device=dev)
    segm_max = torch.empty(seq_threshold_3d, h, segments, dtype=torch.float32, device=dev)
    segm_expsum = torch.empty(seq_threshold_3d, h, segments, dtype=torch.float32, device=dev)
    one = torch.ones(1, dtype=torch.float32, device=dev)
    descale_shape = (num_seqs, hkv)

    def run():
        unified_attention(
            q=inputs["query"],
            k=inputs["key_cache"],
            v=inputs["value_cache"],
            out=out,
            cu_seqlens_q=inputs["query_start_loc"],
            max_seqlen_q=inputs["max_query_len"],
            seqused_k=inputs["seq_lens"],
            max_seqlen_k=inputs["max_seq_len"],
            softmax_scale=inputs["scale"],
            causal=True,
            window_size=(-1, -1),
            block_table=inputs["block_table"],
            softcap=0,
            q_descale=None,
            k_descale=one.expand(descale_shape),
            v_descale=one.expand(descale_shape),
            seq_threshold_3D=seq_threshold_3d,
            num_par_softmax_segments=segments,
            softmax_segm_output=segm_output,
            softmax_segm_max=segm_max,
            softmax_segm_expsum=segm_expsum,
        )

    return run


def flash_attn_runner(inputs, out):
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    version = get_flash_attn_version(head_size=inputs["query"].shape[-1])

    def run():
        flash_attn_varlen_func(
            q=inputs["query"],
            k=inputs["key_cache"],
            v=inputs["value_cache"],
            out=out,
            cu_seqlens_q=inputs["query_start_loc"],
            max_seqlen_q=inputs["max_query_len"],
            seqused_k=inputs["seq_lens"],
            max_seqlen_k=inputs["max_seq_len"],
            softmax_scale=inputs["scale"],
            causal=True,
            window_size=[-1, -1],
            block_table=inputs["block_table"],
            softcap=0.0,
            fa_version=version,
        )

    return run


def atman_runner(inputs, out, csr=None, mode="log-additive", log_factors=None):
    from atman_vllm.kernels import paged_attention_with_key_bias

    bias = (csr.start_loc, csr.positions, csr.values) if csr is not None else (None, None, None)

    def run():
        paged_attention_with_key_bias(
            inputs["query"], inputs["key_cache"], inputs["value_cache"], inputs["block_table"],
            inputs["seq_lens"], inputs["query_start_loc"], inputs["max_query_len"], inputs["scale"],
            *bias, mode, out, implementation="triton", log_factors=log_factors,
        )  # fmt: skip

    return run


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def measure(shape: BatchShape, args, device, gen, host_gen) -> Row:
    from atman_vllm.kernels import dense_log_factors, paged_attention_with_key_bias_torch

    inputs = make_inputs(shape, args, device, gen)
    row = Row(shape.name, len(shape.seq_lens), sum(shape.q_lens), sum(shape.seq_lens))
    query = inputs["query"]
    outs = {name: torch.empty_like(query) for name in ("stock", "fa", "plain", "log", "mult")}

    runners = {"stock": stock_runner(inputs, args, outs["stock"])}
    if not args.no_flash_attn:
        try:
            runners["fa"] = flash_attn_runner(inputs, outs["fa"])
            runners["fa"]()
        except Exception as exc:  # optional column: record why it is missing
            runners.pop("fa", None)
            row.notes.append(f"flash-attn unavailable: {type(exc).__name__}: {exc}"[:200])
    runners["plain"] = atman_runner(inputs, outs["plain"])

    csr = make_bias(shape, args.correlated, device, host_gen)
    width = inputs["block_table"].shape[1] * args.block_size
    log_factors = dense_log_factors(csr.start_loc, csr.positions, csr.values, width)
    runners["prepass"] = lambda: dense_log_factors(csr.start_loc, csr.positions, csr.values, width)
    for mode, key in (("log-additive", "log"), ("multiplicative", "mult")):
        runners[key] = atman_runner(inputs, outs[key], csr, mode, log_factors)
        runners[f"{key}_prepass"] = atman_runner(inputs, torch.empty_like(query), csr, mode, None)

    for name, fn in runners.items():
        row.times_ms[name] = round(bench_ms(fn), 4)
    for name, ms in row.times_ms.items():
        if name not in ("stock", "prepass"):
            row.ratio_vs_stock[name] = round(ms / row.times_ms["stock"], 3)

    # Correctness: same inputs, so plain must equal stock up to rounding;
    # the biased outputs against the PyTorch definition (fp32 math).
    for name in ("stock", "plain", "log", "mult") + (("fa",) if "fa" in runners else ()):
        runners[name]()
    torch.cuda.synchronize()
    row.max_abs_err["plain_vs_stock"] = float((outs["plain"].float() - outs["stock"].float()).abs().max())
    if "fa" in runners:
        row.max_abs_err["fa_vs_stock"] = float((outs["fa"].float() - outs["stock"].float()).abs().max())
    if row.query_tokens * max(shape.seq_lens) <= 4096 * 4096 and row.num_seqs <= 64:
        for mode, key in (("log-additive", "log"), ("multiplicative", "mult")):
            want = paged_attention_with_key_bias_torch(
                query, inputs["key_cache"], inputs["value_cache"], inputs["block_table"], inputs["seq_lens"],
                inputs["query_start_loc"], inputs["max_query_len"], inputs["scale"],
                csr.start_loc, csr.positions, csr.values, mode,
            )  # fmt: skip
            row.max_abs_err[f"{key}_vs_torch"] = float((outs[key].float() - want.float()).abs().max())
    else:
        row.notes.append("biased outputs not checked (torch reference too large)")
    return row


def print_table(rows: list[Row]) -> None:
    cols = ["stock", "fa", "plain", "log", "mult", "log_prepass", "mult_prepass", "prepass"]
    head = f"{'case':<40}" + "".join(f"{c:>13}" for c in cols) + f"{'plain/stock':>13}{'max|plain-stock|':>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = "".join(f"{r.times_ms[c]:>13.4f}" if c in r.times_ms else f"{'-':>13}" for c in cols)
        ratio = r.ratio_vs_stock.get("plain", float("nan"))
        flag = "" if ratio <= 1.2 else "  > 1.2x"
        print(f"{r.case:<40}{cells}{ratio:>13.3f}{r.max_abs_err['plain_vs_stock']:>18.2e}{flag}")
    print("(times in ms, median of triton.testing.do_bench)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stock vLLM paged attention vs atman key-bias kernel")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layout", default="HND", choices=["HND", "NHD"], help="physical KV-cache order")
    parser.add_argument("--correlated", action="store_true", help="60 extra scattered biased keys per sequence")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-flash-attn", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print(
            "bench_kernel.py needs a CUDA GPU and vLLM's CUDA build: torch.cuda.is_available() is False "
            "here. Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)  # device tensors
    host_gen = torch.Generator().manual_seed(args.seed)  # host-side choices (bias positions)
    rows = [measure(shape, args, device, gen, host_gen) for shape in batch_shapes(args.block_size, args.quick)]
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": vars(args),
        "results": [asdict(r) for r in rows],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text)
    print()
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
