#!/usr/bin/env python
"""Exact AtMan against its floor: stock vLLM prefilling the same fork shapes.

    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_floor.py \\
        --model smollm2-135m-instruct --lengths 128 256 --block-sizes 32

A fork perturbed at position p must recompute every position from p on, in
every layer; prefix caching serves the rest. Its floor is therefore what
stock vLLM pays to prefill the same new tokens after the same cached prefix.
This script measures exactly that, side by side:

- **atman**: ``AtmanLLM.run_jobs`` on the plan of a token-granularity
  explanation (the unperturbed run, then one fork per token), plugin on;
- **stock**: ``vllm.LLM`` with the plugin off (``VLLM_PLUGINS=""``), the same
  engine settings, the same unperturbed prompt first, then one request per
  fork whose tokens equal the prompt's up to the fork's first perturbed
  position and differ at it: the prefix cache serves exactly the blocks the
  fork's own request reuses, and the engine schedules the same new tokens
  against the same context lengths. Stock vLLM computes logits only for each
  request's last position; AtMan scores the target rows: the LM head is
  (almost) out of both.

So the ratio atman / stock is AtMan's overhead per computed token (the
perturbed-row attention recompute), independent of block rounding, which
both pay alike and which is reported apart: computed tokens against the
token floor Σ(L − pᵢ) + L. Each side runs in its own process (plugins are
per process) with the same threads; the minimum of ``--repeats`` runs
counts, in wall time and in the vLLM worker's CPU seconds (which moves far
less than wall time when other jobs share the machine). Writes
``benchmarks/results/floor.md`` and ``floor.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
TARGET_TOKENS = 4


class Timed:
    """Wall seconds and the vLLM worker's CPU seconds of a block (the worker does the model's work;
    its CPU time moves far less than wall time when other jobs share the machine)."""

    def __enter__(self):
        import psutil

        from process_tree import tree_cpu_seconds

        self._tree = lambda: tree_cpu_seconds(psutil.Process())
        self.tree0, self.t0 = self._tree(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.t0
        tree = self._tree()
        # Per process of the tree (front end, engine core, worker): where single-threaded time goes.
        self.cpu_by_process = {k: round(v - self.tree0.get(k, 0.0), 2) for k, v in tree.items()}
        self.worker_cpu_s = sum(v for k, v in self.cpu_by_process.items() if "Worker" in k)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a prepared model's name or a model dir")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[32])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--vllm-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND of both sides")
    p.add_argument("--kv-cache-mib", type=int, default=2048)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", choices=["atman", "stock"], help=argparse.SUPPRESS)
    p.add_argument("--worker-in", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def engine_kwargs(block_size: int, kv_cache_mib: int) -> dict:
    return dict(enforce_eager=True, dtype="float32", block_size=block_size, max_model_len=2048,
                kv_cache_memory_bytes=kv_cache_mib << 20, enable_prefix_caching=True)


def prompt_ids(model: str, length: int) -> list[int]:
    """``length`` token ids of corpus text (BOS first); the last TARGET_TOKENS are the target."""
    from transformers import AutoTokenizer

    from atman_vllm.models.corpus import tiny_corpus
    from atman_vllm.models.registry import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(model))
    ids = tok(" ".join(line for line in tiny_corpus() if line), add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    return bos + ids[: length - len(bos)]


# --- the two sides, each in its own process ------------------------------------------------


def run_atman(spec: dict) -> dict:
    from atman_vllm.api import AtmanLLM
    from atman_vllm.core.jobs import ForkJob, KeyBias
    from atman_vllm.core.options import Mode

    llm = AtmanLLM(spec["model"], **engine_kwargs(spec["block_size"], spec["kv_cache_mib"]))
    out = {}
    for length, ids in spec["prompts"].items():
        target_start = len(ids) - TARGET_TOKENS
        # Token granularity, factor 0.1, log-additive: one fork per prompt token after BOS.
        jobs = [ForkJob(tuple(ids), target_start)] + [
            ForkJob(tuple(ids), target_start, KeyBias((p,), (0.1,), Mode.LOG_ADDITIVE)) for p in range(1, target_start)]
        llm.run_jobs(jobs[:8])  # warm-up (other requests' shapes)
        runs, cpu, by_process = [], [], []
        for _ in range(spec["repeats"]):
            llm.llm.reset_prefix_cache()
            with Timed() as t:
                results = llm.run_jobs(jobs)
            runs.append(t.wall_s)
            cpu.append(t.worker_cpu_s)
            by_process.append(t.cpu_by_process)
        out[length] = {"wall_s": runs, "worker_cpu_s": cpu, "cpu_s_by_process": by_process,
                       "computed_tokens": sum(r.computed_tokens for r in results),
                       "first_positions": [j.bias.first_position for j in jobs[1:]], "forks": len(jobs) - 1}
    return out


def run_stock(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(spec["model_dir"], **engine_kwargs(spec["block_size"], spec["kv_cache_mib"]))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    out = {}
    for length, ids in spec["prompts"].items():
        firsts = spec["first_positions"][length]
        # Fork i's request: the prompt with another token at its first perturbed position.
        forks = [ids[:p] + [(ids[p] + 1) % vocab] + ids[p + 1:] for p in firsts]
        llm.generate([TokensPrompt(prompt_token_ids=f) for f in forks[:8]], params, use_tqdm=False)
        runs, cpu, by_process = [], [], []
        for _ in range(spec["repeats"]):
            llm.reset_prefix_cache()
            with Timed() as t:
                base = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
                outs = llm.generate([TokensPrompt(prompt_token_ids=f) for f in forks], params, use_tqdm=False)
            runs.append(t.wall_s)
            cpu.append(t.worker_cpu_s)
            by_process.append(t.cpu_by_process)
        computed = sum(len(o.prompt_token_ids) - (o.num_cached_tokens or 0) for o in base + outs)
        out[length] = {"wall_s": runs, "worker_cpu_s": cpu, "cpu_s_by_process": by_process, "computed_tokens": computed}
    return out


def worker_main(args) -> int:
    spec = json.loads(Path(args.worker_in).read_text())
    result = (run_atman if args.worker == "atman" else run_stock)(spec)
    Path(spec["out"]).write_text(json.dumps(result))
    # The result is written: skip interpreter teardown, where a C++ thread of the engine's
    # libraries was once destroyed still joinable ("terminate called without an active
    # exception", SIGABRT) after vLLM had shut down cleanly, failing a finished run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_side(side: str, spec: dict, run_dir: Path, bind: str) -> dict:
    spec = dict(spec, out=str(run_dir / f"{side}_{spec['block_size']}.json"))
    spec_path = run_dir / f"{side}_{spec['block_size']}_in.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    if side == "stock":
        env["VLLM_PLUGINS"] = ""  # stock vLLM: the atman plugin is not loaded
    log = open(run_dir / f"{side}_{spec['block_size']}.log", "w")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--worker", side, "--worker-in", str(spec_path)], env=env,
                   stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"[floor] {side} block {spec['block_size']} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(Path(spec["out"]).read_text())


def render(report: dict) -> str:
    lines = [
        "# Exact AtMan against its floor (stock vLLM prefill of the same fork shapes)",
        "",
        f"Model `{report['model']}`; fp32, enforce_eager, prefix caching on, token units (one fork per "
        f"prompt token, factor 0.1, log-additive), {TARGET_TOKENS} target tokens, "
        f"`VLLM_CPU_OMP_THREADS_BIND={report['bind']}`; each time the minimum of {report['repeats']} runs "
        f"(prefix cache reset before each). 1-min load average during the run: {report['load']}. "
        "Regenerate: `benchmarks/vllm_path/bench_floor.py` (see its docstring).",
        "",
        "| L | block | forks | token floor Σ(L − pᵢ) + L | computed (atman) | computed (stock) | block rounding | "
        "atman s | stock (floor) s | atman / floor (wall) | worker CPU s atman / stock | atman / floor (CPU) | "
        "atman ms per computed token | stock ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['length']} | {row['block_size']} | {row['forks']} | {row['token_floor']:,} | "
            f"{row['atman_computed']:,} | {row['stock_computed']:,} | {row['atman_computed'] / row['token_floor']:.3f}× | "
            f"{row['atman_s']:.2f} | {row['stock_s']:.2f} | **{row['atman_s'] / row['stock_s']:.2f}×** | "
            f"{row['atman_cpu_s']:.1f} / {row['stock_cpu_s']:.1f} | **{row['atman_cpu_s'] / row['stock_cpu_s']:.2f}×** | "
            f"{1e3 * row['atman_s'] / row['atman_computed']:.3f} | {1e3 * row['stock_s'] / row['stock_computed']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    from atman_vllm.models.registry import resolve_model

    model_dir = resolve_model(args.model)
    run_dir = Path(f"/tmp/atman-vllm-bench/floor-{int(time.time())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts = {str(length): prompt_ids(args.model, length) for length in args.lengths}
    rows, loads = [], []
    for block_size in args.block_sizes:
        spec = dict(model=args.model, model_dir=model_dir, block_size=block_size, kv_cache_mib=args.kv_cache_mib,
                    repeats=args.repeats, prompts=prompts)
        atman = run_side("atman", spec, run_dir, args.vllm_bind)
        loads.append(os.getloadavg()[0])
        stock = run_side("stock", dict(spec, first_positions={k: v["first_positions"] for k, v in atman.items()}),
                         run_dir, args.vllm_bind)
        loads.append(os.getloadavg()[0])
        for length in map(str, args.lengths):
            a, s, n = atman[length], stock[length], len(prompts[length])
            floor = sum(n - p for p in a["first_positions"]) + n
            rows.append(dict(length=n, block_size=block_size, forks=a["forks"], token_floor=floor,
                             atman_computed=a["computed_tokens"], stock_computed=s["computed_tokens"],
                             atman_s=min(a["wall_s"]), stock_s=min(s["wall_s"]),
                             atman_cpu_s=min(a["worker_cpu_s"]), stock_cpu_s=min(s["worker_cpu_s"]),
                             atman_runs=a["wall_s"], stock_runs=s["wall_s"]))
    report = dict(model=args.model, bind=args.vllm_bind, repeats=args.repeats,
                  load=" / ".join(f"{x:.1f}" for x in loads), rows=rows)
    text = render(report)
    print(text)
    if not args.no_write:
        out = Path(args.out_dir)
        (out / "floor.json").write_text(json.dumps(report, indent=1))
        (out / "floor.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
