"""Train the shipped demo model: a small Llama that answers the facts task.

    nice -n 5 python -m atman_vllm.models.train_demo --out atman_vllm/models/default

The model must really read its context (that is what an explanation of it
can then show), so training is shaped for retrieval rather than language
modelling:

- each training sequence is one document followed by several questions
  (``"{context} Q: q1 A: a1 Q: q2 A: a2 ..."``): several answers per forward
  pass; the first question sits exactly where it sits at evaluation time;
- the loss is on the answer tokens; the other tokens get a small weight
  (``--context-weight``) that teaches the format without drowning the answers;
- an adaptive curriculum: documents start with at most 2 facts and may hold
  one more fact whenever the running answer accuracy on the training batches
  reaches ``--promote-at`` (up to ``--max-facts``); a random subset of the
  relations is used per document, half of them single-relation documents
  (only the person tells facts apart: that keeps the entity-matching signal
  strong; with mixed relations a model first learns to answer by type and
  stalls there, seen at ~85% on two-fact documents);
- AdamW with linear warmup and cosine decay.

Everything is deterministic for a given ``--seed`` (data, init, order) with
the thread count fixed. The tokenizer is a WordLevel model over words and
punctuation trained with the ``tokenizers`` library on the task's vocabulary;
it is saved as a ``PreTrainedTokenizerFast`` so transformers and vLLM load it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from atman_vllm.quality.tasks import (
    RELATIONS, Document, QAExample, generate_document, generate_examples, vocabulary_text, without_evidence,
)

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """WordLevel tokenizer over words and punctuation, with BOS and char offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    # \w+|[^\w\s]+ : "Lisbon." -> "Lisbon", "."; leading spaces never matter, so
    # tokenize(prompt + target) == tokenize(prompt) + tokenize(target).
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS, UNK], min_frequency=1)
    tok.train_from_iterator(vocabulary_text(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    # Joins words with spaces and drops the space before punctuation on decode.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        model_max_length=512)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 30000  # upper bound; the run ends when the curriculum is done + anneal_steps
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 150
    weight_decay: float = 0.05
    context_weight: float = 0.05
    max_facts: int = 10
    questions_per_doc: int = 4
    promote_at: float = 0.9
    single_relation_p: float = 0.5
    start_facts: int = 2
    anneal_steps: int = 1500
    group_p: float = 0.5
    echo_p: float = 0.25
    init_std: float = 0.02
    min_steps_per_level: int = 40
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    head_dim: int = 32
    intermediate: int = 512
    threads: int = 1
    eval_every: int = 500
    max_minutes: float = 58.0  # safety stop (then the report says so); the schedule is by steps
    eval_n: int = 500


@dataclass(frozen=True)
class Stage:
    """A curriculum stage: which questions, how many relations per document."""

    name: str
    directions: tuple[str, ...]  # "value" (where does X live?) and/or "entity" (who lives in Y?)
    single_relation_p: float | None  # None: the config's value


# Retrieval is learnt first where nothing else works: one relation per document
# (the answer's type gives nothing away), and only questions asking for the
# value (the copy is the answer token itself); then questions asking for the
# person; then documents mixing relations. After the last stage the documents
# grow one fact at a time. Each step up happens when the running answer
# accuracy reaches ``promote_at``.
STAGES: tuple[Stage, ...] = (
    Stage("value questions", ("value",), None),
    Stage("value and person questions", ("value", "entity"), None),
)


def grouped_by_person(doc: Document) -> Document:
    """The same facts with each person's facts next to each other (first-mention order).

    In such documents the language-model loss rewards knowing, at every
    position, who the current sentence is about (the next sentence is often
    about the same person): the "most recent person" feature retrieval needs
    on both sides — at the value being looked up and at the question's end.
    Evaluation documents stay shuffled.
    """
    order: list[str] = []
    for f in doc.facts:
        if f.entity not in order:
            order.append(f.entity)
    return Document(tuple(sorted(doc.facts, key=lambda f: order.index(f.entity))))


def echo_question(rng: random.Random, fact) -> tuple[str, str]:
    """A training-only question whose answer is the word it names ("Who is Otto? A: Otto").

    It teaches the position after "A:" to carry the question's key word
    (person or value), which real questions need before any lookup can match
    it against the context; learnt in a few hundred steps on its own.
    """
    if rng.random() < 0.5:
        return f"Who is {fact.entity}?", fact.entity
    return f"What is {fact.value}?", fact.value


def training_batch(rng: random.Random, tokenizer, cfg: TrainConfig, max_facts: int, stage: Stage):
    """Token ids and per-token loss weights (answer tokens 1.0, the rest ``context_weight``)."""
    seqs, weights, answers = [], [], []
    single_p = cfg.single_relation_p if stage.single_relation_p is None else stage.single_relation_p
    for _ in range(cfg.batch_size):
        # Single-relation documents keep the retrieval signal strong: there only
        # the person (or the value) tells the facts apart.
        n_rel = 1 if rng.random() < single_p else rng.randint(2, len(RELATIONS))
        relations = tuple(rng.sample(RELATIONS, n_rel))
        doc = generate_document(rng, rng.randint(1, max_facts), relations)
        if rng.random() < cfg.group_p:
            doc = grouped_by_person(doc)
        k = min(len(doc.facts), cfg.questions_per_doc)
        picks = rng.sample(range(len(doc.facts)), k)
        ids = tokenizer(doc.context)["input_ids"]  # starts with BOS
        w = [cfg.context_weight] * len(ids)
        is_answer = [False] * len(ids)
        for i in picks:
            if rng.random() < cfg.echo_p:
                question, answer = echo_question(rng, doc.facts[i])
            else:
                ex = doc.question(i, rng.choice(stage.directions))
                question, answer = ex.question, ex.answer
            q = tokenizer(f" Q: {question} A:", add_special_tokens=False)["input_ids"]
            a = tokenizer(f" {answer}", add_special_tokens=False)["input_ids"]
            ids += q + a
            w += [cfg.context_weight] * len(q) + [1.0] * len(a)
            is_answer += [False] * len(q) + [True] * len(a)
        ids.append(tokenizer.eos_token_id)
        w.append(cfg.context_weight)
        is_answer.append(False)
        seqs.append(ids)
        weights.append(w)
        answers.append(is_answer)
    n = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), n), tokenizer.pad_token_id, dtype=torch.long)
    weight = torch.zeros((len(seqs), n))
    answer_mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for b, (s, w, a) in enumerate(zip(seqs, weights, answers)):
        input_ids[b, : len(s)] = torch.tensor(s)
        weight[b, : len(w)] = torch.tensor(w)
        answer_mask[b, : len(a)] = torch.tensor(a)
    # weight[b, t] belongs to predicting token t from position t-1; BOS is never predicted.
    weight[:, 0] = 0.0
    return input_ids, weight, answer_mask


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_answers(model, tokenizer, examples: list[QAExample], batch_size: int = 32) -> list[str]:
    """Greedy continuation of each prompt, as many tokens as its answer has.

    Exact match compares these tokens with the answer's tokens (what decides
    the answer; where the model stops afterwards does not matter here).
    """
    model.eval()
    out: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        prompts = [tokenizer(ex.prompt)["input_ids"] for ex in chunk]
        n_new = [len(tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in chunk]
        gen: list[list[int]] = [[] for _ in chunk]
        for step in range(max(n_new)):
            seqs = [p + g for p, g in zip(prompts, gen)]
            n = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), n), tokenizer.pad_token_id, dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, : len(s)] = torch.tensor(s)
            # Right padding: causal attention keeps real positions exact.
            logits = model(input_ids=ids).logits
            for b, s in enumerate(seqs):
                if step < n_new[b]:
                    gen[b].append(int(logits[b, len(s) - 1].argmax()))
        out.extend(tokenizer.decode(g, skip_special_tokens=True) for g in gen)
    return out


