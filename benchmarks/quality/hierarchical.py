"""Hierarchical vs exhaustive AtMan search: forward passes and mAP at growing context lengths.

Task ``--task facts`` (the demo model): the demo facts task
(atman_vllm/quality/tasks.py), with documents made longer by more paragraphs
of facts: the question's document is one paragraph, placed at a random
position among filler paragraphs (other generated documents, with every fact
about the question's person or mentioning its answer removed, so the answer
stays unambiguous). Task ``--task story`` (a real model, e.g. ``--model
smollm2-135m-instruct``): a day story of atman_vllm/quality/lm_tasks.py asked
as a completion, among filler paragraphs of facts about other people (lives
in / works as / owns a; sentences naming the story's person or holding its
answer removed); only documents the model answers (every target token
greedy, at full length) are kept. Units: tokens. mAP: the harness's
(metrics.score_example) over the context's units: a unit is positive when it
overlaps the evidence sentence (sentence label); ``ap_answer_*`` in the records
uses the paper's label (the answer's tokens inside the evidence).

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

from atman_vllm.core import ExplainOptions, ExplainRequest, encode_input
from atman_vllm.quality.harness import DEFAULT_MODEL_DIR
from atman_vllm.quality.metrics import score_example
from atman_vllm.quality.lm_tasks import LM_FACT_RELATIONS, STORY_PEOPLE, day_story_examples
from atman_vllm.quality.tasks import RELATIONS, QAExample, Relation, generate_document


def among_fillers(rng: random.Random, tokenizer, base: QAExample, banned: tuple[str, ...], min_tokens: int,
                  sep: str, relations: tuple[Relation, ...]) -> QAExample:
    """``base`` (its context one paragraph) at a random place among filler paragraphs of generated
    facts that hold none of ``banned``, until the prompt has at least ``min_tokens`` tokens."""
    paragraphs = [base.context]
    while len(tokenizer.encode(QAExample(sep.join(paragraphs), base.question, base.answer, (), base.qtype,
                                         base.form).prompt)[0]) < min_tokens:
        filler = generate_document(rng, rng.randint(6, 10), relations=relations)
        kept = [f.sentence for f in filler.facts if not any(b in f.sentence for b in banned)]
        if kept:
            paragraphs.insert(rng.randint(0, len(paragraphs)), " ".join(kept))
    at = paragraphs.index(base.context)
    shift = sum(len(p) + len(sep) for p in paragraphs[:at])
    context = sep.join(paragraphs)
    spans = tuple((s + shift, e + shift) for s, e in base.evidence_spans)
    assert [context[s:e] for s, e in spans] == base.evidence_text()
    return QAExample(context, base.question, base.answer, spans, base.qtype, base.form)


def facts_example(rng: random.Random, tokenizer, min_tokens: int, sep: str) -> QAExample:
    """A demo-task question about one facts paragraph, among filler paragraphs."""
    doc = generate_document(rng, rng.randint(4, 8))
    index = rng.randrange(len(doc.facts))
    base = doc.question(index, rng.choice(("value", "entity")))
    fact = doc.facts[index]
    return among_fillers(rng, tokenizer, base, (fact.entity, fact.value, base.answer), min_tokens, sep, RELATIONS)


def story_example(rng: random.Random, tokenizer, min_tokens: int, sep: str) -> QAExample:
    """A day story asked as a completion, among paragraphs of facts about other people (no
    "plays the" facts: the story's evening sentence says what its person played)."""
    base = day_story_examples(1, rng.randrange(1 << 30))[0]
    banned = (base.answer, *(name for name, _ in STORY_PEOPLE if name in base.context))
    return among_fillers(rng, tokenizer, base, banned, min_tokens, sep, LM_FACT_RELATIONS[:3])


TASKS = {"facts": facts_example, "story": story_example}


def ap_of(result, ex: QAExample, evidence) -> float | None:
    """AP over the context's units only (as the harness ranks them): the question's are left out."""
    scores = [u for u in result.explanations[0].prompt_scores if u.start + u.length <= len(ex.context)]
    s = score_example([(u.start, u.start + u.length) for u in scores], [u.score for u in scores],
                      evidence, ex.qtype)
    return None if s is None else s.ap


def answered(llm, ex: QAExample) -> bool:
    """Does the model complete the prompt with the target (every target token its greedy choice)?"""
    enc = encode_input(llm.tokenizer, ex.prompt, ex.target)
    want = tuple(enc.token_ids[enc.target_start:])
    return llm.generate_target_ids(ExplainRequest(ex.prompt, ""), len(want)) == want


def mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else float("nan")


def render(args, records: list[dict]) -> str:
    """The results table, one row per length, from the per-example records."""
    lines = [
        "# Hierarchical search vs exhaustive AtMan",
        "",
        f"Produced by `benchmarks/quality/hierarchical.py --model {args.model} --task {args.task} --lengths "
        f"{' '.join(map(str, args.lengths))} --examples {args.examples} --budget-ratio {args.budget_ratio:g} "
        f"--granularity {args.granularity} --seed {args.seed}` (AtmanLLM, fp32, enforce_eager, block 32, CPU; "
        "prefix cache reset before each search). Per-example records: the `.jsonl` beside this file.",
        "",
        f"Task: {args.task}, one question paragraph among filler paragraphs; {args.granularity} units; "
        f"budget = exhaustive passes / {args.budget_ratio:g}. mAP against the evidence sentence (sentence label) "
        "and against the answer's tokens in it (answer label, the paper's).",
        "",
        "| min prompt tokens | examples | mean prompt tokens | exhaustive passes | hierarchical passes | fewer passes |"
        " exhaustive mAP | hierarchical mAP | ratio | exhaustive mAP, answer label | hierarchical | ratio |"
        " units refined | exhaustive s (sum) | hierarchical s (sum) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length in sorted({r["length"] for r in records}):
        rs = [r for r in records if r["length"] == length]
        col = lambda k: [r.get(k) for r in rs]  # noqa: E731
        ex_p, hi_p = mean(col("passes_exhaustive")), mean(col("passes_hierarchical"))
        ex, hi = mean(col("ap_exhaustive")), mean(col("ap_hierarchical"))
        ax, ah = mean(col("ap_answer_exhaustive")), mean(col("ap_answer_hierarchical"))
        lines.append(f"| {length} | {len(rs)} | {mean(col('tokens')):.0f} | {ex_p:.0f} | {hi_p:.1f} | {ex_p / hi_p:.1f}× | "
                     f"{ex:.3f} | {hi:.3f} | {hi / ex:.1%} | {ax:.3f} | {ah:.3f} | {ah / ax:.1%} | "
                     f"{'–' if math.isnan(mean(col('refined'))) else format(mean(col('refined')), '.1%')} | {sum(col('s_exhaustive')):.1f} | {sum(col('s_hierarchical')):.1f} |")
    return "\n".join(lines) + "\n"


def write(args, records: list[dict]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(args, records))
    out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 400])
    p.add_argument("--examples", type=int, default=6, help="examples per length")
    p.add_argument("--budget-ratio", type=float, default=10.0, help="budget = exhaustive passes / this")
    p.add_argument("--granularity", default="token")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sep", default="\n\n", help="between paragraphs (' ': no paragraph level)")
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR), help="a model dir or a prepared model's name")
    p.add_argument("--task", choices=sorted(TASKS), default="facts",
                   help="facts: the demo task (the demo model); story: day stories (a real model)")
    p.add_argument("--max-candidates", type=int, default=40, help="documents tried per length (story: unanswered are dropped)")
    p.add_argument("--out", default="benchmarks/results/hierarchical.md")
    p.add_argument("--render-only", metavar="JSONL", help="write the table from saved records (the same arguments)")
    args = p.parse_args()
    if args.render_only:
        write(args, [json.loads(line) for line in Path(args.render_only).read_text().splitlines() if line.strip()])
        print(Path(args.out).read_text())
        return

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from atman_vllm.api import AtmanLLM

    demo = args.model == str(DEFAULT_MODEL_DIR)
    max_len = 512 if demo else 2048 + 1024 * (max(args.lengths) // 1024)  # the demo model has 512 positions
    llm = AtmanLLM(args.model, enforce_eager=True, dtype="float32", block_size=32,
                   max_model_len=max_len, max_num_batched_tokens=max(2048, max_len),
                   kv_cache_memory_bytes=2 << 30)
    rng = random.Random(args.seed)
    records = []
    for length in args.lengths:
        kept = tried = 0
        while kept < args.examples and tried < args.max_candidates:
            tried += 1
            ex = TASKS[args.task](rng, llm.tokenizer, length, args.sep)
            if args.task != "facts" and not answered(llm, ex):
                print(json.dumps({"length": length, "skipped": "not answered", "answer": ex.answer}), flush=True)
                continue
            opts = ExplainOptions(granularity=args.granularity)
            # Each search starts from an empty prefix cache: the other's forks are the same
            # requests and would otherwise be served from it.
            llm.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            exhaustive = llm.explain_planned(ExplainRequest(ex.prompt, ex.target, opts))
            t1 = time.perf_counter()
            budget = max(2, math.floor(exhaustive.stats.forward_passes / args.budget_ratio))
            llm.llm.reset_prefix_cache()
            t2 = time.perf_counter()
            hier = llm.explain_planned(ExplainRequest(ex.prompt, ex.target, ExplainOptions(
                granularity=args.granularity, search="hierarchical", budget=budget)))
            t3 = time.perf_counter()
            a, b = ap_of(exhaustive, ex, ex.evidence_spans), ap_of(hier, ex, ex.evidence_spans)
            if a is None or b is None:
                continue
            kept += 1
            sc = hier.explanations[0].prompt_scores
            records.append({"length": length, "tokens": len(llm.tokenizer.encode(ex.prompt)[0]), "budget": budget,
                            "answer": ex.answer, "ap_exhaustive": a, "ap_hierarchical": b,
                            "ap_answer_exhaustive": ap_of(exhaustive, ex, ex.answer_spans()),
                            "ap_answer_hierarchical": ap_of(hier, ex, ex.answer_spans()),
                            "passes_exhaustive": exhaustive.stats.forward_passes,
                            "passes_hierarchical": hier.stats.forward_passes,
                            "computed_exhaustive": exhaustive.stats.computed_tokens,
                            "computed_hierarchical": hier.stats.computed_tokens,
                            "refined": sum(bool(s.refined) for s in sc) / len(sc),
                            "s_exhaustive": t1 - t0, "s_hierarchical": t3 - t2, "tried": tried})
            print(json.dumps(records[-1]), flush=True)
            write(args, records)  # after every example: a stopped run keeps what it measured
    print(render(args, records))


if __name__ == "__main__":
    main()
