"""Scoring (ATMAN_SPEC §3), the result contract, and the Explainer orchestration."""

import json
import math

import jsonschema
import numpy as np
import pytest

from atman_vllm.core import (
    EXPLAIN_RESULT_SCHEMA,
    ExplainOptions,
    Explainer,
    ExplainRequest,
    ExplainResult,
    ForkResult,
    InvalidRequestError,
    Postprocessing,
    TargetGranularity,
    Unit,
    normalize_scores,
    plan_explanation,
    raw_deltas,
    score_explanations,
)
from fake_tokenizer import FakeTokenizer

CONTRACT_EXAMPLE = {
    "prompt": "Ben likes to eat burgers and",
    "target": " fries",
    "target_tokens": [{"text": " fries", "start": 0, "length": 6, "logprob": -1.72}],
    "explanations": [
        {"target": {"start": 0, "length": 6, "text": " fries"},
         "prompt_scores": [{"start": 0, "length": 3, "text": "Ben", "score": 0.12}],
         "target_scores": []}
    ],
    "options": {"factor": 0.1, "mode": "log-additive", "kappa": None, "granularity": "token",
                "target_granularity": "complete", "postprocessing": "none", "normalize": False},
    "stats": {"perturbations": 6, "forward_passes": 7, "computed_tokens": 49, "cached_tokens": 0, "elapsed_s": 0.41},
    "target_boundary": {"aligned": True, "prompt_chars": 0, "note": ""},
}


class LinearToyExplainer(Explainer):
    """A stand-in *model* with known arithmetic, to test the orchestration around run_jobs.

    CE_t = base_t + sum over perturbed keys k visible to target t of
    weight[k] * (-log f_k): suppressing (f < 1) key k raises the loss of every
    later target token by weight[k] per nat of suppression.
    """

    def __init__(self, weights, base=1.0):
        self.tokenizer = FakeTokenizer()
        self.weights = weights  # position -> weight
        self.base = base
        self.calls = []

    def run_jobs(self, jobs):
        self.calls.append(len(jobs))
        out = []
        for job in jobs:
            ce = np.full(job.num_targets, self.base)
            if job.bias is not None:
                for p, f in zip(job.bias.positions, job.bias.factors):
                    visible = np.arange(job.num_targets) + job.target_start > p  # causal
                    ce += visible * self.weights.get(p, 0.0) * -math.log(f)
            first = job.bias.first_position if job.bias else 0
            out.append(ForkResult(ce, computed_tokens=len(job.token_ids) - first, cached_tokens=first))
        return out


def test_delta_sign_positive_when_suppression_raises_the_loss():
    assert raw_deltas(np.array([1.0, 2.0]), np.array([[1.5, 2.0], [0.5, 3.0]])).tolist() == [[0.5, 0.0], [-0.5, 1.0]]


def _units(n, region="prompt", first=1):
    return [Unit(i, 1, "abcdefgh"[i], (first + i,), region) for i in range(n)]


def test_complete_granularity_averages_over_target_tokens():
    deltas = np.array([[1.0, 3.0], [-2.0, 0.0]])
    (exp,) = score_explanations(_units(2), [], "xy", [(0, 1), (1, 2)], 3, deltas,
                                TargetGranularity.COMPLETE, Postprocessing.NONE, False)
    assert [s.score for s in exp.prompt_scores] == [2.0, -1.0]
    assert (exp.target.start, exp.target.length, exp.target.text) == (0, 2, "xy") and exp.target_scores == ()


def test_token_granularity_explains_each_target_token_and_target_units_only_score_later_tokens():
    # 2 prompt units (positions 1, 2); target tokens at 3, 4, 5; target units = target tokens 0 and 1.
    deltas = np.array([[1.0, 2.0, 3.0],
                       [4.0, 5.0, 6.0],
                       [7.0, 8.0, 9.0],     # target unit 0 (position 3)
                       [10.0, 11.0, 12.0]])  # target unit 1 (position 4)
    t_units = [Unit(0, 1, "x", (3,), "target"), Unit(1, 1, "y", (4,), "target")]
    exps = score_explanations(_units(2), t_units, "xyz", [(0, 1), (1, 2), (2, 3)], 3, deltas,
                              TargetGranularity.TOKEN, Postprocessing.NONE, False)
    assert [e.target.text for e in exps] == ["x", "y", "z"]
    assert [[s.score for s in e.prompt_scores] for e in exps] == [[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]]
    assert [[(s.text, s.score) for s in e.target_scores] for e in exps] == [[], [("x", 8.0)], [("x", 9.0), ("y", 12.0)]]


