"""Regenerate benchmarks/results/quality.md: explanation quality on the facts task.

    nice -n 10 .venv/bin/python benchmarks/quality/run_quality.py            # 200 examples, ~10 min on 2 cores
    .venv/bin/python benchmarks/quality/run_quality.py --n 50 --quick        # fewer methods, a smoke run

AtMan runs through the vLLM engine (``AtmanLLM``, in-process, float32, eager,
32-token blocks); the baselines on plain transformers with the same model and
examples. The plain-transformers AtMan (``ReferenceExplainer``) is run once for
the default variant as a cross-check and its largest score difference reported.
Raw results (JSON, per-example HTML) go to benchmarks/quality/output/.
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
RESULTS = ROOT / "benchmarks" / "results" / "quality.md"
OUTPUT = ROOT / "benchmarks" / "quality" / "output"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=None, help="facts-task seed (default: the eval CLI's)")
    p.add_argument("--quick", action="store_true", help="only atman, grad-x-input, attention-rollout, random")
    p.add_argument("--no-reference-check", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for the baselines (1: on a shared 2-core machine more threads is slower)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--output", type=Path, default=OUTPUT)
    args = p.parse_args(argv)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from atman_vllm.quality.cli import EVAL_SEED
    from atman_vllm.quality.harness import (
        DEFAULT_MODEL_DIR, METHODS, VLLM_ENGINE_ARGS, evaluate, markdown_report, write_outputs,
    )
    from atman_vllm.quality.tasks import generate_examples

    seed = EVAL_SEED if args.seed is None else args.seed
    methods = ["atman", "grad-x-input", "attention-rollout", "random"] if args.quick else list(METHODS)
    examples = generate_examples(args.n, seed=seed)
    started = time.time()
    report = evaluate(examples, model_dir=DEFAULT_MODEL_DIR, methods=methods, backend="vllm", seed=seed,
                      data_name="facts (generated)", threads=args.threads)
    elapsed = time.time() - started
    paths = write_outputs(report, args.output)

    check = None
    if not args.no_reference_check:
        ref = evaluate(examples, model_dir=DEFAULT_MODEL_DIR, methods=["atman"], backend="reference", seed=seed,
                       progress=False, threads=args.threads)
        diffs = [float(np.max(np.abs(a - b))) if len(a) else 0.0
                 for g in ("token", "sentence")
                 for a, b in zip(report.unit_scores[("atman", g)], ref.unit_scores[("atman", g)])]
        scale = max(float(np.max(np.abs(s))) for g in ("token", "sentence")
                    for s in ref.unit_scores[("atman", g)] if len(s))
        ref_rows = {r.granularity: r for r in ref.rows}
        check = {"max_abs_diff": max(diffs), "max_abs_score": scale,
                 "reference_mAP": {g: ref_rows[g].summary.mAP for g in ref_rows},
                 "reference_wall_s_per_example": {g: ref_rows[g].cost["wall_s_per_example"] for g in ref_rows}}
        (args.output / "reference_check.json").write_text(json.dumps(check, indent=1) + "\n")

    training = json.loads((DEFAULT_MODEL_DIR / "training_report.json").read_text())
    lines = [
        "# Explanation quality on the facts task",
        "",
        "Regenerate: `nice -n 10 .venv/bin/python benchmarks/quality/run_quality.py` "
        f"(this run: {elapsed / 60:.1f} min). Method, task, model, metrics and what the numbers say:"
        " docs/quality.md.",
        "",
        f"- data: {args.n} generated documents (seed {seed}), 3-8 facts each, one question per document asking for a value (\"Where does Otto live?\");"
        " evidence = the fact sentence the answer is copied from",
        f"- model: the shipped demo model (`atman_vllm/models/default`, {training['parameters']:,} parameters,"
        f" held-out exact match {training['held_out_exact_match']:.3f},"
        f" {training['evidence_removed_exact_match']:.3f} with the evidence sentence removed)",
        "- AtMan: vLLM engine in-process (" + ", ".join(f"{k}={v}" for k, v in VLLM_ENGINE_ARGS.items())
        + "), factor 0.1, target granularity complete; `-kappa`: correlated suppression at kappa 0.6;"
        " `-mult`: multiplicative mode",
        "- ranked units: the context's tokens (token) or sentences (sentence); positives overlap the evidence",
        "- mAR: mean recall@k with k = number of positive units; IQM: mean of the middle half",
        "- fwd/bwd: forward/backward passes per example (one sequence each); wall: seconds per example on"
        f" this machine ({platform.machine()}, {os.cpu_count()} cores shared with other jobs, so timings are"
        " indicative); peak MiB: resident memory above the level before the method ran (VmHWM − VmRSS)",
        "",
        markdown_report(report).split("\n", 2)[2].strip(),
        "",
    ]
    if check is not None:
        lines += [
            "## vLLM path vs plain-transformers reference",
            "",
            f"Largest |score difference| over all units, examples and both granularities for `atman`:"
            f" {check['max_abs_diff']:.2e} (largest |score| {check['max_abs_score']:.3f}).",
            "",
        ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.results} and {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
