"""Regenerate benchmarks/results/quality_smollm2.md (+ .json): explanation quality on SmolLM2-135M-Instruct.

    nice -n 10 .venv/bin/python benchmarks/quality/run_quality_smollm2.py        # ~25 min on 2 shared cores
    .venv/bin/python benchmarks/quality/run_quality_smollm2.py --n 4 --n-token 2  # a smoke run

Two task families written as natural sentences by atman_vllm/quality/lm_tasks.py
(facts, day stories), asked as completions; of the generated documents only
those SmolLM2 answers greedily enter (the first ``--n`` per task). Sentence
units: every method on all kept examples. Token units: the first ``--n-token``
per task (AtMan at token units and token ablation cost a forward pass per token).
AtMan runs through the vLLM engine (``AtmanLLM``, in-process, float32), the
baselines on plain transformers, same model, same examples.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "quality_smollm2.md"
MODEL = "smollm2-135m-instruct"
SEED = 20_261_201
SENTENCE_BASELINES = ("contextcite", "contextcite-matched", "ablation-sentence", "integrated-gradients",
                      "grad-x-input", "attnlrp", "attention-last", "attention-rollout", "random")
TOKEN_BASELINES = ("ablation", "integrated-gradients", "grad-x-input", "attnlrp", "attention-last",
                   "attention-rollout", "random")
BOOTSTRAP = 2000


def bootstrap_ci(values: list[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean over examples."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (BOOTSTRAP, len(v)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=32, help="answered examples per task (sentence units)")
    p.add_argument("--n-token", type=int, default=8, help="of those, per task, at token units")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the baselines")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from atman_vllm.models.registry import resolve_model
    from atman_vllm.quality.baselines import CONTEXTCITE_ABLATIONS, HFModel
    from atman_vllm.quality.harness import ATMAN_VARIANTS, VLLM_ENGINE_ARGS, evaluate, load_explainer
    from atman_vllm.quality.lm_tasks import TASKS, keep_answered

    started = time.time()
    model_dir = resolve_model(MODEL)
    hf = HFModel(model_dir, threads=args.threads, ig_steps=args.ig_steps)
    selections = {}
    for i, (task, gen) in enumerate(TASKS.items()):
        selections[task] = keep_answered(hf, gen(3 * args.n, args.seed + i), args.n)
        if len(selections[task].examples) < args.n:
            raise SystemExit(f"{task}: only {len(selections[task].examples)} of {3 * args.n} candidates answered")
    explainer = load_explainer("vllm", model_dir)
    atman = list(ATMAN_VARIANTS)
    reports = {}
    for task, sel in selections.items():
        reports[(task, "sentence")] = evaluate(sel.examples, model_dir=model_dir, explainer=explainer, hf=hf,
                                               methods=atman + list(SENTENCE_BASELINES), granularities=["sentence"],
                                               seed=args.seed, data_name=task)
        reports[(task, "token")] = evaluate(sel.examples[:args.n_token], model_dir=model_dir, explainer=explainer,
                                            hf=hf, methods=atman + list(TOKEN_BASELINES), granularities=["token"],
                                            seed=args.seed, data_name=task)
    elapsed = time.time() - started

    # ---- pool the tasks per method
    def pooled(granularity: str):
        out = {}
        for (task, g), rep in reports.items():
            if g != granularity:
                continue
            for r in rep.rows:
                o = out.setdefault(r.method, {"ap": [], "recall": [], "answer_ap": [], "by_task": {}, "costs": []})
                aps = [e["ap"] for e in r.per_example if e["ap"] is not None]
                o["ap"] += aps
                o["recall"] += [e["recall"] for e in r.per_example if e["recall"] is not None]
                o["by_task"][task] = float(np.mean(aps))
                if r.answer_summary is not None:
                    o["answer_by_task"] = {**o.get("answer_by_task", {}), task: r.answer_summary.mAP}
                    o["answer_ap"].append((r.answer_summary.mAP, r.answer_summary.n))
                o["costs"].append(r.cost)
        table = {}
        for m, o in out.items():
            n = sum(c["examples"] for c in o["costs"])
            per = lambda k: sum(c[k] * c["examples"] for c in o["costs"]) / n  # noqa: E731
            from atman_vllm.quality.metrics import interquartile_mean

            table[m] = {
                "mAP": float(np.mean(o["ap"])), "mAP_ci95": bootstrap_ci(o["ap"]), "iqm_AP": interquartile_mean(o["ap"]),
                "mAR": float(np.mean(o["recall"])), "by_task": o["by_task"], "examples": n,
                "answer_mAP": (sum(a * k for a, k in o["answer_ap"]) / sum(k for _, k in o["answer_ap"])
                               if o["answer_ap"] else None),
                "forward_per_example": per("forward_passes_per_example"),
                "backward_per_example": per("backward_passes_per_example"),
                "wall_s_per_example": per("wall_s_per_example"),
                "peak_memory_mib": max(c["peak_memory_bytes"] for c in o["costs"]) / (1 << 20),
            }
        return table

    sentence, token = pooled("sentence"), pooled("token")

    # ---- the target, computed from the table
    best_atman = max(atman, key=lambda m: sentence[m]["mAP"])
    cc, ccm = sentence["contextcite"], sentence["contextcite-matched"]
    checks = {
        "best_atman_sentence": best_atman,
        "atman_ahead_of_ig": sentence[best_atman]["mAP"] > sentence["integrated-gradients"]["mAP"],
        "atman_ahead_of_gxi": sentence[best_atman]["mAP"] > sentence["grad-x-input"]["mAP"],
        "atman_minus_contextcite": sentence[best_atman]["mAP"] - cc["mAP"],
        "atman_minus_contextcite_matched": sentence[best_atman]["mAP"] - ccm["mAP"],
        "atman_forward_per_example": sentence[best_atman]["forward_per_example"],
        "contextcite_forward_per_example": cc["forward_per_example"],
    }

    data = {
        "model": MODEL, "model_dir": str(model_dir), "seed": args.seed, "ig_steps": args.ig_steps,
        "contextcite_ablations": CONTEXTCITE_ABLATIONS, "elapsed_s": elapsed,
        "engine": VLLM_ENGINE_ARGS, "selection": {t: s.to_dict() for t, s in selections.items()},
        "sentence": sentence, "token": token, "checks": checks,
        "environment": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads},
        "reports": {f"{t}/{g}": rep.to_dict() for (t, g), rep in reports.items()},
        "examples": {t: [e.to_dict() for e in s.examples] for t, s in selections.items()},
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.results.write_text(render(data, args) + "\n")
    print(f"wrote {args.results} and {args.results.with_suffix('.json')} in {elapsed / 60:.1f} min")
    return 0


def _f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


def render(data: dict, args) -> str:
    sel = data["selection"]
    tasks = list(sel)
    lines = [
        "# Explanation quality on SmolLM2-135M-Instruct",
        "",
        "Regenerate: `nice -n 10 .venv/bin/python benchmarks/quality/run_quality_smollm2.py` "
        f"(this run: {data['elapsed_s'] / 60:.1f} min on {data['environment']['cpu_count']} shared cores)."
        " Tasks, methods, metrics: docs/quality.md.",
        "",
        "- model: SmolLM2-135M-Instruct (`resolve_model(\"smollm2-135m-instruct\")`), float32;"
        " baselines on plain transformers (eager attention), AtMan through the vLLM engine (`AtmanLLM`,"
        " in-process, " + ", ".join(f"{k}={v}" for k, v in data["engine"].items()) + "), factor 0.1",
        "- tasks (atman_vllm/quality/lm_tasks.py), asked as completions; only documents the model answers"
        " greedily (every target token) are kept:",
    ]
    for t in tasks:
        s = sel[t]
        lines.append(f"  - `{t}`: {s['candidates']} generated, answered {s['accuracy']:.0%}, first {s['kept']} kept;"
                     f" with the evidence sentence cut out the kept ones are answered {s['accuracy_without_evidence']:.0%}")
    lines += [
        f"- sentence units: {args.n} examples per task; token units: the first {args.n_token} per task",
        f"- integrated gradients: {data['ig_steps']} steps; ContextCite: {data['contextcite_ablations']} ablations"
        " (`contextcite`) or as many as AtMan's forward passes on the example (`contextcite-matched`)",
        "- mAP 95% CI: bootstrap over examples; IQM: mean of the middle half of the APs;"
        " fwd/bwd: forward/backward passes (one sequence each) per example; s/ex: wall seconds per example;"
        " MiB: resident memory above the level before the method (VmHWM − VmRSS)",
        "",
        "## Sentence units (evidence = the sentence the answer is copied from)",
        "",
        "| method | mAP | 95% CI | " + " | ".join(f"{t} mAP" for t in tasks)
        + " | IQM AP | mAR | fwd/ex | bwd/ex | s/ex | peak MiB |",
        "|---|---:|---|" + "---:|" * (len(tasks) + 6),
    ]
    for m, r in sorted(data["sentence"].items(), key=lambda kv: -kv[1]["mAP"]):
        lines.append(f"| {m} | {_f(r['mAP'])} | {_f(r['mAP_ci95'][0])}–{_f(r['mAP_ci95'][1])} | "
                     + " | ".join(_f(r["by_task"].get(t)) for t in tasks)
                     + f" | {_f(r['iqm_AP'])} | {_f(r['mAR'])} | {r['forward_per_example']:.1f} | "
                     f"{r['backward_per_example']:.1f} | {r['wall_s_per_example']:.2f} | {r['peak_memory_mib']:.0f} |")
    lines += [
        "",
        "## Token units",
        "",
        "Sentence label: positives are the evidence sentence's tokens; answer label (the paper's): the answer's"
        " token(s) inside the evidence.",
        "",
        "| method | mAP, sentence label | 95% CI | mAP, answer label | fwd/ex | bwd/ex | s/ex | peak MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for m, r in sorted(data["token"].items(), key=lambda kv: -kv[1]["mAP"]):
        lines.append(f"| {m} | {_f(r['mAP'])} | {_f(r['mAP_ci95'][0])}–{_f(r['mAP_ci95'][1])} | {_f(r['answer_mAP'])} | "
                     f"{r['forward_per_example']:.1f} | {r['backward_per_example']:.1f} | "
                     f"{r['wall_s_per_example']:.2f} | {r['peak_memory_mib']:.0f} |")
    c = data["checks"]
    lines += [
        "",
        "## The issue's target (computed)",
        "",
        f"- best AtMan variant at sentence units: `{c['best_atman_sentence']}`",
        f"- ahead of integrated gradients: {c['atman_ahead_of_ig']}; ahead of grad × input: {c['atman_ahead_of_gxi']}",
        f"- minus ContextCite ({data['contextcite_ablations']} ablations): {c['atman_minus_contextcite']:+.3f} mAP"
        f" at {c['atman_forward_per_example']:.1f} vs {c['contextcite_forward_per_example']:.1f} forward passes per example",
        f"- minus ContextCite at AtMan's forward passes: {c['atman_minus_contextcite_matched']:+.3f} mAP",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