def exact_match(model, tokenizer, examples: list[QAExample]) -> float:
    preds = greedy_answers(model, tokenizer, examples)
    return sum(p.strip() == ex.answer.strip() for p, ex in zip(preds, examples)) / max(1, len(examples))


def per_qtype_exact_match(model, tokenizer, examples: list[QAExample]) -> dict[str, float]:
    preds = greedy_answers(model, tokenizer, examples)
    hits: dict[str, list[int]] = {}
    for p, ex in zip(preds, examples):
        hits.setdefault(ex.qtype, []).append(int(p.strip() == ex.answer.strip()))
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


# --------------------------------------------------------------------------- training

HELD_OUT_SEED = 10_001  # evaluation documents; training draws from its own seeded stream


def build_model(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        head_dim=cfg.head_dim, max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32", initializer_range=cfg.init_std,
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, cfg: TrainConfig, anneal_from: int | None) -> float:
    """Linear warmup, constant while the curriculum runs, then cosine to 5% over ``anneal_steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if anneal_from is None:
        return cfg.lr
    progress = min(1.0, (step - anneal_from) / max(1, cfg.anneal_steps))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(cfg: TrainConfig, out_dir: Path | None, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params {n_params} vocab {len(tokenizer)}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    held_out = generate_examples(cfg.eval_n, seed=HELD_OUT_SEED)
    history = []
    t0 = time.time()
    max_facts, level_start, acc_ema, stage_i = cfg.start_facts, 0, 0.0, 0
    anneal_from: int | None = None  # step at which the curriculum completed
    stopped_early = False
    step = -1
    while True:
        step += 1
        if anneal_from is not None and step >= anneal_from + cfg.anneal_steps:
            break
        if step >= cfg.steps:
            log(f"step {step}: step limit reached before the curriculum completed")
            stopped_early = True
            break
        if time.time() - t0 > cfg.max_minutes * 60:
            stopped_early = True
            log(f"step {step}: time budget of {cfg.max_minutes} minutes reached, stopping")
            break
        model.train()
        lr = lr_at(step, cfg, anneal_from)
        ids, weight, answer_mask = training_batch(rng, tokenizer, cfg, max_facts, STAGES[stage_i])
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(input_ids=ids).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        w = weight[:, 1:].reshape(-1)
        loss = (ce * w).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            ans = answer_mask[:, 1:].reshape(-1)
            ans_acc = (logits.argmax(-1).reshape(-1)[ans] == ids[:, 1:].reshape(-1)[ans]).float().mean()
        acc_ema = 0.9 * acc_ema + 0.1 * ans_acc.item()
        if (anneal_from is None and acc_ema >= cfg.promote_at
                and step - level_start >= cfg.min_steps_per_level):
            if stage_i + 1 < len(STAGES):
                stage_i, level_start, acc_ema = stage_i + 1, step, 0.0
                log(f"step {step}: curriculum -> {STAGES[stage_i].name}")
            elif max_facts < cfg.max_facts:
                max_facts, level_start = max_facts + 1, step
                log(f"step {step}: curriculum -> up to {max_facts} facts")
            else:
                anneal_from = step
                log(f"step {step}: curriculum complete, annealing for {cfg.anneal_steps} steps")
        if step % 25 == 0:
            log(f"step {step} stage {stage_i} facts<={max_facts} loss {loss.item():.4f} "
                f"answer_acc {ans_acc.item():.3f} ema {acc_ema:.3f} lr {lr:.2e} t {time.time() - t0:.0f}s")
        if (step + 1) % cfg.eval_every == 0:
            em = exact_match(model, tokenizer, held_out[:200])
            history.append({"step": step + 1, "seconds": round(time.time() - t0, 1), "stage": stage_i,
                            "max_facts": max_facts, "held_out_em_200": em})
            log(f"EVAL step {step + 1} held-out exact match {em:.3f} t {time.time() - t0:.0f}s")
    train_seconds = time.time() - t0
    em = exact_match(model, tokenizer, held_out)
    em_q = per_qtype_exact_match(model, tokenizer, held_out)
    em_removed = exact_match(model, tokenizer, [without_evidence(ex) for ex in held_out])
    report = {
        "seed": cfg.seed,
        "config": asdict(cfg),
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "steps_run": step,
        "curriculum_completed_at_step": anneal_from,
        "stopped_early": stopped_early,
        "final_max_facts": max_facts,
        "torch_threads": cfg.threads,
        "held_out_seed": HELD_OUT_SEED,
        "held_out_examples": len(held_out),
        "held_out_exact_match": em,
        "held_out_exact_match_by_qtype": em_q,
        "evidence_removed_exact_match": em_removed,
        "history": history,
    }
    log(json.dumps({k: v for k, v in report.items() if k not in ("config", "history")}, indent=1))
    if out_dir is not None:
        save(model, tokenizer, out_dir, report)
    return report


def save(model, tokenizer, out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="where to save (default: don't save)")
    p.add_argument("--log", type=Path, default=None, help="also append progress here")
    for name, field in TrainConfig.__dataclass_fields__.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(field.default), default=field.default)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in TrainConfig.__dataclass_fields__})
    log_file = open(args.log, "a") if args.log else None

    def log(msg: str) -> None:
        print(msg, flush=True)
        if log_file:
            log_file.write(msg + "\n")
            log_file.flush()

    report = train(cfg, args.out, log)
    return 0 if report["held_out_exact_match"] >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
