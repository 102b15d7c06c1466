"""Hierarchical vs exhaustive AtMan search: forward passes and mAP at growing context lengths.

Task: the demo facts task (atman_vllm/quality/tasks.py), with documents made
longer by more paragraphs of facts: the question's document is one paragraph,
placed at a random position among filler paragraphs (other generated
documents, with every fact about the question's person or mentioning its
answer removed, so the answer stays unambiguous). Units: tokens. mAP: the
harness's (metrics.score_example) over the context's units: a unit is
positive when it overlaps the evidence sentence.

Backend: AtmanLLM (vLLM with prefix caching), the demo model. The demo model
has 512 positions: a document overshoots its length by up to one filler
paragraph, so lengths above ~420 risk a prompt past 512 tokens (with
VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 such a prompt made the engine return a
non-finite score). Hierarchical is compared with exhaustive on the same model
and the same examples (benchmarks/results/hierarchical.md says what the
numbers can and cannot show).

    python benchmarks/quality/hierarchical.py --lengths 128 256 400 --examples 4 \
        --out benchmarks/results/hierarchical.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np

from atman_vllm.core import ExplainOptions, ExplainRequest
from atman_vllm.quality.harness import DEFAULT_MODEL_DIR
from atman_vllm.quality.metrics import score_example
from atman_vllm.quality.tasks import QAExample, generate_document


def long_example(rng: random.Random, tokenizer, min_tokens: int, sep: str = "\n\n") -> QAExample:
    """A question about one paragraph, among filler paragraphs, at least ``min_tokens`` prompt tokens."""
    doc = generate_document(rng, rng.randint(4, 8))
    index = rng.randrange(len(doc.facts))
    base = doc.question(index, rng.choice(("value", "entity")))
    fact = doc.facts[index]
    banned = (fact.entity, fact.value, base.answer)
    paragraphs = [doc.context]
    while True:
        prompt = sep.join(paragraphs) + f" Q: {base.question} A:"
        if len(tokenizer.encode(prompt)[0]) >= min_tokens:
            break
        filler = generate_document(rng, rng.randint(6, 10))
        kept = [f.sentence for f in filler.facts if not any(b in f.sentence for b in banned)]
        if kept:
            paragraphs.insert(rng.randint(0, len(paragraphs)), " ".join(kept))
    at = paragraphs.index(doc.context)
    start = sum(len(p) + len(sep) for p in paragraphs[:at]) + doc.span_of(index)[0]
    context = sep.join(paragraphs)
    ev = (start, start + len(fact.sentence))
    assert context[ev[0]:ev[1]] == fact.sentence
    return QAExample(context, base.question, base.answer, (ev,), base.qtype)


def ap_of(result, ex: QAExample) -> float | None:
    """AP over the context's units only (as the harness ranks them): the question's are left out."""
    scores = [u for u in result.explanations[0].prompt_scores if u.start + u.length <= len(ex.context)]
    s = score_example([(u.start, u.start + u.length) for u in scores], [u.score for u in scores],
                      ex.evidence_spans, ex.qtype)
    return None if s is None else s.ap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 400])
    p.add_argument("--examples", type=int, default=6, help="examples per length")
    p.add_argument("--budget-ratio", type=float, default=10.0, help="budget = exhaustive passes / this")
    p.add_argument("--granularity", default="token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sep", default="\n\n", help="between paragraphs (' ': no paragraph level)")
    p.add_argument("--out", default="benchmarks/results/hierarchical.md")
    args = p.parse_args()

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from atman_vllm.api import AtmanLLM

    max_len = 512  # the demo model's positions
    llm = AtmanLLM(str(DEFAULT_MODEL_DIR), enforce_eager=True, dtype="float32", block_size=32,
                   max_model_len=max_len, max_num_batched_tokens=max(2048, max_len),
                   kv_cache_memory_bytes=1 << 30)
    rng = random.Random(args.seed)
    rows, records = [], []
    for length in args.lengths:
        ex_ap, hi_ap, ex_passes, hi_passes, ex_s, hi_s, tokens, refined = [], [], [], [], [], [], [], []
        for _ in range(args.examples):
            ex = long_example(rng, llm.tokenizer, length, args.sep)
            opts = ExplainOptions(granularity=args.granularity)
            t0 = time.perf_counter()
            exhaustive = llm.explain_planned(ExplainRequest(ex.prompt, ex.target, opts))
            t1 = time.perf_counter()
            budget = max(2, math.floor(exhaustive.stats.forward_passes / args.budget_ratio))
            hier = llm.explain_planned(ExplainRequest(ex.prompt, ex.target, ExplainOptions(
                granularity=args.granularity, search="hierarchical", budget=budget)))
            t2 = time.perf_counter()
            a, b = ap_of(exhaustive, ex), ap_of(hier, ex)
            if a is None or b is None:
                continue
            ex_ap.append(a); hi_ap.append(b)
            ex_passes.append(exhaustive.stats.forward_passes); hi_passes.append(hier.stats.forward_passes)
            ex_s.append(t1 - t0); hi_s.append(t2 - t1)
            tokens.append(len(llm.tokenizer.encode(ex.prompt)[0]))
            sc = hier.explanations[0].prompt_scores
            refined.append(sum(s.refined for s in sc) / len(sc))
            records.append({"length": length, "tokens": tokens[-1], "budget": budget, "ap_exhaustive": a,
                            "ap_hierarchical": b, "passes_exhaustive": ex_passes[-1],
                            "passes_hierarchical": hi_passes[-1], "s_exhaustive": ex_s[-1], "s_hierarchical": hi_s[-1]})
            print(json.dumps(records[-1]), flush=True)
        m_ex, m_hi = float(np.mean(ex_ap)), float(np.mean(hi_ap))
        rows.append((length, len(ex_ap), float(np.mean(tokens)), float(np.mean(ex_passes)), float(np.mean(hi_passes)),
                     float(np.mean(ex_passes)) / float(np.mean(hi_passes)), m_ex, m_hi, m_hi / m_ex,
                     float(np.mean(refined)), float(np.sum(ex_s)), float(np.sum(hi_s))))

    lines = [
        "# Hierarchical search vs exhaustive AtMan",
        "",
        f"Produced by `benchmarks/quality/hierarchical.py --lengths {' '.join(map(str, args.lengths))} "
        f"--examples {args.examples} --budget-ratio {args.budget_ratio:g} --granularity {args.granularity}` "
        "(AtmanLLM, demo model, fp32, enforce_eager, block 32, CPU).",
        "",
        f"Task: demo facts, one question paragraph among filler paragraphs; {args.granularity} units; "
        f"budget = exhaustive passes / {args.budget_ratio:g}. mAP against the evidence sentence.",
        "",
        "| target tokens | examples | mean prompt tokens | exhaustive passes | hierarchical passes | fewer passes |"
        " exhaustive mAP | hierarchical mAP | ratio | units refined | exhaustive s | hierarchical s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.1f} | {r[5]:.1f}× | {r[6]:.3f} | "
                     f"{r[7]:.3f} | {r[8]:.1%} | {r[9]:.1%} | {r[10]:.1f} | {r[11]:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
