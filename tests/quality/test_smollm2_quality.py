"""Quality tasks and harness on the real model, SmolLM2-135M-Instruct (plain transformers: fast).

The full table is benchmarks/quality/run_quality_smollm2.py; here: the task
generators write documents the model really answers from their evidence, the
new baselines score every unit, and AtMan at sentence units ranks the
evidence above chance on a few examples.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from atman_vllm.quality.baselines import BASELINES, HFModel, _AttnLRPRules, prepare, run_baseline
from atman_vllm.quality.harness import evaluate
from atman_vllm.quality.lm_tasks import TASKS, greedy_answers, keep_answered
from atman_vllm.quality.tasks import QAExample

SEED = 4242


@pytest.fixture(scope="module")
def hf():
    import torch

    from atman_vllm.models.registry import resolve_model

    torch.set_num_threads(1)
    return HFModel(resolve_model("smollm2-135m-instruct"), threads=1, ig_steps=4)


@pytest.fixture(scope="module")
def selections(hf):
    return {task: keep_answered(hf, gen(8, SEED), 2) for task, gen in TASKS.items()}


def test_generated_examples_have_one_evidence_sentence_holding_the_answer():
    for gen in TASKS.values():
        for ex in gen(30, SEED):
            assert ex.form == "cloze" and ex.prompt == f"{ex.context} {ex.question}"
            (s, e), = ex.evidence_spans
            assert ex.context[s:e].endswith(".") and ex.answer in ex.context[s:e]
            # The answer's word stands in no other sentence of the context.
            assert len(re.findall(rf"\b{re.escape(ex.answer)}\b", ex.context)) == 1, ex.context
            assert QAExample.from_dict(ex.to_dict()) == ex


def test_smollm2_answers_the_tasks_from_their_evidence(selections):
    for task, sel in selections.items():
        # Measured on 64 documents per task: facts 81%, stories 82% (lm_tasks.py).
        assert sel.answered >= 5, (task, sel.to_dict())
        assert len(sel.examples) == 2
        assert sel.answered_without_evidence == 0, (task, sel.to_dict())


def test_greedy_answers_rejects_a_wrong_target(hf, selections):
    ex = selections["story"].examples[0]
    wrong = QAExample(ex.context, ex.question, "Bergen" if ex.answer != "Bergen" else "Lima", ex.evidence_spans,
                      ex.qtype, ex.form)
    assert greedy_answers(hf, [ex, wrong]) == [True, False]


def test_atman_sentence_units_beat_random_on_smollm2(hf, selections):
    examples = [ex for sel in selections.values() for ex in sel.examples]
    report = evaluate(examples, model_dir=hf.model_dir, hf=hf, backend="reference", progress=False,
                      methods=["atman", "random"], granularities=["sentence"], seed=SEED)
    rows = {r.method: r for r in report.rows}
    assert rows["atman"].summary.n == len(examples) == 4
    assert rows["atman"].summary.mAP >= 0.9
    assert rows["atman"].summary.mAP > rows["random"].summary.mAP + 0.2
    assert rows["atman"].cost["forward_passes_per_example"] > 1


def test_new_baselines_score_every_unit(hf, selections):
    prepared = prepare(selections["facts"].examples[:1], hf.tokenizer, ["token", "sentence"])
    ex = prepared[0]
    for name in ("attnlrp", "ablation-sentence", "contextcite-matched"):
        run = run_baseline(name, hf, prepared, ["token", "sentence"])
        assert set(run.scores) == set(BASELINES[name].granularities)
        for g, scores in run.scores.items():
            assert len(scores[0]) == len(ex.units[g]) and np.all(np.isfinite(scores[0]))
        # The fact the answer is copied from gets the largest score.
        evidence = [i for i, u in enumerate(ex.units["sentence"])
                    if u.start < ex.example.evidence_spans[0][1] and ex.example.evidence_spans[0][0] < u.start + u.length]
        assert int(np.argmax(run.scores["sentence"][0])) in evidence, name
        assert run.cost.forward_passes >= 1


def test_attnlrp_rules_change_gradients_only_and_are_undone(hf, selections):
    import torch

    ex = prepare(selections["story"].examples[:1], hf.tokenizer, ["token"])[0]
    ids = torch.tensor([list(ex.encoded.token_ids)])
    emb = hf.model.get_input_embeddings()(ids).detach()

    def logits_and_grad():
        x = emb.clone().requires_grad_(True)
        with torch.enable_grad():
            out = hf.model(inputs_embeds=x).logits[0, -2].max()
            out.backward()
        return float(out.detach()), x.grad.clone()

    plain_value, plain_grad = logits_and_grad()
    with _AttnLRPRules(hf.model):
        lrp_value, lrp_grad = logits_and_grad()
    after_value, after_grad = logits_and_grad()
    assert lrp_value == pytest.approx(plain_value, rel=1e-5)  # same forward
    assert not torch.allclose(lrp_grad, plain_grad)  # other backward
    assert after_value == plain_value and torch.equal(after_grad, plain_grad)  # patches removed
