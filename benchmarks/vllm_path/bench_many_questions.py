#!/usr/bin/env python
"""Many questions over one document: what the second and later questions cost against the first.

    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_many_questions.py           # both models, ~10 min
    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_many_questions.py --models demo --no-write

A document of about 512 tokens (facts of the demo task, "Otto lives in Lisbon.", as many as fit)
is followed by one of several questions ("{document} Q: Where does Otto live? A:", target
" Lisbon"). Per model, each in a process of its own with the engine's CPU defaults (float32,
block 32, 1 GiB KV cache), eager, prefix caching on:

- **first**: the first question alone, from an empty prefix cache;
- **across calls**: right after it, each later question in a call of its own;
- **one call**: from an empty prefix cache, ``explain_many`` of all questions; a later
  question's computed tokens are its own (engine-reported), its time the call's time above
  the first question's alone, shared out evenly.

Computed and cached tokens are deterministic; times are the minimum over ``--repeats``
(the machine's cores are shared: the load average is recorded). Models: ``demo`` (the
project's demo model, 3 layers, token units; copied with ``max_position_embeddings`` 1,024
instead of 512 so a 512-token document and its question fit: RoPE has no weights) and
``smollm2-135m-instruct`` (30 layers; sentence units by default, token units cost
~6 minutes per cold question here). Writes ``benchmarks/results/many_questions.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEMO_DIR = REPO / "atman_vllm" / "models" / "default"
GRANULARITY = {"demo": "token", "smollm2-135m-instruct": "sentence"}
GOAL = 0.25
NOTES = """### Reading the table

- A later question's forks compute only what follows the document's last whole block: the
  question, the target, and the block that holds both the document's end and the question's
  start (block-granular sharing, 32 tokens); its question units' forks add a few tokens each.
  Everything before comes from the prefix cache: the unperturbed blocks, and the perturbed
  document blocks the first question's fork of the same unit computed (docs/design.md, "Many
  questions, one document").
- Time falls less than tokens: every fork still costs a request's fixed overhead (planning its
  bias, admission, scheduling, one sampled token), ~7 ms per fork on the demo model here, which
  dominates when a fork computes ~10 tokens.
- *One call* is what `explain_many` adds to the first question alone; on this shared machine that
  difference is within the noise of the first question's own time (it can come out negative,
  shown as 0), so the across-calls rows are the better time estimate; the tokens of both are exact.
