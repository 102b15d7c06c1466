"""One explanation as a sequence of steps, written once for every driver.

``explanation_steps`` is a generator: it yields what it needs done and
receives each step's answer. Its return value is the ``ExplainResult``:

- ``GenerateTarget``: the request has no target; answer with the token ids
  the model generates greedily after the prompt (those ids are scored, never
  a re-tokenized copy of their text);
- ``PlanRequest``: answer with the request's ``ExplainPlan`` (the async API
  plans on threads of its own, the sync API in place);
- ``RunForks``: the plan's forward passes; answer with their ``ForkResult``s
  in job order (the backend's ``run_jobs``: on vLLM the unperturbed pass
  first, so the forks find its KV blocks in the prefix cache). A
  hierarchical search (``core/hierarchical.py``) yields several, one per
  level it refines, each starting with the unperturbed pass.

The sync backends (``Explainer``: the reference, ``AtmanLLM``) and the async
one (``AsyncAtmanLLM``) only answer steps (``run_steps`` here, its async twin
in ``atman_vllm.api``), so the generate-then-explain path, planning and
scoring are written once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, Union

from .hierarchical import hierarchical_steps
from .jobs import ForkJob
from .options import Search
from .requests import ExplainRequest
from .results import ExplainResult


@dataclass(frozen=True)
class GenerateTarget:
    request: ExplainRequest
    max_tokens: int


@dataclass(frozen=True)
class PlanRequest:
    request: ExplainRequest


@dataclass(frozen=True)
class RunForks:
    jobs: tuple[ForkJob, ...]


Step = Union[GenerateTarget, PlanRequest, RunForks]
T = TypeVar("T")
Steps = Generator[Step, Any, T]


def explanation_steps(request: ExplainRequest, generate_tokens: int | None = None) -> Steps[ExplainResult]:
    """Explain ``request``. With ``generate_tokens`` and no target (nor target ids), explain the
    greedy completion of up to that many tokens instead; without it an empty target is an error."""
    started = time.perf_counter()
    if generate_tokens is not None and not request.target and request.target_token_ids is None:
        generated = yield GenerateTarget(request, generate_tokens)
        request = replace(request, target="", target_token_ids=tuple(generated))
    plan = yield PlanRequest(request)
    if Search(plan.options.search) is Search.HIERARCHICAL:  # several rounds of forks
        return (yield from hierarchical_steps(plan, started))
    results = yield RunForks(tuple(plan.jobs))
    if len(results) != len(plan.jobs):
        raise ValueError(f"{len(plan.jobs)} jobs got {len(results)} results")
    return plan.finish(results, time.perf_counter() - started)


def lockstep_steps(steps: Sequence[Steps[T]]) -> Steps[list[T]]:
    """Several explanations' steps as one sequence (``explain_many``, sync and async): every
    request's steps before its first ``RunForks`` are passed through in request order (so all are
    planned, and an invalid one fails, before anything runs); then each round's ``RunForks`` of
    every request still running is merged into one, so the backend batches across requests (on
    vLLM, forks suppressing the same document unit under several questions run side by side:
    ``vllm/parallel.py: fork_waves``). A non-fork step a request asks for after its first round
    is passed through alone. Returns the results in request order."""
    out: list[Any] = [None] * len(steps)
    pending: dict[int, RunForks] = {}

    def until_forks(i: int, step: Step | None, answer: Any = None) -> Steps[None]:
        # Request i from ``step`` (None: send ``answer`` for its last step) to its next RunForks,
        # passing other steps through, or to its end.
        try:
            if step is None:
                step = steps[i].send(answer)
            while not isinstance(step, RunForks):
                step = steps[i].send((yield step))
            pending[i] = step
        except StopIteration as done:
            out[i] = done.value

    firsts = [next(s) for s in steps]  # every request's clock starts with the batch's
    for i, step in enumerate(firsts):
        yield from until_forks(i, step)
    while pending:
        order = sorted(pending)
        counts = [len(pending[i].jobs) for i in order]
        merged = yield RunForks(tuple(job for i in order for job in pending.pop(i).jobs))
        if len(merged) != sum(counts):
            raise ValueError(f"{len(merged)} results for {sum(counts)} jobs")
        starts = [sum(counts[:k]) for k in range(len(order))]
        for i, k, n in zip(order, starts, counts):
            yield from until_forks(i, None, list(merged[k:k + n]))
    return out


def run_steps(steps: Steps[T], answer: Callable[[Step], Any]) -> T:
    """Drive ``steps`` synchronously, answering each with ``answer``."""
    try:
        step = next(steps)
        while True:
            step = steps.send(answer(step))
    except StopIteration as done:
        return done.value


async def run_steps_async(steps: Steps[T], answer: Callable[[Step], Awaitable[Any]]) -> T:
    """``run_steps`` with an async ``answer``: the same steps, in the same order."""
    try:
        step = next(steps)
        while True:
            step = steps.send(await answer(step))
    except StopIteration as done:
        return done.value