@pytest.mark.parametrize("how, expected", [
    (Postprocessing.NONE, [-2.0, 1.0, 0.5]),
    (Postprocessing.ABSOLUTE, [2.0, 1.0, 0.5]),
    (Postprocessing.SQUARE, [4.0, 1.0, 0.25]),
])
def test_postprocessing(how, expected):
    (exp,) = score_explanations(_units(3), [], "x", [(0, 1)], 4, np.array([[-2.0], [1.0], [0.5]]),
                                TargetGranularity.COMPLETE, how, False)
    # Exact: abs and square of these small dyadic floats (and a mean over one token) round nothing.
    assert [s.score for s in exp.prompt_scores] == expected


def test_normalize_is_min_max_after_postprocessing_over_prompt_and_target_scores():
    (exp,) = score_explanations(_units(3), [], "x", [(0, 1)], 4, np.array([[-2.0], [1.0], [0.5]]),
                                TargetGranularity.COMPLETE, Postprocessing.ABSOLUTE, True)
    assert [s.score for s in exp.prompt_scores] == pytest.approx([1.0, 1 / 3, 0.0])
    deltas = np.array([[0.0, 1.0], [0.0, 3.0], [0.0, 5.0]])  # last row: target unit 0
    exps = score_explanations(_units(2), [Unit(0, 1, "x", (3,), "target")], "xy", [(0, 1), (1, 2)], 3, deltas,
                              TargetGranularity.TOKEN, Postprocessing.NONE, True)
    # Exact: (x - 1) / 4 of 1, 3 and 5 is 0, 0.5 and 1 in binary floating point.
    assert [s.score for s in exps[1].prompt_scores] == [0.0, 0.5] and exps[1].target_scores[0].score == 1.0


def test_normalize_all_equal_and_single_scores_without_dividing_by_zero():
    # Exact: scores without a ranking are set to 0.0, not computed.
    with np.errstate(all="raise"):
        assert normalize_scores(np.array([0.3, 0.3, 0.3])).tolist() == [0.0, 0.0, 0.0]
        assert normalize_scores(np.array([-4.0])).tolist() == [0.0]
        (exp,) = score_explanations(_units(1), [], "x", [(0, 1)], 2, np.array([[0.7]]),
                                    TargetGranularity.COMPLETE, Postprocessing.NONE, True)
    assert [s.score for s in exp.prompt_scores] == [0.0]


def test_single_unit_without_normalize_keeps_its_raw_score():
    (exp,) = score_explanations(_units(1), [], "x", [(0, 1)], 2, np.array([[0.7]]),
                                TargetGranularity.COMPLETE, Postprocessing.NONE, False)
    assert exp.prompt_scores[0].score == 0.7  # exact: the mean of one value is that value


def test_no_units_or_mismatched_deltas_are_rejected():
    with pytest.raises(ValueError, match="at least one prompt unit"):
        score_explanations([], [], "x", [(0, 1)], 1, np.zeros((0, 1)), TargetGranularity.COMPLETE,
                           Postprocessing.NONE, False)
    with pytest.raises(ValueError, match="shape"):
        score_explanations(_units(2), [], "x", [(0, 1)], 3, np.zeros((3, 1)), TargetGranularity.COMPLETE,
                           Postprocessing.NONE, False)


def test_plan_has_the_unperturbed_run_first_then_one_job_per_unit():
    req = ExplainRequest("Ben likes to eat burgers and", " fries ok",
                         ExplainOptions(granularity="word", target_granularity="token", factor=0.2))
    plan = plan_explanation(req, FakeTokenizer())
    assert plan.options.granularity.value == "word"
    assert len(plan.units) == 6 and len(plan.target_units) == 1 and len(plan.jobs) == 8
    assert plan.jobs[0].bias is None
    assert [j.bias.positions for j in plan.jobs[1:]] == [(1,), (2,), (3,), (4,), (5,), (6,), (7,)]
    # bias.factors: the option's factor, copied (exact).
    assert all(j.bias.factors == (0.2,) and j.target_start == 7 and j.token_ids == plan.jobs[0].token_ids
               for j in plan.jobs[1:])


