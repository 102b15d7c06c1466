"""vLLM engine options shared by every command that starts an engine."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("vLLM engine")
    g.add_argument("--dtype", default="auto", help="model dtype (auto|float32|bfloat16|float16)")
    g.add_argument("--max-model-len", type=int, help="longest prompt + target in tokens")
    g.add_argument("--block-size", type=int, help="KV-cache block size (sharing between forks is per block)")
    g.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (faster start, slower steps)")
    g.add_argument("--kv-cache-space-gib", type=float, help="KV-cache memory in GiB")
    g.add_argument("--max-num-batched-tokens", type=int, help="tokens per engine step (prefill chunk)")
    g.add_argument("--no-prefix-caching", action="store_true", help="turn prefix sharing off (for comparison)")
    g.add_argument("--tensor-parallel-size", type=int,
                   help="worker processes sharing each layer (vLLM's TP; on CPU one core range per rank is "
                        "bound unless VLLM_CPU_OMP_THREADS_BIND is set; docs/scale_out.md)")
    g.add_argument("--pipeline-parallel-size", type=int,
                   help="pipeline stages (vLLM's PP; fails on CPU in vLLM 0.32.0, see docs/scale_out.md)")
    g.add_argument("--distributed-executor-backend", choices=["mp", "uni", "ray"],
                   help="how vLLM runs its workers (default: vLLM's choice, mp for more than one)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """Only what the user set: everything else keeps the API's defaults."""
    kw: dict = {"dtype": args.dtype}
    for name in ("max_model_len", "block_size", "max_num_batched_tokens", "tensor_parallel_size",
                 "pipeline_parallel_size", "distributed_executor_backend"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.kv_cache_space_gib is not None:
        kw["kv_cache_memory_bytes"] = int(args.kv_cache_space_gib * (1 << 30))
    if args.no_prefix_caching:
        kw["enable_prefix_caching"] = False
    return kw
