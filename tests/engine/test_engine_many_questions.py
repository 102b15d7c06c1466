"""Many questions, one document: later questions reuse the perturbed document blocks of earlier forks.

A fork suppressing a document unit computes the same KV for the document's blocks whatever question
follows (attention is causal), and those blocks get the same prefix-cache keys (``wire.py:
block_hash_keys``: the bias entries inside each block). So the second question's fork of a unit
finds the first question's blocks cached, in one ``explain_many`` call (the forks of one unit run
side by side: ``parallel.fork_waves``) and across calls while the KV cache holds them.
"""

from __future__ import annotations

import torch

from atman_vllm.core import ExplainOptions, ExplainRequest
from tolerances import assert_close

BLOCK = 32  # ENGINE_ARGS block_size
DOCUMENT = ("Otto lives in Lisbon and works as a baker. Mira lives in Oslo. She flies planes for a living. "
            "The quick brown fox jumps over the lazy dog, twice, while the cat sleeps on the warm mat. "
            "Every morning Ben eats burgers with fries and drinks a cup of black coffee before work.\n")
QUESTIONS = (("Q: Where does Otto live? A:", " Lisbon."), ("Q: What does Mira fly? A:", " planes."),
             ("Q: What does Ben drink? A:", " coffee."))


def _requests(tag: str, **options) -> list[ExplainRequest]:
    # ``tag`` makes the document one no other test sends, so nothing of it is cached before.
    return [ExplainRequest(f"{tag}. {DOCUMENT}{q}", t, ExplainOptions(**options)) for q, t in QUESTIONS]


def _shared(plan, other) -> int:
    """Leading tokens of ``plan``'s sequence that ``other``'s runs computed in blocks others may share:
    their common prefix, up to ``other``'s first target-scoring position (those blocks are private)."""
    a, b = plan.encoded.token_ids, other.encoded.token_ids
    common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return min(common, other.encoded.target_start - 1)


def _first_difference(a, b) -> float:
    """The first position where two biases' entries differ (inf: equal)."""
    ea, eb = set(zip(a.positions, a.factors)), set(zip(b.positions, b.factors))
    return min((p for p, _ in ea ^ eb), default=float("inf")) if a.mode == b.mode else 0


def _expected_cached(llm, requests: list[ExplainRequest]) -> list[int]:
    """Cached tokens of each request when every earlier one ran first and stayed cached.

    A fork of request k reads its own unperturbed prefix (the blocks before its first perturbed
    block) and every whole block that an earlier request's fork computed over the same tokens with
    the same bias entries up to the block's end; no block at or after its first target-scoring
    position."""
    plans = [llm.plan(r) for r in requests]
    out = []
    for k, plan in enumerate(plans):
        ts = plan.encoded.target_start
        base = max((_shared(plan, o) for o in plans[:k]), default=0)
        total = BLOCK * (min(base, ts - 1) // BLOCK)  # the unperturbed pass
        for job in plan.jobs[1:]:
            reach = max([job.bias.first_position,
                         *[min(_first_difference(job.bias, j.bias), _shared(plan, o))
                           for o in plans[:k] for j in o.jobs[1:]]])
            total += BLOCK * (min(reach, ts - 1) // BLOCK)
        out.append(total)
    return out


def _scores(result):
    return [s.score for e in result.explanations for s in (*e.prompt_scores, *e.target_scores)]


def _assert_equals_cold(llm, warm, request, what):
    """``warm`` equals the request explained from an empty prefix cache, within 1e-4."""
    assert llm.llm.reset_prefix_cache()
    cold = llm.explain(request.prompt, request.target, request.options)
    assert warm.stats.cached_tokens > cold.stats.cached_tokens, f"{what}: no reuse to compare against"
    scale = max(abs(t.logprob) for t in cold.target_tokens)
    assert_close(_scores(warm), _scores(cold), torch.float32, scale=scale, bound=1e-4, what=what)
    return cold


def test_explain_many_reuses_the_document_blocks_of_the_first_question(engines):
    llm = engines["llama"]
    requests = _requests("Many questions in one call", granularity="token")
    expected = _expected_cached(llm, requests)
    results = llm.explain_many(requests)

    assert [r.stats.cached_tokens for r in results] == expected
    plan = llm.plan(requests[1])
    cold_cached = BLOCK * sum(min(j.bias.first_position, plan.encoded.target_start - 1) // BLOCK
                              for j in plan.jobs[1:])
    assert expected[1] > cold_cached + 10 * BLOCK, "the check above must tell reuse apart"
    # The later questions compute only their question, target and the blocks the document shares
    # with it: well under half of the first question's tokens at this length (4 document blocks).
    for r in results[1:]:
        assert r.stats.computed_tokens < 0.5 * results[0].stats.computed_tokens
    for k in (1, 2):
        _assert_equals_cold(llm, results[k], requests[k], f"question {k}")


def test_a_later_call_reuses_an_earlier_calls_document_blocks(engines):
    llm = engines["llama"]
    requests = _requests("Many questions across calls", granularity="word")
    expected = _expected_cached(llm, requests[:2])
    first = llm.explain(requests[0].prompt, requests[0].target, requests[0].options)
    second = llm.explain(requests[1].prompt, requests[1].target, requests[1].options)
    assert [first.stats.cached_tokens, second.stats.cached_tokens] == expected
    _assert_equals_cold(llm, second, requests[1], "second call")


def test_correlated_suppression_still_reuses_the_document_blocks(engines):
    # kappa adds correlated positions in the question and target too; they lie in later blocks, whose
    # keys alone they change, so the document blocks are still shared.
    llm = engines["llama"]
    requests = _requests("Many questions with kappa", granularity="word", kappa=0.6)[:2]
    plans = [llm.plan(r) for r in requests]
    doc_end = len(llm.plan(ExplainRequest(requests[0].prompt.split("Q:")[0], " x")).encoded.token_ids) - 2
    differ = [a.bias != b.bias for a, b in zip(plans[0].jobs[1:], plans[1].jobs[1:])
              if a.bias.first_position < doc_end]
    assert any(differ), "kappa must reach into the question for this test to mean anything"
    expected = _expected_cached(llm, requests)
    results = llm.explain_many(requests)
    # At least (forks of one request may share early blocks with each other too, e.g. two units
    # whose correlated sets agree there); with one key for the whole bias it is 21 % less here.
    assert results[1].stats.cached_tokens >= expected[1]
    _assert_equals_cold(llm, results[1], requests[1], "kappa question 1")