def test_explain_end_to_end_with_a_toy_model():
    # Prompt tokens at 1..6 ("Ben" " likes" " to" " eat" " burgers" " and"), target " fries" " and" at 7, 8.
    model = LinearToyExplainer({5: 1.0, 2: 0.25, 7: 2.0})
    result = model.explain("Ben likes to eat burgers and", " fries and", granularity="token",
                           target_granularity="token")
    d = -math.log(0.1)
    assert [e.target.text for e in result.explanations] == [" fries", " and"]
    first, second = result.explanations
    assert [s.score for s in first.prompt_scores] == pytest.approx([0, 0.25 * d, 0, 0, d, 0])
    assert first.target_scores == () and [(s.text, s.score) for s in second.target_scores] == [(" fries", pytest.approx(2 * d))]
    # The toy model's logprob is a constant it returns, not a computation: exact.
    assert [(t.text, t.start, t.length, t.logprob) for t in result.target_tokens] == [(" fries", 0, 6, -1.0), (" and", 6, 4, -1.0)]
    st = result.stats
    assert (st.perturbations, st.forward_passes) == (7, 8)
    assert st.computed_tokens + st.cached_tokens == 8 * 9 and st.cached_tokens == sum(range(1, 8))
    assert st.elapsed_s >= 0
    jsonschema.validate(result.to_dict(), EXPLAIN_RESULT_SCHEMA)


def test_explain_many_runs_every_job_in_one_call_and_matches_single_explains():
    model = LinearToyExplainer({1: 1.0, 3: 0.5})
    reqs = [ExplainRequest("Ben likes to eat", " fries"),
            ExplainRequest("one two. three four.", " five", ExplainOptions(granularity="sentence", normalize=True))]
    batch = model.explain_many(reqs)
    assert model.calls == [5 + 3]
    single = [model.explain(r.prompt, r.target, r.options) for r in reqs]
    for b, s in zip(batch, single):
        assert b.explanations == s.explanations and b.options == s.options


def test_explain_option_keywords_and_unknown_option():
    model = LinearToyExplainer({})
    res = model.explain("a b", " c", ExplainOptions(factor=0.5), granularity="word", spans=None)
    assert res.options.factor == 0.5 and res.options.granularity.value == "word"  # passed through, exact
    with pytest.raises(InvalidRequestError) as e:
        model.explain("a b", " c", facter=0.5)
    assert e.value.field == "facter"
    with pytest.raises(InvalidRequestError) as e:
        model.explain("a b", " c", factor=0)
    assert e.value.field == "factor"


def test_finish_rejects_results_that_do_not_match_the_plan():
    plan = plan_explanation(ExplainRequest("a b", " c d"), FakeTokenizer())
    ok = [ForkResult(np.zeros(2), 4)] * len(plan.jobs)
    plan.finish(ok, 0.0)
    with pytest.raises(ValueError, match="results for"):
        plan.finish(ok[:-1], 0.0)
    with pytest.raises(ValueError, match="expected 2"):
        plan.finish([ForkResult(np.zeros(3), 4)] * len(plan.jobs), 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        plan.finish([ForkResult(np.array([0.0, np.nan]), 4)] * len(plan.jobs), 0.0)


def test_contract_example_validates_and_round_trips():
    jsonschema.validate(CONTRACT_EXAMPLE, EXPLAIN_RESULT_SCHEMA)
    assert ExplainResult.from_dict(CONTRACT_EXAMPLE).to_dict() == CONTRACT_EXAMPLE


def test_result_round_trips_through_json_with_resolved_options():
    model = LinearToyExplainer({2: 1.0})
    result = model.explain("Ben likes; to eat", " fries x", granularity="custom", delimiter=";",
                           target_granularity="token", postprocessing="square", normalize=True)
    d = json.loads(json.dumps(result.to_dict()))
    jsonschema.validate(d, EXPLAIN_RESULT_SCHEMA)
    assert d["options"]["granularity"] == "custom" and d["options"]["delimiter"] == ";"
    assert ExplainResult.from_dict(d) == result
    auto = model.explain("Ben likes to eat", " fries").to_dict()
    assert auto["options"]["granularity"] == "token"  # auto is reported as what it resolved to
    spans = model.explain("Ben likes to eat", " fries", spans=[(0, 3)]).to_dict()
    assert spans["options"]["granularity"] == "spans" and spans["options"]["spans"] == [[0, 3]]
    jsonschema.validate(spans, EXPLAIN_RESULT_SCHEMA)


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("stats"),
    lambda d: d.update(extra=1),
    lambda d: d["options"].update(granularity="auto"),
    lambda d: d["explanations"][0]["prompt_scores"][0].pop("score"),
    lambda d: d["target_tokens"][0].update(start=-1),
    lambda d: d["explanations"].clear(),
])
def test_schema_rejects_contract_violations(mutate):
    d = json.loads(json.dumps(CONTRACT_EXAMPLE))
    mutate(d)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, EXPLAIN_RESULT_SCHEMA)