- Across calls the first question's fork blocks must still be cached: ~n·L/2 tokens of KV. That
  fits the 1 GiB default for the demo model's token units (3 KiB/token, 10,922 blocks). It does
  **not** fit for SmolLM2 even with sentence units: 1 GiB holds 728 blocks (23 k tokens at 45 KiB
  per token) and the first question's forks wrote ~26 k tokens, so LRU evicted the document blocks
  before the next call (0.98× the first's tokens). In one call the forks of one unit run side by
  side and the later questions compute 0.035× the first's tokens. Across calls on SmolLM2 needs a
  KV cache above ~n·L/2 tokens (`kv_cache_memory_bytes`).
- Token counts are deterministic except for a few blocks when two forks of one unit land in the
  same engine step (the first question's count in one call: 25,843 or 25,875 between repeats)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(GRANULARITY), choices=list(GRANULARITY))
    p.add_argument("--granularity", help="override the per-model unit granularity")
    p.add_argument("--doc-tokens", type=int, default=512)
    p.add_argument("--questions", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kv-cache-mib", type=int, default=None, help="default: the engine's CPU default (1 GiB)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def document_and_questions(tokenizer, doc_tokens: int, n_questions: int, seed: int = 0):
    """Facts appended while the document stays within ``doc_tokens`` tokens; questions on facts spread over it."""
    from atman_vllm.quality.tasks import generate_document

    rng = random.Random(seed)
    facts = []
    while True:
        more = list(generate_document(rng, 16).facts)
        while more:
            text = " ".join(f.sentence for f in (*facts, more[0]))
            if len(tokenizer(text)["input_ids"]) > doc_tokens:
                break
            facts.append(more.pop(0))
        if more:
            break
    document = " ".join(f.sentence for f in facts)
    # Questions about facts spread over the document, each about a fact no other question asks for.
    picks = [round((k + 0.5) * len(facts) / n_questions) for k in range(n_questions)]
    questions = [(f"{document} Q: {facts[i].relation.ask_value.format(e=facts[i].entity)} A:", f" {facts[i].value}")
                 for i in picks]
    return document, questions


def demo_with_longer_positions(positions: int = 1024) -> str:
    """The demo model with room for 1,024 positions (it was trained with 512; RoPE has no weights, so
    only the config changes; vLLM sizes its rotary table from it)."""
    import shutil

    out = Path(f"/tmp/atman-demo-{positions}")
    out.mkdir(exist_ok=True)
    for f in DEMO_DIR.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, out / f.name)
    config = json.loads((DEMO_DIR / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return str(out)


def stats(result) -> dict:
    s = result.stats
    return {"computed_tokens": s.computed_tokens, "cached_tokens": s.cached_tokens,
            "forward_passes": s.forward_passes}


def worker(args) -> int:
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    model = demo_with_longer_positions() if args.worker == "demo" else args.worker
    from atman_vllm.api import AtmanLLM
    from atman_vllm.core import ExplainOptions, ExplainRequest

    engine = dict(enforce_eager=True, dtype="float32", max_model_len=1024)
    if args.kv_cache_mib:
        engine["kv_cache_memory_bytes"] = args.kv_cache_mib << 20
    t0 = time.perf_counter()
    llm = AtmanLLM(model, **engine)
    startup_s = time.perf_counter() - t0
    granularity = args.granularity or GRANULARITY[args.worker]
    document, questions = document_and_questions(llm.tokenizer.tok, args.doc_tokens, args.questions)
    options = ExplainOptions(granularity=granularity)
    requests = [ExplainRequest(p, t, options) for p, t in questions]
    doc_len = len(llm.tokenizer.tok(document)["input_ids"])
    plans = [llm.plan(r) for r in requests]

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    def explain(r):
        return llm.explain(r.prompt, r.target, r.options)

    explain(requests[0])  # warm-up (first forward passes, allocator)
    runs = []
    for _ in range(args.repeats):
        llm.llm.reset_prefix_cache()
        first, first_s = timed(lambda: explain(requests[0]))
        later = [timed(lambda r=r: explain(r)) for r in requests[1:]]
        llm.llm.reset_prefix_cache()
        many, many_s = timed(lambda: llm.explain_many(requests))
        runs.append({"first": {**stats(first), "wall_s": first_s},
                     "across_calls": [{**stats(r), "wall_s": s} for r, s in later],
                     "one_call": {"wall_s": many_s, "requests": [stats(r) for r in many]}})
    cache = llm.vllm_config.cache_config
    record = {
        "model": args.worker, "granularity": granularity, "document_tokens": doc_len,
        "sequence_tokens": [p.num_tokens for p in plans], "units": [p.num_units for p in plans],
        "questions": [q[len(document):] + t for q, t in questions],
        "block_size": cache.block_size, "kv_cache_bytes": int(cache.kv_cache_memory_bytes or 0),
        "num_kv_blocks": int(cache.num_gpu_blocks or 0), "startup_s": startup_s, "runs": runs,
        "load_avg_end": os.getloadavg(),
    }
    Path(args.worker_out).write_text(json.dumps(record, indent=1))
    llm.shutdown()
    return 0


def summarize(record: dict) -> dict:
    runs = record["runs"]
    first_s = min(r["first"]["wall_s"] for r in runs)
    first_tokens = runs[0]["first"]["computed_tokens"]
    n_later = len(runs[0]["across_calls"])
    across = [{"computed_tokens": runs[0]["across_calls"][k]["computed_tokens"],
               "cached_tokens": runs[0]["across_calls"][k]["cached_tokens"],
               "wall_s": min(r["across_calls"][k]["wall_s"] for r in runs)} for k in range(n_later)]
    many_s = min(r["one_call"]["wall_s"] for r in runs)
    one_call = runs[0]["one_call"]["requests"]
    marginal_s = max(0.0, many_s - first_s) / max(1, n_later)
    deterministic = all(r["first"]["computed_tokens"] == first_tokens
                        and [a["computed_tokens"] for a in r["across_calls"]] == [a["computed_tokens"] for a in across]
                        and r["one_call"]["requests"] == one_call for r in runs)
    return {
        "first": {"computed_tokens": first_tokens, "cached_tokens": runs[0]["first"]["cached_tokens"], "wall_s": first_s},
        "across_calls": [{**a, "token_ratio": a["computed_tokens"] / first_tokens, "time_ratio": a["wall_s"] / first_s}
                         for a in across],
        "one_call": {"wall_s": many_s, "marginal_s": marginal_s, "time_ratio": marginal_s / first_s,
                     "first_request": one_call[0],
                     "later": [{**q, "token_ratio": q["computed_tokens"] / first_tokens} for q in one_call[1:]]},
        "tokens_same_in_every_repeat": deterministic,
    }


def ordinal(k: int) -> str:
    return f"{k}{'nd' if k == 2 else 'rd' if k == 3 else 'th'}"


def markdown(report: dict) -> str:
    lines = ["# Many questions, one document", "",
             f"Run {report['date']} on {report['machine']} ({report['threads']} threads; load average at the end "
             f"of each model's run in the table: the cores are shared with other jobs, so times are noisy; "
             f"tokens are deterministic). Generated by `benchmarks/vllm_path/bench_many_questions.py`; goal: "
             f"a later question costs ≤ {GOAL}× the first at 512 document tokens.", "",
             "Each question is `{document} Q: {question} A:` with a one-word target; the engine runs with the "
             "CPU defaults (float32, block 32, 1 GiB KV cache unless said), eager. *first*: the first question "
             "alone from an empty prefix cache; *across calls*: each later question in its own call right after "
             "it; *one call*: `explain_many` of all questions from an empty cache (a later question's time is "
             "the call's time above the first question's alone, shared out evenly). Times: minimum of "
             f"{report['repeats']} repeats.", ""]
    for rec in report["records"]:
        s = rec["summary"]
        kv = rec["kv_cache_bytes"] / 2**20
        lines += [f"## {rec['model']} — {rec['granularity']} units, {rec['document_tokens']} document tokens",
                  "",
                  f"{rec['units'][0]} units per question, {rec['sequence_tokens'][0]} tokens per sequence; KV cache "
                  f"{kv:.0f} MiB ({rec['num_kv_blocks']} blocks of {rec['block_size']}); load average at the end "
                  f"(1/5/15 min) {' / '.join(f'{x:.1f}' for x in rec['load_avg_end'])}.", "",
                  "| question | computed tokens | cached tokens | × first (tokens) | time (s) | × first (time) |",
                  "|---|---:|---:|---:|---:|---:|"]
        f = s["first"]
        lines.append(f"| 1st, alone (cold) | {f['computed_tokens']:,} | {f['cached_tokens']:,} | 1 | {f['wall_s']:.2f} | 1 |")
        for k, a in enumerate(s["across_calls"], start=2):
            lines.append(f"| {ordinal(k)}, next call | {a['computed_tokens']:,} | {a['cached_tokens']:,} | "
                         f"{a['token_ratio']:.3f} | {a['wall_s']:.2f} | {a['time_ratio']:.3f} |")
        o = s["one_call"]
        lines.append(f"| 1st, in one call | {o['first_request']['computed_tokens']:,} | "
                     f"{o['first_request']['cached_tokens']:,} | – | – | – |")
        for k, q in enumerate(o["later"], start=2):
            lines.append(f"| {ordinal(k)}, in one call | {q['computed_tokens']:,} | {q['cached_tokens']:,} | "
                         f"{q['token_ratio']:.3f} | {o['marginal_s']:.2f} (marginal) | {o['time_ratio']:.3f} |")
        lines += ["", f"One call of all {len(o['later']) + 1} questions: {o['wall_s']:.2f} s. "
                      f"Tokens identical in every repeat: {s['tokens_same_in_every_repeat']}.", ""]
    lines += [report.get("notes", ""), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    records = []
    out_dir = Path(args.out_dir)
    for model in args.models:
        out = Path(f"/tmp/atman-many-questions-{model}.json")
        cmd = [sys.executable, __file__, "--worker", model, "--worker-out", str(out),
               "--doc-tokens", str(args.doc_tokens), "--questions", str(args.questions),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        if args.granularity:
            cmd += ["--granularity", args.granularity]
        if args.kv_cache_mib:
            cmd += ["--kv-cache-mib", str(args.kv_cache_mib)]
        # The worker and vLLM's engine processes import this checkout's atman_vllm (its plugin too).
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        print("running", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        rec = json.loads(out.read_text())
        rec["summary"] = summarize(rec)
        print(json.dumps(rec["summary"], indent=1), flush=True)
        records.append(rec)
    report = {"notes": NOTES, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{os.cpu_count()} CPUs", "threads": args.threads, "repeats": args.repeats,
              "records": records}
    if not args.no_write:
        (out_dir / "many_questions.json").write_text(json.dumps(report, indent=1))
        (out_dir / "many_questions.md").write_text(markdown(report))
    else:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
