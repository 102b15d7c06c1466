"""Hierarchical search (core/hierarchical.py) on a toy model with known arithmetic."""

from __future__ import annotations

import jsonschema
import pytest

from atman_vllm.core import ExplainOptions, ExplainRequest, InvalidRequestError
from atman_vllm.core.planning import plan_explanation
from atman_vllm.core.results import EXPLAIN_RESULT_SCHEMA, ExplainResult

from fake_tokenizer import FakeTokenizer
from test_core_scoring import LinearToyExplainer

# 3 paragraphs x 3 sentences; token 0 is the BOS, the prompt's tokens follow it.
DOC = ("Ann has a red hat. Bob owns two cats. Cid likes green tea.\n\n"
       "Dan reads old books. Eve sells fresh bread. Fay paints tall walls.\n\n"
       "Gus fixes fast cars. Hal grows sweet corn. Ivy sings sad songs.")
TARGET = " The hat is red"


def _toy():
    tokens = FakeTokenizer().encode(DOC)[1]
    # Position (BOS = 0) of the word "red" in sentence 1 and "bread" in sentence 5 matter; "Bob" a little.
    pos = {DOC[s:e].strip(): i + 1 for i, (s, e) in enumerate(tokens)}
    return LinearToyExplainer({pos["red"]: 2.0, pos["bread"]: 1.0, pos["Bob"]: 0.3})


def _scores(result: ExplainResult):
    return result.explanations[0].prompt_scores


@pytest.mark.parametrize("granularity", ["token", "word"])
def test_hierarchical_scores_every_unit_within_budget_and_refined_equal_exhaustive(granularity):
    model = _toy()
    exhaustive = model.explain(DOC, TARGET, granularity=granularity)
    model.calls.clear()
    hier = model.explain(DOC, TARGET, granularity=granularity, search="hierarchical", budget=16)
    ex, hi = _scores(exhaustive), _scores(hier)
    assert [(s.start, s.length) for s in hi] == [(s.start, s.length) for s in ex]  # every unit scored
    assert hier.stats.forward_passes == sum(model.calls) <= 16  # budget respected, passes reported
    assert len(model.calls) == 3  # paragraphs, sentences, then tokens: one round each
    assert hier.stats.perturbations == hier.stats.forward_passes - 3
    refined = [i for i, s in enumerate(hi) if s.refined]
    assert refined and len(refined) < len(hi)
    for i, s in enumerate(hi):
        if s.refined:  # its own fork: exactly the exhaustive score
            assert s.inherited_from is None and s.score == ex[i].score
        else:
            assert s.inherited_from in ("sentence", "paragraph")
    # The strongest unit is found and refined; the top-1 matches exhaustive.
    best = max(range(len(ex)), key=lambda i: ex[i].score)
    assert hi[best].refined and hi[best].text.strip() == "red"
    assert max(range(len(hi)), key=lambda i: hi[i].score) == best
    d = hier.to_dict()
    jsonschema.validate(d, EXPLAIN_RESULT_SCHEMA)
    assert d["options"]["search"] == "hierarchical" and d["options"]["budget"] == 16
    assert ExplainResult.from_dict(d).to_dict() == d
    # Exhaustive output is as it always was: no search fields, no marks.
    e = exhaustive.to_dict()
    assert "search" not in e["options"] and "budget" not in e["options"]
    assert all("refined" not in s and "inherited_from" not in s for s in e["explanations"][0]["prompt_scores"])


def test_unrefined_units_inherit_their_parents_score():
    model = _toy()
    hier = model.explain(DOC, TARGET, granularity="token", search="hierarchical", budget=16)
    sentences = model.explain(DOC, TARGET, granularity="sentence")
    paragraphs = model.explain(DOC, TARGET, granularity="paragraph")
    by_level = {"sentence": _scores(sentences), "paragraph": _scores(paragraphs)}
    checked = 0
    for s in _scores(hier):
        if not s.refined and s.text.strip():  # (a blank-line token belongs to the next paragraph)
            checked += 1
            parent = next(p for p in by_level[s.inherited_from] if p.start <= s.start + s.length - 1 < p.start + p.length)
            assert s.score == pytest.approx(parent.score, abs=1e-12)
    assert checked > 10


def test_requested_sentences_search_paragraphs_then_sentences():
    model = _toy()
    hier = model.explain(DOC, TARGET, granularity="sentence", search="hierarchical", budget=8)
    assert len(model.calls) == 2 and hier.stats.forward_passes <= 8
    assert len(_scores(hier)) == 9 and {s.inherited_from for s in _scores(hier)} <= {None, "paragraph"}


def test_budget_that_fits_exhaustive_refines_everything_in_one_round():
    model = _toy()
    exhaustive = model.explain(DOC, TARGET, granularity="sentence")
    model.calls.clear()
    hier = model.explain(DOC, TARGET, granularity="sentence", search="hierarchical", budget=100)
    assert model.calls == [10] and all(s.refined for s in _scores(hier))
    assert [s.score for s in _scores(hier)] == [s.score for s in _scores(exhaustive)]


def test_explain_many_runs_hierarchical_rounds_in_lockstep():
    model = _toy()
    reqs = [ExplainRequest(DOC, TARGET, ExplainOptions(granularity="token", search="hierarchical", budget=16)),
            ExplainRequest(DOC, TARGET, ExplainOptions(granularity="word"))]
    batch = model.explain_many(reqs)
    assert len(model.calls) == 3  # the exhaustive request's forks ride along with round 1
    single = [model.explain(r.prompt, r.target, r.options) for r in reqs]
    for b, s in zip(batch, single):
        assert b.explanations == s.explanations and b.stats.forward_passes == s.stats.forward_passes


@pytest.mark.parametrize("options, field", [
    (dict(search="greedy"), "search"),
    (dict(budget=8), "budget"),  # budget without hierarchical search
    (dict(search="hierarchical", budget=1), "budget"),
    (dict(search="hierarchical", budget=True), "budget"),
    (dict(search="hierarchical", budget=2.5), "budget"),
    (dict(search="hierarchical", granularity="custom", delimiter=","), "search"),
    (dict(search="hierarchical", spans=((0, 3),)), "search"),
    (dict(search="hierarchical", target_granularity="token"), "search"),
])
def test_bad_search_options_name_their_field(options, field):
    with pytest.raises(InvalidRequestError) as e:
        ExplainOptions(**options).validated()
    assert e.value.field == field


def test_budget_below_the_top_level_is_refused_while_planning():
    with pytest.raises(InvalidRequestError) as e:
        plan_explanation(ExplainRequest(DOC, TARGET, ExplainOptions(granularity="token", search="hierarchical",
                                                                    budget=3)), FakeTokenizer())
    assert e.value.field == "budget" and "3 paragraph units" in e.value.message


def test_defaults():
    opts = ExplainOptions(search="hierarchical").validated()
    assert opts.budget == 32
    assert ExplainOptions().validated().to_dict() == ExplainOptions().to_dict()
    assert "search" not in ExplainOptions().validated().to_dict()
