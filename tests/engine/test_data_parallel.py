"""Data-parallel fan-out (issue 16): one explanation's forks over two CPU replicas of vLLM's DP engine.

A dense model under ``data_parallel_size=2`` is two independent engine cores behind one AsyncLLM
(vLLM's internal load balancer); ``AsyncAtmanLLM`` pins each fork to the replica ``fork_waves``
chose (``data_parallel_rank``). Checked here: the scores equal one replica's, each replica ran the
unperturbed pass once (it is computed twice, with no cached tokens on the second replica), each
replica holds in its prefix cache exactly the blocks of the forks assigned to it, and an
explanation cancelled mid-way gives every block of both replicas back.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from atman_vllm.core import ExplainOptions, ExplainRequest
from tolerances import assert_close

from .conftest import ENGINE_ARGS, cancel_mid_explain, multiprocess_engine

REPLICAS = 2
# Unique to this module (the session's engines must not have its blocks cached): ~100 tokens,
# several 32-token blocks.
PROMPT = ("Anna keeps bees on a hill near Graz and sells honey at the Saturday market. Her brother Karl "
          "repairs bicycles in Linz. In winter both of them ski in the mountains above Innsbruck, and in "
          "summer they swim in the cold lakes. Anna keeps bees near")
TARGET = " Graz."
OTHER = PROMPT.replace("Anna", "Greta").replace("Karl", "Paul")


@pytest.fixture(scope="module")
def dp_llm(tiny_models):
    from atman_vllm.api import AsyncAtmanLLM

    loop = asyncio.new_event_loop()
    with multiprocess_engine():
        llm = AsyncAtmanLLM.from_engine_args(str(tiny_models["llama"]), data_parallel_size=REPLICAS, **ENGINE_ARGS)
    yield llm, loop
    llm.shutdown()
    loop.run_until_complete(asyncio.sleep(0.1))  # lets the cancelled output handler finish on its loop
    loop.close()


def _scores(result):
    return [s.score for e in result.explanations for s in e.prompt_scores]


def test_forks_fan_out_over_replicas_and_equal_one_replica(dp_llm, engines):
    from atman_vllm.vllm.forks import fork_cost
    from atman_vllm.vllm.parallel import fork_waves

    llm, loop = dp_llm
    assert llm.replicas == REPLICAS
    request = ExplainRequest(PROMPT, TARGET, ExplainOptions(granularity="token"))
    plan = llm.plan(request)
    block = llm.vllm_config.cache_config.block_size
    first, forks = fork_waves(plan.jobs, REPLICAS, block)
    assert {r.replica for r in forks} == set(range(REPLICAS)), "both replicas get forks"
    assert {r.replica for r in first} == set(range(REPLICAS)), "each replica runs the unperturbed pass"

    async def run():
        before = await llm.engine.engine_core.call_utility_all_async("atman_cached_blocks")
        result = await llm.explain(request, plan=plan)
        after = await llm.engine.engine_core.call_utility_all_async("atman_cached_blocks")
        return result, [a - b for a, b in zip(after, before)]

    got, new_blocks = loop.run_until_complete(run())
    want = engines["llama"].explain(PROMPT, TARGET, ExplainOptions(granularity="token"))

    # Forks batched differently on two engines: float32 rounding of the cross-entropies.
    ce_scale = max(abs(t.logprob) for t in want.target_tokens)
    assert_close([t.logprob for t in got.target_tokens], [t.logprob for t in want.target_tokens], torch.float32,
                 what="DP target logprobs")
    assert_close(_scores(got), _scores(want), torch.float32, scale=ce_scale, what="DP scores")

    # Token accounting: the unperturbed pass in full on each (fresh) replica, every fork from its
    # first perturbed block on: its replica holds the prefix.
    length = len(plan.jobs[0].token_ids)
    fork_tokens = sum(fork_cost(plan.jobs[r.job], block) for r in forks)
    assert got.stats.computed_tokens == REPLICAS * length + fork_tokens
    assert got.stats.cached_tokens == sum(len(plan.jobs[r.job].token_ids) for r in forks) - fork_tokens
    assert got.stats.forward_passes == len(plan.jobs)

    # Each replica's prefix cache gained the unperturbed pass's full blocks and, per fork run there,
    # the full blocks from its first perturbed block on (the bias is part of their hash).
    expected = [length // block + sum(length // block - plan.jobs[r.job].bias.first_position // block
                                      for r in forks if r.replica == replica)
                for replica in range(REPLICAS)]
    print(f"new cached blocks per replica: {new_blocks}, expected {expected}; stats {got.stats}")
    assert new_blocks == expected


def test_cancelled_explain_frees_every_replicas_blocks(dp_llm):
    llm, loop = dp_llm

    before, after, progress = loop.run_until_complete(
        cancel_mid_explain(llm, ExplainRequest(OTHER * 3, TARGET, ExplainOptions(granularity="token"))))
    assert progress[-1][0] < progress[-1][1], "the explain finished before it could be cancelled"
    assert before["total"] == sum(s["total"] for s in
                                  loop.run_until_complete(llm.engine.engine_core.call_utility_all_async(
                                      "atman_kv_block_stats")))
    assert after == before
