"""The facts task and SQuAD loading: determinism, unambiguous answers, evidence spans."""

from __future__ import annotations

import json
import random
import re

import pytest

from atman_vllm.quality.tasks import (
    QTYPES, QAExample, generate_document, generate_examples, load_squad, sentence_spans, without_evidence,
)


def test_same_seed_same_examples_and_different_seed_differs():
    a = generate_examples(40, seed=7)
    b = generate_examples(40, seed=7)
    c = generate_examples(40, seed=8)
    assert a == b
    assert a != c


def test_evidence_span_is_one_fact_sentence_containing_the_answer():
    for ex in generate_examples(300, seed=1):
        assert len(ex.evidence_spans) == 1
        (s, e), = ex.evidence_spans
        sentence = ex.context[s:e]
        assert re.search(rf"\b{re.escape(ex.answer)}\b", sentence), (sentence, ex.answer)
        assert sentence.endswith(".") and sentence in ex.context.split(". ") or sentence[:-1] in ex.context.split(". ")
        # The evidence is a whole sentence: bounded by the context's start/end or ". ".
        assert s == 0 or ex.context[s - 2:s] == ". "
        assert e == len(ex.context) or ex.context[e:e + 1] == " "


def test_prompt_and_target_follow_the_paper_format():
    ex = generate_examples(1, seed=3)[0]
    assert ex.prompt == f"{ex.context} Q: {ex.question} A:"
    assert ex.target == f" {ex.answer}"


def test_every_question_has_exactly_one_answer_in_its_document():
    """Re-derive the answer from the facts: exactly one fact matches the question."""
    for ex in generate_examples(300, seed=2, asks=("value", "entity")):
        facts = [f.strip() for f in ex.context.split(".") if f.strip()]
        rel, ask = ex.qtype.split(":")
        verb = {"lives_in": "lives in", "works_in": "works in", "job": "works as a", "pet": "owns a"}[rel]
        parsed = [re.fullmatch(rf"(\w+) {verb} (\w+)", f) for f in facts]
        parsed = [m.groups() for m in parsed if m]
        if ask == "value":
            who = re.search(r"(?:does|of) (\w+)", ex.question).group(1)
            matches = [v for e, v in parsed if e == who]
        else:
            what = re.search(r"(\w+)\?$", ex.question).group(1)
            matches = [e for e, v in parsed if v == what]
        assert matches == [ex.answer], (ex.context, ex.question)


def test_documents_contain_distractors_sharing_entity_relation_and_value():
    exs = generate_examples(400, seed=4)
    shared_entity = shared_relation = shared_value = 0
    for ex in exs:
        (s, e), = ex.evidence_spans
        evidence = ex.context[s:e]
        others = [f.strip() + "." for f in (ex.context[:s] + ex.context[e:]).split(".") if f.strip()]
        ev_entity = evidence.split()[0]
        ev_verb = " ".join(evidence.split()[1:-1])
        ev_value = evidence.split()[-1].rstrip(".")
        shared_entity += any(o.split()[0] == ev_entity for o in others)
        shared_relation += any(" ".join(o.split()[1:-1]) == ev_verb for o in others)
        shared_value += any(o.split()[-1].rstrip(".") == ev_value for o in others)
    assert shared_entity > 0.5 * len(exs)
    assert shared_relation > 0.5 * len(exs)
    assert shared_value > 0.02 * len(exs)  # lives in X / works in X


def test_all_question_types_occur():
    assert {ex.qtype for ex in generate_examples(300, seed=5, asks=("value", "entity"))} == set(QTYPES)


def test_demo_task_asks_for_values_only():
    exs = generate_examples(200, seed=5)
    assert {ex.qtype.split(":")[1] for ex in exs} == {"value"}
    assert {ex.qtype for ex in exs} == {q for q in QTYPES if q.endswith(":value")}
    with pytest.raises(ValueError, match="asks"):
        generate_examples(1, seed=5, asks=("where",))
    with pytest.raises(ValueError, match="asks"):
        generate_examples(1, seed=5, asks=())


def test_fact_counts_respect_bounds():
    for ex in generate_examples(100, seed=6, n_facts=(2, 3)):
        assert 2 <= ex.context.count(".") <= 3
    with pytest.raises(ValueError):
        generate_document(random.Random(0), 0)


def test_without_evidence_removes_exactly_the_evidence_sentence():
    for ex in generate_examples(50, seed=9):
        cut = without_evidence(ex)
        (s, e), = ex.evidence_spans
        assert ex.context[s:e] not in cut.context
        assert cut.context.count(".") == ex.context.count(".") - 1
        assert cut.evidence_spans == ()
        assert cut.question == ex.question and cut.answer == ex.answer


def test_example_round_trips_through_dict():
    ex = generate_examples(1, seed=11)[0]
    assert QAExample.from_dict(json.loads(json.dumps(ex.to_dict()))) == ex


def test_sentence_spans_split_after_end_punctuation():
    text = "Ann met Bo. Did she? Yes! 3.5 is a number. end"
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "Ann met Bo.", "Did she?", "Yes!", "3.5 is a number.", "end"]


def test_load_squad_uses_the_sentence_containing_the_answer(tmp_path):
    context = "The tower is tall. It was built in 1889 by Eiffel. Paris is its city."
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "1", "question": "When was it built?", "answers": [{"text": "1889", "answer_start": context.index("1889")}]},
        {"id": "2", "question": "Who?", "is_impossible": True, "answers": []},
        {"id": "3", "question": "Which city?", "answers": [{"text": "wrong", "answer_start": 0}]},
    ]}]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(data))
    exs = load_squad(path)
    assert len(exs) == 1  # impossible and misaligned answers are skipped
    ex = exs[0]
    assert ex.answer == "1889" and ex.qtype == "when"
    assert ex.evidence_text() == ["It was built in 1889 by Eiffel."]
    assert ex.prompt == f"{context} Q: When was it built? A:"


def test_answer_spans_point_at_the_answer_inside_the_evidence():
    for ex in generate_examples(100, seed=12):
        (a, b), = ex.answer_spans()
        (s, e), = ex.evidence_spans
        assert s <= a < b <= e and ex.context[a:b] == ex.answer
    # "Lisbon" also occurs in a distractor before the evidence: the label is the evidence's one.
    ctx = "Mira works in Lisbon. Otto lives in Lisbon."
    ex = QAExample(ctx, "Where does Otto live?", "Lisbon", ((22, 43),), "lives_in:value")
    assert ex.answer_spans() == ((36, 42),)
    assert without_evidence(ex).answer_spans() == ()
