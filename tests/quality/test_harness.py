"""The evaluation harness on the shipped demo model (plain-transformers backends: fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atman_vllm.quality.baselines import PassCounter, PeakMemory, unit_scores
from atman_vllm.quality.cli import main as eval_main
from atman_vllm.quality.harness import DEFAULT_MODEL_DIR, evaluate, markdown_report, markdown_table
from atman_vllm.quality.tasks import generate_examples

SEED = 777


@pytest.fixture(scope="module")
def report():
    import torch

    torch.set_num_threads(1)
    examples = generate_examples(6, seed=SEED)
    return evaluate(examples, model_dir=DEFAULT_MODEL_DIR, backend="reference", progress=False, threads=1,
                    methods=["atman", "atman-kappa", "grad-x-input", "attention-rollout", "random"])


def test_units_are_context_units_with_evidence(report):
    for ex in report.examples:
        for g in ("token", "sentence"):
            units = ex.units[g]
            assert all(u.start < len(ex.example.context) for u in units)
            assert any(s < u.start + u.length and u.start < e for u in units for s, e in ex.example.evidence_spans)
        # Sentence units of the facts task are exactly the fact sentences.
        assert [u.text for u in ex.units["sentence"]] == [s.strip() + "." for s in ex.example.context.split(".")[:-1]]


def test_every_method_scores_every_unit(report):
    for (method, g), scores in report.unit_scores.items():
        assert len(scores) == len(report.examples)
        for ex, s in zip(report.examples, scores):
            assert s.shape == (len(ex.units[g]),) and np.all(np.isfinite(s)), (method, g)


def test_atman_finds_the_evidence_sentence_on_the_demo_model(report):
    rows = {(r.method, r.granularity): r for r in report.rows}
    assert rows[("atman", "sentence")].summary.mAP >= 0.8
    assert rows[("atman", "sentence")].summary.mAP > rows[("random", "sentence")].summary.mAP
    assert rows[("atman", "token")].cost["backward_passes_per_example"] == 0
    assert rows[("grad-x-input", "token")].cost["backward_passes_per_example"] == 1
    assert rows[("grad-x-input", "token")].cost["forward_passes_per_example"] == 1
    # AtMan: one pass per unit plus the unperturbed one.
    n_units = np.mean([len(ex.units["sentence"]) for ex in report.examples])
    assert rows[("atman", "sentence")].cost["forward_passes_per_example"] >= n_units + 1
    assert "| atman | sentence | reference |" in markdown_table(report)


def test_token_rows_are_also_scored_against_the_answer_span(report):
    rows = {(r.method, r.granularity): r for r in report.rows}
    assert rows[("atman", "sentence")].answer_summary is None
    atman, rand = rows[("atman", "token")].answer_summary, rows[("random", "token")].answer_summary
    assert atman.n == len(report.examples) and atman.mAP > rand.mAP
    assert "against the answer span" in markdown_report(report)


def test_unit_scores_sum_token_scores():
    from atman_vllm.core import Unit

    units = [Unit(0, 3, "abc", (1, 2)), Unit(4, 1, "d", (3,))]
    assert unit_scores(np.array([9.0, 1.0, 2.0, 4.0]), units).tolist() == [3.0, 4.0]  # small integers: exact


def test_pass_counter_counts_sequences_forward_and_backward():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32)
    counter = PassCounter(model)
    try:
        with torch.no_grad():
            model(input_ids=torch.ones(3, 5, dtype=torch.long))
        emb = model.get_input_embeddings()(torch.ones(2, 5, dtype=torch.long)).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits.sum().backward()
    finally:
        counter.close()
    assert (counter.forward, counter.backward) == (5, 2)


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as mem:
        block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
        block[::4096] = 2
        del block
    assert not mem.supported or mem.peak_bytes >= 48 << 20


def test_cli_writes_json_markdown_and_html(tmp_path):
    out = tmp_path / "eval"
    rc = eval_main(["--n", "3", "--seed", str(SEED), "--methods", "atman", "random", "--granularities", "sentence",
                    "--backend", "reference", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    data = json.loads((out / "quality.json").read_text())
    assert {(r["method"], r["granularity"]) for r in data["rows"]} == {("atman", "sentence"), ("random", "sentence")}
    assert data["n_examples"] == 3
    assert "| atman | sentence |" in (out / "quality.md").read_text()
    html = (out / "examples.html").read_text()
    assert html.count("class='ex'") == 3 and "class=\"u top" in html


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert eval_main(["--n", "0", "--out", str(tmp_path)]) == 2
    assert eval_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert eval_main(["--squad", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit):
        eval_main(["--methods", "no-such-method"])
    assert "no such" in capsys.readouterr().err


def test_cli_runs_on_a_squad_file(tmp_path):
    context = "Otto lives in Lisbon. Mira works as a pilot. Otto owns a cat."
    squad = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "1", "question": "Where does Otto live?",
         "answers": [{"text": "Lisbon", "answer_start": context.index("Lisbon")}]},
        {"id": "2", "question": "What pet does Otto own?",
         "answers": [{"text": "cat", "answer_start": context.index("cat")}]},
    ]}]}]}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(squad))
    out = tmp_path / "eval"
    rc = eval_main(["--squad", str(path), "--methods", "atman-mult", "random", "--granularities", "sentence",
                    "--backend", "reference", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    data = json.loads((out / "quality.json").read_text())
    assert data["data"] == "squad:dev.json" and data["n_examples"] == 2
    atman = next(r for r in data["rows"] if r["method"] == "atman-mult")
    # The demo model reads these facts: the evidence sentence ranks first for both questions.
    # (Log-additive AtMan ranks "Otto owns a cat." third: the only pet in the document is
    # still found with its attention damped by 0.1; docs/quality.md.)
    assert [e["ap"] for e in atman["per_example"]] == [1.0, 1.0]
    assert set(atman["summary"]["by_qtype"]) == {"where", "what"}
