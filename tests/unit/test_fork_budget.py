"""The engine-wide fork token budget: never more in flight than the cap, a fork bigger than
the cap runs alone, and a cancelled waiter gives nothing back it did not take."""

from __future__ import annotations

import asyncio

import pytest

from atman_vllm.core import ForkJob, KeyBias
from atman_vllm.vllm.forks import ForkBudget, fork_cost


def test_fork_cost_counts_from_the_first_perturbed_block():
    ids = tuple(range(100))
    assert fork_cost(ForkJob(ids, 90), 32) == 100
    assert fork_cost(ForkJob(ids, 90, KeyBias((40, 70), (0.1, 0.1))), 32) == 100 - 32
    assert fork_cost(ForkJob(ids, 90, KeyBias((5,), (0.1,))), 32) == 100


def test_budget_caps_what_is_in_flight():
    budget = ForkBudget(100)
    peak = 0

    async def fork(tokens: int):
        nonlocal peak
        async with budget.hold(tokens):
            peak = max(peak, budget.in_use)
            assert budget.in_use <= 100
            await asyncio.sleep(0.01)

    async def main():
        await asyncio.gather(*(fork(t) for t in (60, 60, 30, 250, 10, 90)))

    asyncio.run(main())
    assert peak == 100 and budget.in_use == 0  # 250 ran alone, clipped to the whole budget


def test_cancelled_waiter_leaves_the_budget_whole():
    budget = ForkBudget(10)

    async def main():
        async with budget.hold(10):
            waiter = asyncio.ensure_future(budget.hold(5).__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        assert budget.in_use == 0

    asyncio.run(main())


def test_no_budget_means_no_wait():
    budget = ForkBudget(None)

    async def main():
        async with budget.hold(10**9):
            assert budget.in_use == 0

    asyncio.run(main())
    with pytest.raises(ValueError):
        ForkBudget(0)
