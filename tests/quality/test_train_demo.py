"""The demo-model training script's pieces, and a few steps of a real run."""

from __future__ import annotations

import json
import random

import pytest

from atman_vllm.models.train_demo import (
    TrainConfig, build_tokenizer, induction_sequence, lr_at, qa_sequence, train, training_batch,
)
from atman_vllm.quality.tasks import DEMO_ASKS, generate_document


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_induction_sequence_repeats_its_run_and_weights_the_repeat():
    ids, w = induction_sequence(random.Random(0), list(range(10, 60)))
    n = len(ids) // 2
    assert 8 <= n <= 24 and ids[:n] == ids[n:]
    assert w == [0.0] * n + [1.0] * n


def test_qa_sequence_is_prompt_answer_eos_with_loss_on_answer_and_eos(tokenizer):
    cfg = TrainConfig()
    ids, w = qa_sequence(random.Random(1), tokenizer, cfg)
    # The same draw by hand: a document, then a value question about one fact.
    rng = random.Random(1)
    doc = generate_document(rng, rng.randint(cfg.min_facts, cfg.max_facts))
    ex = doc.question(rng.randrange(len(doc.facts)), rng.choice(DEMO_ASKS))
    prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
    answer = tokenizer(ex.target, add_special_tokens=False)["input_ids"]
    assert ids == prompt + answer + [tokenizer.eos_token_id]
    assert w == [cfg.context_weight] * len(prompt) + [1.0] * (len(answer) + 1)
    assert ex.qtype.endswith(":value") and ex.answer in ex.context


def test_training_batch_starts_with_bos_and_never_weights_padding(tokenizer):
    cfg = TrainConfig(batch_size=16)
    ids, weight = training_batch(random.Random(2), tokenizer, cfg, list(range(4, len(tokenizer))))
    assert ids.shape == weight.shape and ids.shape[0] == 16
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert (weight[:, 0] == 0).all()
    assert (weight[ids == tokenizer.pad_token_id] == 0).all()
    assert (weight.sum(dim=1) > 0).all()


def test_learning_rate_warms_up_holds_and_decays_to_zero():
    cfg = TrainConfig(steps=1000, warmup=100, lr=1e-3, decay_frac=0.3)
    assert lr_at(0, cfg) < lr_at(50, cfg) < lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(500, cfg) == pytest.approx(1e-3)
    assert lr_at(800, cfg) < 1e-3 and lr_at(999, cfg) < 1e-5


def test_a_short_run_saves_a_model_transformers_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = TrainConfig(steps=3, eval_every=2, eval_n=8, layers=1, batch_size=4)
    logged: list[str] = []
    report = train(cfg, tmp_path, log=logged.append)
    assert report["steps_run"] == 3 and report["held_out_examples"] == 8
    assert 0.0 <= report["held_out_exact_match"] <= 1.0
    assert set(report["held_out_exact_match_by_qtype"]) <= {"job:value", "lives_in:value", "pet:value",
                                                            "works_in:value"}
    assert any(line.startswith("EVAL step 2") for line in logged)
    saved = json.loads((tmp_path / "training_report.json").read_text())
    assert saved["config"]["layers"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 1 and len(tok) == model.config.vocab_size


def test_training_is_deterministic_for_a_seed(tmp_path):
    """Same seed, same weights to the bit: what lets the shipped model be reproduced."""
    from safetensors.torch import load_file

    cfg = TrainConfig(steps=4, eval_every=100, eval_n=2, layers=1, batch_size=4)
    for name in ("a", "b"):
        train(cfg, tmp_path / name, log=lambda _: None)
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("a", "b"))
    # Bitwise by construction: the same seed, data, shapes and thread count in the same process run
    # the very same floating-point operations (this reproducibility is what the test is about).
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    other = TrainConfig(**{**cfg.__dict__, "seed": 1})
    train(other, tmp_path / "c", log=lambda _: None)
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert any((a[k] != c[k]).any() for k in a)


def test_time_budget_stops_the_run_and_the_report_says_so():
    cfg = TrainConfig(steps=50, eval_n=2, layers=1, batch_size=2, max_minutes=0.0)
    report = train(cfg, None, log=lambda _: None)
    assert report["stopped_early"] is True and report["steps_run"] == 0
