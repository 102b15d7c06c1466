#!/usr/bin/env python
"""Micro-benchmark: the CPU backend's perturbed-row recompute for one layer of one step.

    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_recompute.py [--repeats 7]

Replays the attention recompute of representative explanation steps (the
shapes vLLM schedules for a 512-token token-granularity explanation with
4096 tokens per step) on a synthetic paged KV cache, and times
``AtmanCPUAttentionBackendImpl._overwrite_perturbed_rows`` with its chunks
of sequences against one sequence per call (``recompute_variants.py``),
alternating the two and keeping the fastest of ``--repeats`` runs (robust
to other jobs on the machine). Also checks that both write the same output
rows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 8, 4, 64, 32

# (name, number of forks, new tokens per fork, sequence length)
STEPS = [
    ("early forks: 8 x 512 new tokens", 8, 512, 512),
    ("middle forks: 16 x 256 new tokens", 16, 256, 512),
    ("late forks: 64 x 64 new tokens", 64, 64, 512),
    ("last forks: 128 x 32 new tokens", 128, 32, 512),
]


def make_step(torch, forks: int, q_len: int, seq_len: int):
    from atman_vllm.core.jobs import KeyBias
    from atman_vllm.core.options import Mode
    from atman_vllm.kernels import KeyBiasCSR

    gen = torch.Generator().manual_seed(0)
    blocks_per_seq = -(-seq_len // BLOCK)
    num_blocks = forks * blocks_per_seq + 1
    kv_cache = torch.randn(num_blocks, KV_HEADS, BLOCK, 2 * HEAD_SIZE, generator=gen)
    tokens = forks * q_len
    query = torch.randn(tokens, HEADS * HEAD_SIZE, generator=gen)
    block_table = torch.arange(1, num_blocks, dtype=torch.int32).view(forks, blocks_per_seq)
    md = SimpleNamespace(
        query_start_loc=torch.arange(0, tokens + 1, q_len, dtype=torch.int32),
        seq_lens=torch.full((forks,), seq_len, dtype=torch.int32),
        block_table=block_table,
        slot_mapping=torch.zeros(tokens, dtype=torch.long),
    )
    # One suppressed token per fork, inside the new tokens (token granularity, factor 0.1).
    first_new = seq_len - q_len
    bias = {r: KeyBiasCSR.from_key_biases([KeyBias((first_new + (r * 7) % q_len,), (0.1,), Mode.LOG_ADDITIVE)])
            for r in range(forks)}
    return query, kv_cache, md, bias


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pin", default="0 1", help="GOMP_CPU_AFFINITY ('' = unpinned)")
    args = p.parse_args(argv)
    if args.pin:
        os.environ["GOMP_CPU_AFFINITY"] = args.pin
    import torch

    torch.set_num_threads(args.threads)
    from atman_vllm.vllm import backend_cpu

    import recompute_variants

    # The layout detector needs freshly written keys; the layout does not matter for timing.
    backend_cpu.PagedKVLayout._by_isa["bench"] = ("plain", "plain")
    layer = SimpleNamespace(isa="bench")
    impl = SimpleNamespace(num_heads=HEADS, head_size=HEAD_SIZE, scale=1 / math.sqrt(HEAD_SIZE))
    overwrite = backend_cpu.AtmanCPUAttentionBackendImpl._overwrite_perturbed_rows
    print(f"torch threads {torch.get_num_threads()}, GOMP_CPU_AFFINITY={os.environ.get('GOMP_CPU_AFFINITY')!r}")
    print("| step (one layer) | one sequence per call, ms | chunked, ms | speed-up | max abs diff |")
    print("|---|---:|---:|---:|---:|")
    for name, forks, q_len, seq_len in STEPS:
        query, kv_cache, md, bias = make_step(torch, forks, q_len, seq_len)
        outs, best = {}, {v: math.inf for v in recompute_variants.VARIANTS}
        for _ in range(args.repeats):
            for v in recompute_variants.VARIANTS:
                recompute_variants.use(v)
                out = torch.zeros_like(query)
                md.__dict__.pop(backend_cpu._PLAN_ATTR, None)  # a step's first layer: the plan is built too
                t0 = time.perf_counter()
                overwrite(impl, layer, query, None, None, kv_cache, md, out, bias)
                best[v] = min(best[v], time.perf_counter() - t0)
                outs[v] = out
        diff = float((outs["per-row"] - outs["chunked"]).abs().max())
        print(f"| {name} | {best['per-row'] * 1e3:.1f} | {best['chunked'] * 1e3:.1f} | "
              f"{best['per-row'] / best['chunked']:.2f}× | {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
