#!/usr/bin/env python
"""Peak memory of an explanation against plain generation at the same length, on realistic models.

    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_memory.py             # ~10 min on 2 shared cores
    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_memory.py --models llama-32k --no-write

For each model and mode a fresh process starts ``AtmanLLM`` with the same engine settings
(float32, eager, block 32, the 1 GiB CPU-default KV cache, ``max_model_len`` 1,024), warms up
both paths identically (a short explanation and a short generation), and then measures, with
``process_tree.TreeSampler`` (RSS of the process and its engine children, sampled every
50 ms), one of:

- **generate**: greedy generation of 64 tokens after the document prompt (``--length`` tokens);
- **generate-batch**: as many such generations at once (other documents) as fill one engine step
  (``max_num_batched_tokens`` // length): the step size an explanation's forks reach;
- **explain**: a token-unit explanation of a one-word target after the same prompt; the whole
  plan is built (every fork's bias), and the unperturbed pass plus ``--forks`` evenly spaced
  forks run (all forks take ~6 min on SmolLM2 here; the forks in flight per engine step, which
  set the per-step buffers, are as many as in the full run).

Models: ``smollm2-135m-instruct`` (the prepared checkpoint) and ``llama-32k``, a random Llama
(hidden 512, 8 layers, vocab 32,000) built by ``atman_vllm.models.factory``. The goal: explain
peak ≤ 1.15× the generation peak. Writes ``benchmarks/results/memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
MIB = 1 << 20
GOAL = 1.15
GEN_TOKENS = 64
# 4,096 positions: RoPE and random weights, so the number only bounds max_model_len (bench_explain explains
# 2,048-token contexts, which need one position more).
LLAMA_32K = dict(vocab_size=32000, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, max_position=4096)
MODELS = ("smollm2-135m-instruct", "llama-32k")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--forks", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-num-batched-tokens", type=int, help="the engine's step size (default: vLLM's)")
    p.add_argument("--modes", nargs="+", default=["generate", "generate-batch", "explain"])
    p.add_argument("--llama-dir", default="/tmp/atman-vllm-bench/llama-32k")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_llama_32k(out_dir: str) -> str:
    """A random Llama with a 32,000-row embedding and LM head. The factory's tokenizer is trained on
    its small built-in corpus (1,251 tokens at most), so the model is built from the factory's
    spec and the tokenizer of a 1,024-token build is padded with unused tokens up to 32,000 (the
    two vocabularies must match; the padding is never produced by the text used here)."""
    from transformers import AutoTokenizer

    from atman_vllm.models.factory import TinyModelSpec, _build_model, build_tiny_model

    out = Path(out_dir)
    if (out / "atman_bench_done").exists():
        return str(out)
    base = build_tiny_model("llama", out.parent / "llama-1k-tokenizer", seed=0)
    out.mkdir(parents=True, exist_ok=True)
    spec = LLAMA_32K
    _build_model(TinyModelSpec("llama", 0, spec["vocab_size"], spec["hidden"], spec["layers"], spec["heads"],
                               spec["kv_heads"], spec["head_dim"], 3 * spec["hidden"], spec["max_position"]), out)
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens([f"<unused_{i}>" for i in range(spec["vocab_size"] - len(tok))])
    assert len(tok) == spec["vocab_size"], len(tok)
    tok.save_pretrained(str(out))
    (out / "atman_bench_done").write_text("ok\n")
    return str(out)


def model_dir(name: str, args) -> str:
    if name == "llama-32k":
        return build_llama_32k(args.llama_dir)
    from atman_vllm.models.registry import resolve_model

    return resolve_model(name)


def worker(args) -> int:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from atman_vllm.api import AtmanLLM
    from atman_vllm.core import ExplainOptions, ExplainRequest
    from bench_many_questions import document_and_questions
    from process_tree import TreeSampler

    name, mode = args.worker
    path = model_dir(name, args)
    sampler = TreeSampler()
    step = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = AtmanLLM(path, enforce_eager=True, dtype="float32", block_size=32, max_model_len=1024, **step)
    tok = llm.tokenizer.tok
    # The same warm-up in both modes: each path's first call allocates what later calls reuse.
    warm = document_and_questions(tok, 64, 1, seed=1)[1][0]
    llm.explain(warm[0], warm[1], granularity="sentence")
    gen = SamplingParams(max_tokens=GEN_TOKENS, temperature=0.0, ignore_eos=True)
    llm.llm.generate([TokensPrompt(prompt_token_ids=list(tok(warm[0])["input_ids"]))], gen, use_tqdm=False)
    llm.llm.reset_prefix_cache()
    time.sleep(1.0)
    idle = sampler.current_rss()
    _, questions = document_and_questions(tok, args.length, 1)
    prompt, target = questions[0]
    record = {"model": name, "mode": mode, "idle_rss": idle}
    with sampler.window() as win:
        if mode == "generate":
            out = llm.llm.generate([TokensPrompt(prompt_token_ids=list(tok(prompt)["input_ids"]))], gen,
                                   use_tqdm=False)
            record["prompt_tokens"] = len(out[0].prompt_token_ids)
            record["computed_tokens"] = len(out[0].prompt_token_ids) + GEN_TOKENS - 1
        elif mode == "generate-batch":
            # As many generations of this length (other documents: no cache hits) as fill one engine
            # step: the step size an explanation's forks reach.
            n = max(1, llm.vllm_config.scheduler_config.max_num_batched_tokens // args.length)
            prompts = [TokensPrompt(prompt_token_ids=list(tok(document_and_questions(tok, args.length, 1, seed=10 + k)
                                                              [1][0][0])["input_ids"])) for k in range(n)]
            out = llm.llm.generate(prompts, [gen] * n, use_tqdm=False)
            record.update(prompt_tokens=len(out[0].prompt_token_ids), generations=n,
                          computed_tokens=sum(len(o.prompt_token_ids) + GEN_TOKENS - 1 for o in out))
        else:
            plan = llm.plan(ExplainRequest(prompt, target, ExplainOptions(granularity="token")))
            forks = plan.jobs[1:]
            step = max(1, len(forks) // args.forks)
            jobs = [plan.jobs[0], *forks[::step][:args.forks]]
            results = llm.run_jobs(jobs)
            record.update(prompt_tokens=plan.encoded.target_start, sequence_tokens=plan.num_tokens,
                          units=plan.num_units, forks_run=len(jobs) - 1,
                          computed_tokens=sum(r.computed_tokens for r in results))
    record.update(peak_rss=win.peak_rss, start_rss=win.start_rss, wall_s=win.wall_s, load_1m=win.load_1m,
                  growth_by_process={k.split(" ", 1)[1]: v - win.start_rss_by_process.get(k, 0)
                                     for k, v in win.peak_rss_by_process.items()})
    cache = llm.vllm_config.cache_config
    sched = llm.vllm_config.scheduler_config
    record.update(kv_cache_bytes=int(cache.kv_cache_memory_bytes or 0), max_num_batched_tokens=sched.max_num_batched_tokens,
                  max_num_seqs=sched.max_num_seqs)
    sampler.close()
    Path(args.worker_out).write_text(json.dumps(record, indent=1))
    llm.shutdown()
    return 0


def markdown(report: dict) -> str:
    lines = ["# Memory: explanation vs plain generation", "",
             f"Run {report['date']} ({report['threads']} threads on a 2-core machine shared with other jobs). "
             "Generated by `benchmarks/vllm_path/bench_memory.py`. Each row is a fresh process tree (front end "
             "+ engine core + worker) with the same engine settings (float32, eager, block 32, 1 GiB KV cache "
             "allocated up front, max_model_len 1,024) after the same warm-up; peak RSS sampled every 50 ms "
             "(shared pages count once per process). Goal: explain peak ≤ "
             f"{GOAL}× generation peak at the same length.", "",
             "| model | prompt tokens | mode | idle MiB | peak MiB | peak above idle MiB (each process's own growth) | explain peak / this peak |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for m in report["models"]:
        e = m["explain"]
        for mode in ("generate", "generate-batch", "explain"):
            r = m[mode]
            label = {"generate": "generate (one prompt)",
                     "generate-batch": f"generate ({r.get('generations', '?')} prompts at once: one full step)",
                     "explain": f"explain (token units, {e.get('forks_run', '?')} of {e.get('units', '?')} forks run)"}[mode]
            ratio = e["peak_rss"] / r["peak_rss"]
            growth = ", ".join(f"{k} {v / MIB:+,.0f}" for k, v in r.get("growth_by_process", {}).items())
            lines.append(f"| {m['model']} | {r['prompt_tokens']} | {label} | {r['idle_rss'] / MIB:,.0f} | "
                         f"{r['peak_rss'] / MIB:,.0f} | {(r['peak_rss'] - r['idle_rss']) / MIB:,.0f} ({growth}) | "
                         f"{'**' if mode == 'generate' else ''}{ratio:.3f}{'**' if mode == 'generate' else ''} |")
    m0 = report["models"][0]["explain"]
    lines += ["", f"Engine step: at most {m0['max_num_batched_tokens']} tokens, {m0['max_num_seqs']} sequences "
                  "(vLLM's CPU defaults)."]
    lines += ["", report.get("notes", ""), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    models = []
    for name in args.models:
        rec = {"model": name}
        for mode in args.modes:
            out = Path(f"/tmp/atman-memory-{name}-{mode}.json")
            cmd = [sys.executable, __file__, "--worker", name, mode, "--worker-out", str(out), "--length",
                   str(args.length), "--forks", str(args.forks), "--threads", str(args.threads),
                   "--llama-dir", args.llama_dir]
            if args.max_num_batched_tokens:
                cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
            print("running", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=env, cwd=REPO)
            rec[mode] = json.loads(out.read_text())
            print(json.dumps(rec[mode]), flush=True)
        models.append(rec)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "threads": args.threads, "length": args.length, "models": models}
    text = markdown(report)
    if args.no_write:
        print(text)
    else:
        Path(args.out_dir, "memory.json").write_text(json.dumps(report, indent=1))
        Path(args.out_dir, "memory.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
