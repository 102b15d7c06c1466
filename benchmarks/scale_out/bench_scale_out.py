#!/usr/bin/env python
"""One explanation's forks on 2 data-parallel replicas of one core each vs 1 replica of one and of two cores (CPU).

    nice -n 5 .venv/bin/python benchmarks/scale_out/bench_scale_out.py [--model demo|llama26m] [--repeats 3]

Each configuration runs in a fresh interpreter: ``AsyncAtmanLLM.from_engine_args(model,
data_parallel_size=dp)`` with ``VLLM_CPU_OMP_THREADS_BIND`` set as the configuration says (one core
per replica: "0|1"; one replica on one core: "0"; on two cores: "0-1"), float32, eager, block size
32. A short warm-up explanation, then ``--repeats`` explanations of distinct ~300-token prompts (token
units, so ~300 forks each; distinct so nothing of one is cached for the next), one at a time.
Reported per configuration: wall time per explanation (median), forks per second, computed and
cached tokens (engine-reported), and the load average before and after. Appends a JSON line per
configuration to benchmarks/results/scale_out.json. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {  # name: (data_parallel_size, VLLM_CPU_OMP_THREADS_BIND)
    "1 replica x 1 core": (1, "0"),
    "1 replica x 2 cores": (1, "0-1"),
    "2 replicas x 1 core": (2, "0|1"),
}
NAMES = ["Ben", "Mira", "Otto", "Anna", "Karl", "Lea", "Tom", "Rita"]


def _model(name: str) -> str:
    if name == "demo":
        return str(REPO / "atman_vllm" / "models" / "default")
    from atman_vllm.models.factory import build_tiny_model

    # benchmarks/vllm_path's ~26M Llama: hidden 512, 8 layers, 8 heads of 64, 4 KV heads.
    return str(build_tiny_model("llama", Path("/tmp/atman-bench-llama26m"), seed=0, vocab_size=1024, hidden=512,
                                layers=8, heads=8, kv_heads=4, head_dim=64, max_position=2048))


def _prompt(count, k: int, tokens: int) -> str:
    """About ``tokens`` tokens of plain sentences; ``k`` varies the first words so prompts share no block."""
    parts, i = [], k
    while True:
        a, b = NAMES[i % len(NAMES)], NAMES[(i + 3) % len(NAMES)]
        parts.append(f"{a} likes to eat burgers and fries. {b} works as a pilot in Lisbon. ")
        text = "".join(parts)
        if count(text) >= tokens:
            return text
        i += 1


async def _child(model: str, dp: int, repeats: int, tokens: int) -> dict:
    from atman_vllm.api import AsyncAtmanLLM
    from atman_vllm.core import ExplainOptions, ExplainRequest

    started = time.perf_counter()
    llm = AsyncAtmanLLM.from_engine_args(model, data_parallel_size=dp, enforce_eager=True, dtype="float32",
                                         max_model_len=512, block_size=32, kv_cache_memory_bytes=512 << 20)
    start_s = time.perf_counter() - started
    options = ExplainOptions(granularity="token")
    runs = []
    for k in range(repeats + 1):
        prompt = _prompt(lambda text: llm.prompt_tokens(ExplainRequest(text, "")), 100 * k + dp, tokens if k else tokens // 4)  # a short warm-up
        t = time.perf_counter()
        r = await llm.explain(ExplainRequest(prompt, " Lisbon.", options))
        wall = time.perf_counter() - t
        if k:  # the first is the warm-up
            runs.append({"wall_s": wall, "forks": r.stats.perturbations, "computed_tokens": r.stats.computed_tokens,
                         "cached_tokens": r.stats.cached_tokens, "prompt_tokens": llm.prompt_tokens(ExplainRequest(prompt, ""))})
    llm.shutdown()
    return {"engine_start_s": start_s, "runs": runs}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["demo", "llama26m"], default="demo")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--child", nargs=2, metavar=("MODEL", "DP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        out = asyncio.run(_child(args.child[0], int(args.child[1]), args.repeats, args.tokens))
        print("\nRESULT" + json.dumps(out))
        return
    model = _model(args.model)
    results = REPO / "benchmarks" / "results" / "scale_out.json"
    for name in args.configs:
        dp, bind = CONFIGS[name]
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_LOGGING_LEVEL": "WARNING"}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        load_before = os.getloadavg()
        proc = subprocess.run([sys.executable, __file__, "--child", model, str(dp), "--repeats", str(args.repeats),
                               "--tokens", str(args.tokens)], env=env, capture_output=True, text=True, timeout=1800)
        load_after = os.getloadavg()
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.rsplit("\nRESULT", 1)[1])
        walls = [r["wall_s"] for r in out["runs"]]
        forks = out["runs"][0]["forks"]
        row = {"config": name, "model": args.model, "data_parallel_size": dp, "bind": bind,
               "median_wall_s": statistics.median(walls), "walls_s": walls,
               "forks_per_s": forks / statistics.median(walls), "forks": forks,
               "prompt_tokens": out["runs"][0]["prompt_tokens"],
               "computed_tokens": out["runs"][0]["computed_tokens"], "cached_tokens": out["runs"][0]["cached_tokens"],
               "engine_start_s": out["engine_start_s"], "load_before": load_before, "load_after": load_after,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        print(json.dumps(row), flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
