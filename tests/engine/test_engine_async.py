"""The asynchronous API (the server's engine): concurrency and aborts."""

from __future__ import annotations

import asyncio

import pytest
import torch

from atman_vllm.core import ExplainOptions, ExplainRequest
from tolerances import assert_close

from .conftest import cancel_mid_explain, multiprocess_engine
from .texts import LONG, SHORT


@pytest.fixture(scope="module")
def async_llm(tiny_models):
    """AsyncLLM always runs its engine core in a separate process."""
    from atman_vllm.api import AsyncAtmanLLM

    loop = asyncio.new_event_loop()
    with multiprocess_engine():
        llm = AsyncAtmanLLM.from_engine_args(str(tiny_models["llama"]), enforce_eager=True, dtype="float32",
                                             max_model_len=1024, kv_cache_memory_bytes=128 << 20)
    yield llm, loop
    llm.shutdown()
    loop.close()


def _flat(result):
    return [s.score for e in result.explanations for s in (*e.prompt_scores, *e.target_scores)]


def _assert_same_scores(got, want, what):
    # Concurrent requests share batches (other GEMM shapes): equal up to float32 rounding of the
    # cross-entropies the scores are differences of.
    assert [(t.text, t.start) for t in got.target_tokens] == [(t.text, t.start) for t in want.target_tokens]
    assert_close([t.logprob for t in got.target_tokens], [t.logprob for t in want.target_tokens], torch.float32,
                 what=f"{what} target logprobs")
    assert_close(_flat(got), _flat(want), torch.float32, scale=max(abs(t.logprob) for t in want.target_tokens),
                 what=f"{what} scores")


def test_concurrent_explains_and_generation_equal_sequential(async_llm):
    llm, loop = async_llm
    a = ExplainRequest(SHORT, " Lisbon.", ExplainOptions(granularity="token"))
    b = ExplainRequest(LONG, " Lisbon.", ExplainOptions(granularity="word", mode="multiplicative"))

    async def generate():
        text = ""
        async for delta in llm.generate("Ben likes to eat", max_tokens=12):
            text = delta.completion_text
        return text

    async def sequential():
        return await llm.explain(a), await llm.explain(b), await generate()

    async def concurrent():
        return await asyncio.gather(llm.explain(a), llm.explain(b), generate())

    seq = loop.run_until_complete(sequential())
    con = loop.run_until_complete(concurrent())
    _assert_same_scores(con[0], seq[0], "token")
    _assert_same_scores(con[1], seq[1], "word")
    assert con[2] == seq[2] and con[2]


def test_cancelled_explain_frees_its_blocks(async_llm):
    llm, loop = async_llm

    before, after, progress = loop.run_until_complete(
        cancel_mid_explain(llm, ExplainRequest(LONG * 3, " Lisbon.", ExplainOptions(granularity="token"))))
    assert progress[-1][0] < progress[-1][1], "the explain finished before it could be cancelled"
    assert after == before


def test_explain_many_shares_the_document_across_questions(async_llm):
    # The async twin of test_engine_many_questions: one call, the same lockstep steps; the second
    # question reads the first's perturbed document blocks and scores as when explained alone.
    llm, loop = async_llm
    document = "Async many questions. " + LONG.split("Q:")[0]
    requests = [ExplainRequest(document + "Q: Where does Otto live? A:", " Lisbon.", ExplainOptions(granularity="word")),
                ExplainRequest(document + "Q: Where does Mira live? A:", " Oslo.", ExplainOptions(granularity="word"))]
    progress = []
    together = loop.run_until_complete(llm.explain_many(requests, on_progress=lambda d, t: progress.append((d, t))))
    assert progress[-1][0] == progress[-1][1] == sum(r.stats.forward_passes for r in together)
    alone = loop.run_until_complete(llm.explain(requests[1]))  # its document forks are cached now as well
    # Each fork of the second question reuses at least the document's first 3 blocks (~110 tokens
    # of document): far more than its own unperturbed prefix would give.
    plan = loop.run_until_complete(llm.plan_async(requests[1]))
    own_prefix = sum(32 * (j.bias.first_position // 32) for j in plan.jobs[1:])
    assert together[1].stats.cached_tokens >= own_prefix + 32 * 2 * sum(
        1 for j in plan.jobs[1:] if j.bias.first_position < 64)
    _assert_same_scores(together[1], alone, "second question")
    _assert_same_scores(together[0], loop.run_until_complete(llm.explain(requests[0])), "first question")
