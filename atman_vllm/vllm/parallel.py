"""Scale-out: vLLM's parallel settings on CPU, and which data-parallel replica runs which fork.

Two things vLLM does not decide for an explanation:

- **CPU thread binding.** With more than one worker process on CPU (tensor,
  pipeline or data parallel), vLLM's default ``VLLM_CPU_OMP_THREADS_BIND=auto``
  binds rank N to NUMA node N and refuses when there are fewer nodes than ranks
  (a one-socket machine with TP=2). When the user set no binding,
  ``cpu_thread_binding`` gives each local rank its own contiguous range
  of the cores this process may use ("0|1" for two ranks on two cores) and logs
  it, while the engine starts: vLLM reads the variable in the engine and worker
  processes it spawns, which inherit this process's environment
  (docs/vllm_touchpoints.md).
- **Replica assignment.** ``fork_waves`` spreads an explanation's fork
  jobs over ``data_parallel_size`` replicas so that each replica runs the
  unperturbed pass once and a contiguous range of forks: forks ordered by their
  first perturbed position share the longest prefixes with each other, so the
  prefix-cache blocks a replica holds serve its own forks (docs/scale_out.md).
  One code path: with one replica ``fork_waves`` is the plain two-wave order.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from atman_vllm.core import ForkJob

log = logging.getLogger(__name__)

BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def local_ranks(engine_kwargs: dict) -> int:
    """Worker processes one node runs for these engine arguments (vLLM's rank order is DP x PP x TP)."""
    return (int(engine_kwargs.get("tensor_parallel_size") or 1)
            * int(engine_kwargs.get("pipeline_parallel_size") or 1)
            * int(engine_kwargs.get("data_parallel_size") or 1))


def _cpu_range(cpus: Sequence[int]) -> str:
    """"3" or "2-5" for contiguous ids, "1,4" otherwise (vLLM's id-list syntax)."""
    if len(cpus) > 1 and list(cpus) == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(str(c) for c in cpus)


def cpu_thread_binding_for(ranks: int, cpus: Sequence[int]) -> str:
    """One contiguous share of ``cpus`` per rank, "|"-separated: (2, [0, 1]) -> "0|1".

    With fewer cores than ranks, ranks share cores round-robin (slow, but it runs).
    """
    if ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    cpus = sorted(cpus)
    if len(cpus) < ranks:
        return "|".join(str(cpus[r % len(cpus)]) for r in range(ranks))
    per, extra = divmod(len(cpus), ranks)
    shares, start = [], 0
    for r in range(ranks):
        n = per + (1 if r < extra else 0)
        shares.append(_cpu_range(cpus[start:start + n]))
        start += n
    return "|".join(shares)


@contextmanager
def cpu_thread_binding(engine_kwargs: dict) -> Iterator[str | None]:
    """While an engine starts: on CPU with more than one rank and no binding set, one core range per
    rank (logged); yields what was set. The variable is restored afterwards: vLLM reads it in the
    processes it spawns while the engine starts, and a later engine of another size in this process
    must not inherit a binding for the wrong number of ranks (vLLM asserts the count)."""
    from vllm.platforms import current_platform

    ranks = local_ranks(engine_kwargs)
    if ranks <= 1 or os.environ.get(BIND_ENV) or not current_platform.is_cpu():
        yield None
        return
    binding = cpu_thread_binding_for(ranks, sorted(os.sched_getaffinity(0)))
    log.warning("atman: %s was not set; %d CPU ranks bound as %s=%r (vLLM's 'auto' wants one NUMA node per "
                "rank). Set it yourself to choose another binding.", BIND_ENV, ranks, BIND_ENV, binding)
    os.environ[BIND_ENV] = binding
    try:
        yield binding
    finally:
        os.environ.pop(BIND_ENV, None)


@dataclass(frozen=True)
class ForkRun:
    """One engine request of an explanation: ``jobs[job]`` on data-parallel replica ``replica``
    (None: the engine's own choice, i.e. no data parallelism). A run that is not ``primary``
    repeats the unperturbed job on another replica only to put its prefix blocks into that
    replica's cache; its cost adds to the job's computed tokens, its scores are not used."""

    job: int
    replica: int | None
    primary: bool = True


def fork_waves(jobs: Sequence[ForkJob], replicas: int = 1, block_size: int = 1) -> tuple[list[ForkRun], list[ForkRun]]:
    """The explanation's runs in two waves: the unperturbed pass(es), then every fork, in the order
    of their first perturbed position.

    With ``replicas`` > 1 the forks are grouped by their first perturbed KV block (the forks of
    one group reuse the same cached prefix), the groups ordered by position and cut into
    ``replicas`` contiguous ranges of about equal cost (``fork_cost``: an early fork recomputes
    more than a late one, so equal counts would not be equal work). The unperturbed job runs once
    on every replica that got forks, its primary run on the first of them, so each replica's
    forks find their prefix in that replica's own cache.
    """
    from .forks import fork_cost

    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    unperturbed = [i for i, j in enumerate(jobs) if j.bias is None]
    # Forks by first perturbed position (stable): in ``explain_many`` over one document, the forks
    # suppressing the same document unit under different questions are then submitted next to each
    # other, so the later ones find the first one's perturbed document blocks in the prefix cache
    # while they are hot; those blocks need to stay cached for about one fork's time, not a call's.
    forks = sorted((i for i, j in enumerate(jobs) if j.bias is not None), key=lambda i: (jobs[i].bias.first_position, i))
    if replicas == 1:
        return [ForkRun(i, None) for i in unperturbed], [ForkRun(i, None) for i in forks]
    groups: dict[int, list[int]] = {}
    for i in forks:
        groups.setdefault(jobs[i].bias.first_position // block_size, []).append(i)
    costs = [sum(fork_cost(jobs[i], block_size) for i in g) for g in groups.values()]
    total = sum(costs)
    second, before = [], 0
    for group, cost in zip(groups.values(), costs):
        # The replica whose share of the total cost holds this group's midpoint.
        replica = min(replicas - 1, int(replicas * (before + cost / 2) / total))
        second += [ForkRun(i, replica) for i in group]
        before += cost
    used = sorted({r.replica for r in second}) or [0]
    first = [ForkRun(i, replica, primary=(k == 0)) for i in unperturbed for k, replica in enumerate(used)]
    return first, second
