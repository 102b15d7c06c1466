"""The shipped demo model: loads with plain transformers and answers the facts task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import atman_vllm.models.train_demo as train_demo
from atman_vllm.quality.tasks import generate_examples, without_evidence

DEFAULT_DIR = Path(train_demo.__file__).parent / "default"
FRESH_SEED = 424_242  # neither the training stream (seed 0) nor the held-out set used while training


@pytest.fixture(scope="module")
def demo():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_DIR, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_DIR)
    return model.eval(), tokenizer


def test_shipped_files_are_small_and_complete():
    names = {p.name for p in DEFAULT_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_report.json"} <= names
    assert (DEFAULT_DIR / "model.safetensors").stat().st_size < 20 * 1024 * 1024
    config = json.loads((DEFAULT_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert head_dim in (32, 64, 80, 96, 112, 128)  # vLLM CPU attention head sizes
    report = json.loads((DEFAULT_DIR / "training_report.json").read_text())
    assert report["held_out_exact_match"] >= 0.95


def test_tokenizer_has_bos_and_character_offsets(demo):
    _, tok = demo
    ex = generate_examples(1, seed=FRESH_SEED)[0]
    enc = tok(ex.prompt, return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id
    words = [ex.prompt[s:e] for s, e in enc["offset_mapping"][1:]]
    assert "".join(words) == ex.prompt.replace(" ", "")
    assert tok.unk_token_id not in enc["input_ids"]
    # Prompt and target tokenize independently: the target's tokens are the tail of the whole.
    whole = tok(ex.prompt + ex.target)["input_ids"]
    assert whole[-1] == tok(ex.target, add_special_tokens=False)["input_ids"][-1]


def test_answers_fresh_held_out_examples(demo):
    model, tok = demo
    examples = generate_examples(50, seed=FRESH_SEED)
    preds = train_demo.greedy_answers(model, tok, examples)
    em = sum(p.strip() == ex.answer for p, ex in zip(preds, examples)) / len(examples)
    assert em >= 0.9, list(zip(preds, [ex.answer for ex in examples]))


def test_fails_without_the_evidence(demo):
    """The model reads the evidence: with that sentence cut out it mostly answers wrong."""
    model, tok = demo
    examples = [without_evidence(ex) for ex in generate_examples(50, seed=FRESH_SEED)]
    preds = train_demo.greedy_answers(model, tok, examples)
    em = sum(p.strip() == ex.answer for p, ex in zip(preds, examples)) / len(examples)
    assert em <= 0.3
