"""Back-pressure, deadlines and cancellation on a real server: a busy server
refuses at once, and every explain that ends early (cancelled, past its
deadline, or its HTTP client gone) gives back all its KV blocks."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import httpx
import pytest

from atman_vllm.client import AsyncAtmanClient, AtmanError, ExplainProgress, GenerationDelta

from .conftest import MAX_CONCURRENT_EXPLAINS
from .test_grpc_explain import assert_same_explanation

TARGET = " pilot"
SHORT_PROMPT = "Mira works as a pilot. Q: What is the job of Mira? A:"
REPEATED = "Otto lives in Lisbon. Mira works as a pilot. " * 40
SLOW_UNITS = 380  # token granularity over 380 tokens: 381 forks, seconds of work on this machine


@pytest.fixture(scope="module")
def slow_prompt(client) -> str:
    return REPEATED[:client.tokenize(REPEATED)[SLOW_UNITS].start]


def wait_until(client, predicate, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.server_info()
        if predicate(info):
            return info
        assert time.monotonic() < deadline, f"server never reached the expected state: {info}"
        time.sleep(0.05)


def wait_idle(client, free_blocks: int):
    """No explain running and every KV block free again."""
    return wait_until(client, lambda i: i.explains_in_flight == 0 and i.free_kv_blocks == free_blocks)


def logged_statuses(server, transport: str, until=lambda statuses: True, timeout_s: float = 15.0) -> list[str]:
    """The logged statuses of ``transport``'s calls, once ``until`` holds (the server's
    output reaches its log file through a pipe, a moment after the call ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = [json.loads(line)["status"] for line in server.request_log() if f'"transport": "{transport}"' in line]
        if until(statuses) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.1)


def test_busy_server_refuses_and_cancelled_explains_free_their_blocks(plain_server, client, slow_prompt):
    baseline = client.server_info().free_kv_blocks

    async def scenario():
        async with AsyncAtmanClient(plain_server.grpc, timeout=120) as aclient:
            running = [asyncio.create_task(aclient.explain(slow_prompt, TARGET, granularity="token"))
                       for _ in range(MAX_CONCURRENT_EXPLAINS)]
            # Wait until both hold their slots and their forks hold KV blocks (planning comes first).
            while not ((info := await aclient.server_info()).explains_in_flight == MAX_CONCURRENT_EXPLAINS
                       and info.free_kv_blocks < baseline):
                assert not any(t.done() for t in running), "an explain ended before the server was busy"
                await asyncio.sleep(0.02)
            with pytest.raises(AtmanError) as err:
                await aclient.explain(SHORT_PROMPT, TARGET)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry" in err.value.message
            assert not any(t.done() for t in running)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    asyncio.run(scenario())
    wait_idle(client, baseline)
    def logged_all(statuses):
        return "RESOURCE_EXHAUSTED" in statuses and statuses.count("CANCELLED") >= MAX_CONCURRENT_EXPLAINS

    assert logged_all(logged_statuses(plain_server, "grpc", until=logged_all))

    # A stream the caller stops reading after the first progress event is cancelled too.
    stream = client.explain_stream(slow_prompt, TARGET, granularity="token")
    assert isinstance(next(stream), ExplainProgress)
    stream.close()
    wait_idle(client, baseline)
    assert client.explain(SHORT_PROMPT, TARGET).explanations  # and the server still serves


def test_deadline_exceeded_aborts_every_fork(plain_server, client, slow_prompt):
    baseline = client.server_info().free_kv_blocks
    started = time.monotonic()
    with pytest.raises(AtmanError) as err:
        client.explain(slow_prompt, TARGET, granularity="token", timeout=0.5)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    wait_idle(client, baseline)
    assert logged_statuses(plain_server, "grpc", until=lambda st: st[-1:] == ["DEADLINE_EXCEEDED"])[-1] == "DEADLINE_EXCEEDED"


def test_http_client_that_disconnects_aborts_its_explain(plain_server, client, slow_prompt):
    baseline = client.server_info().free_kv_blocks
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"http://{plain_server.http}/v1/explain", timeout=httpx.Timeout(60, read=0.5),
                   json={"prompt": slow_prompt, "target": TARGET, "options": {"granularity": "token"}})
    wait_idle(client, baseline)
    assert logged_statuses(plain_server, "http", until=lambda st: st[-1:] == ["CANCELLED"])[-1] == "CANCELLED"


def test_explain_and_generate_run_concurrently(plain_server, client, slow_prompt):
    """Both are accepted and both answers are what each gives alone. (Whether the
    generation overtakes the explain's forks is the engine scheduler's choice:
    vLLM schedules first come, first served.)"""
    alone = [e for e in client.generate(SHORT_PROMPT, max_tokens=16) if isinstance(e, GenerationDelta)]

    async def scenario():
        async with AsyncAtmanClient(plain_server.grpc, timeout=120) as aclient:
            explain = asyncio.create_task(aclient.explain(slow_prompt, TARGET, granularity="token"))
            while (await aclient.server_info()).explains_in_flight < 1:
                await asyncio.sleep(0.02)
            deltas = [e async for e in aclient.generate(SHORT_PROMPT, max_tokens=16)]
            return deltas, await explain

    deltas, explained = asyncio.run(scenario())
    assert deltas[-1].completion_text == alone[-1].completion_text  # greedy: same text under load
    explained_alone = client.explain(slow_prompt, TARGET, granularity="token")
    assert explained.stats.perturbations == len(explained.explanations[0].prompt_scores) > SLOW_UNITS // 2
    assert_same_explanation(explained, explained_alone)
