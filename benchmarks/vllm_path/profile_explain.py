#!/usr/bin/env python
"""Where the time of method (a) goes: cProfile of one token-granularity explanation.

    nice -n 10 .venv/bin/python benchmarks/vllm_path/profile_explain.py --length 512 [--variant chunked per-row]

Runs ``AtmanLLM`` with the engine in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so cProfile sees the model runner),
the model and contexts of ``bench_explain.py``, and breaks the explanation's
wall time down into: the stock CPU attention kernel, the PyTorch recompute of
perturbed rows (backend_cpu), the MLPs, the q/k/v/o projections, target
scoring, the rest of the model runner, and the engine outside the model
runner (scheduling, input preparation, output processing). ``--variant
per-row`` recomputes one perturbed sequence per attention call
(``recompute_variants.py``) instead of the backend's chunks, and checks
that every fork's target cross-entropies agree between the variants. cProfile adds overhead to Python-heavy parts
(the per-row loop most), so the un-profiled wall time is reported too.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _key(fn):
    code = getattr(fn, "__code__", None) or fn.__func__.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def breakdown(stats: pstats.Stats) -> dict:
    from vllm.model_executor.models import llama
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from atman_vllm.vllm import backend_cpu, runner_hooks

    st = stats.stats

    def cum(fn) -> float:
        entry = st.get(_key(fn))
        return entry[3] if entry else 0.0

    def builtin(name_part: str) -> float:
        return sum(v[3] for k, v in st.items() if k[0] == "~" and name_part in k[2])

    impl = backend_cpu.AtmanCPUAttentionBackendImpl
    runner_step = cum(GPUModelRunner.execute_model)
    model = cum(llama.LlamaModel.forward)
    attn_layer = cum(impl.forward)
    recompute = cum(impl._overwrite_perturbed_rows)
    stock_total = cum(CPUAttentionBackendImpl.forward)
    mlp = cum(llama.LlamaMLP.forward)
    llama_attn = cum(llama.LlamaAttention.forward)
    scoring = cum(runner_hooks.score_target_tokens)
    return {
        "model_runner_execute_model_s": runner_step,
        "model_forward_s": model,
        "attention_layers_s": attn_layer,
        "recompute_perturbed_rows_s": recompute,
        "stock_attention_s": stock_total,
        "stock_kernel_only_s": builtin("cpu_attention_with_kv_cache"),
        "kv_cache_write_s": builtin("cpu_attn_reshape_and_cache"),
        "mlp_s": mlp,
        "qkv_o_proj_rope_s": llama_attn - attn_layer,
        "norms_embed_other_model_s": model - mlp - llama_attn,
        "target_scoring_s": scoring,
        "runner_other_s": runner_step - model - scoring,
        "gemm_onednn_s": builtin("onednn_mm"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--variant", nargs="+", default=["chunked"], choices=["chunked", "per-row"])
    p.add_argument("--model", default="llama-32k", help="a model of bench_explain.py --models")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pin", default="0 1", help="GOMP_CPU_AFFINITY for torch's OpenMP threads ('' = unpinned)")
    p.add_argument("--no-profile", action="store_true", help="wall time only")
    p.add_argument("--repeats", type=int, default=2, help="un-profiled runs per variant (alternated)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if args.pin:  # in-process there is no vLLM worker binding; unpinned OpenMP threads spin badly on 2 busy cores
        os.environ["GOMP_CPU_AFFINITY"] = args.pin
    import numpy as np
    import torch

    from bench_explain import build_model, make_contexts

    model_dir = build_model(args.model, "/tmp/atman-vllm-bench")["dir"]
    ctx = make_contexts(model_dir, [args.length], [], 4)
    from atman_vllm.api import AtmanLLM
    from atman_vllm.core import ExplainRequest, make_options

    import recompute_variants

    llm = AtmanLLM(model_dir, enforce_eager=True, dtype="float32", block_size=32, max_model_len=args.length + 64,
                   kv_cache_memory_bytes=1 << 30)
    print(f"torch threads in the engine process: {torch.get_num_threads()}", flush=True)
    w = ctx["warmup"]
    llm.explain(w["prompt"], w["target"], granularity="token")
    c = ctx["cases"][0]
    report = {"length": args.length, "threads": torch.get_num_threads(), "variants": {}}
    ce, walls = {}, {v: [] for v in args.variant}
    plan = llm.plan(ExplainRequest(c["prompt"], c["target"], make_options(granularity="token")))
    # Un-profiled wall times, variants alternated so that changing machine load hits both alike.
    for _ in range(args.repeats):
        for variant in args.variant:
            recompute_variants.use(variant)
            llm.llm.reset_prefix_cache()  # every run starts from a cold cache
            t0 = time.perf_counter()
            results = llm.run_jobs(plan.jobs)
            walls[variant].append(time.perf_counter() - t0)
            ce[variant] = np.stack([r.target_ce for r in results])
            computed = sum(r.computed_tokens for r in results)
    for variant in args.variant:
        recompute_variants.use(variant)
        entry = {"wall_s_unprofiled": walls[variant], "wall_s_min": min(walls[variant]),
                 "forks": len(plan.jobs) - 1, "computed_tokens": computed}
        if not args.no_profile:
            llm.llm.reset_prefix_cache()
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            llm.run_jobs(plan.jobs)
            prof.disable()
            entry["wall_s_profiled"] = time.perf_counter() - t0
            entry.update(breakdown(pstats.Stats(prof)))
            dump = f"/tmp/atman-vllm-bench/profile_{args.length}_{variant}.prof"
            prof.dump_stats(dump)
            entry["pstats_file"] = dump
            print(f"--- {variant}: top functions by own time", flush=True)
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        report["variants"][variant] = entry
        print(json.dumps({variant: entry}, indent=2), flush=True)
    if len(ce) == 2:
        report["max_abs_ce_diff_per_row_vs_chunked"] = float(np.abs(ce["per-row"] - ce["chunked"]).max())
        print("max |CE(per-row) - CE(chunked)| over all forks and target tokens:",
              report["max_abs_ce_diff_per_row_vs_chunked"], flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
