"""Hierarchical search: score coarse units, then refine only the strongest (option ``search``).

Exhaustive AtMan runs one fork per unit: L + 1 forward passes for L token
units. Hierarchical search runs the units of a coarser level first
(paragraphs), then the children (sentences) of the strongest parents, then
the requested units inside the strongest sentences, within ``budget``
forward passes in all. A unit that gets a fork of its own has exactly the
score the exhaustive search gives it (the same fork); every other unit of
the requested granularity inherits its nearest scored ancestor's score and
says so (``SpanScore.refined`` / ``inherited_from``).

Each round is one ``RunForks`` step whose first job is the unperturbed pass
again: backends keep their contract (unperturbed first, so on vLLM the forks
find its blocks in the prefix cache, on every replica, even after
eviction), it is nearly free there (``cached_tokens``), and it is counted in
the budget and in ``forward_passes`` like any other pass. Scores use round
1's unperturbed cross-entropies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .jobs import ForkJob, ForkResult
from .options import Granularity, InvalidRequestError, Postprocessing
from .scoring import postprocess
from .units import Unit

if TYPE_CHECKING:  # planning imports this module
    from .planning import ExplainPlan
    from .results import ExplainResult
    from .steps import Steps

# Coarser levels, coarsest first, tried above the requested granularity.
_COARSER = (Granularity.PARAGRAPH, Granularity.SENTENCE)
_ORDER = (Granularity.TOKEN, Granularity.WORD, Granularity.SENTENCE, Granularity.PARAGRAPH)


@dataclass(frozen=True)
class SearchLevel:
    """The units of one coarser level, their forks, and each unit's parent in the level above."""

    granularity: Granularity
    units: tuple[Unit, ...]
    jobs: tuple[ForkJob, ...]  # one per unit
    parents: tuple[int, ...] | None  # index into the level above, per unit; None for the top level


def parent_indices(children: Sequence[Unit], parents: Sequence[Unit]) -> tuple[int, ...]:
    """The parent of each child: the coarser unit holding the child's first token. (Tokens join the
    segment they overlap most, so a child's tokens lie in one parent but for odd tokenizations;
    the first token decides then.)"""
    owner = {p: i for i, unit in enumerate(parents) for p in unit.positions}
    out, last = [], 0
    for child in children:
        last = owner.get(child.positions[0], last)  # a token no parent holds: the previous child's parent
        out.append(last)
    return tuple(out)


def search_levels(requested: Granularity, units: Sequence[Unit], budget: int,
                  level_units: Callable[[Granularity], list[Unit]],
                  make_job: Callable[[Unit], ForkJob]) -> tuple[SearchLevel, ...]:
    """The coarser levels to search above ``units`` (coarsest first); () when the exhaustive search
    fits in the budget, or when no coarser level splits the prompt any differently."""
    if len(units) + 1 <= budget:
        return ()
    chosen: list[list[Unit]] = []
    grans: list[Granularity] = []
    for g in _COARSER:
        if _ORDER.index(g) <= _ORDER.index(requested):
            continue
        candidate = level_units(g)
        # A level of one unit ranks nothing; one as fine as the next level below it adds nothing.
        if len(candidate) <= 1 or len(candidate) >= len(units):
            continue
        if chosen and len(candidate) <= len(chosen[-1]):
            continue
        chosen.append(candidate)
        grans.append(g)
    top, top_gran = (chosen[0], grans[0]) if chosen else (units, requested)
    if len(top) + 1 > budget:  # checked while planning, before any pass runs
        raise InvalidRequestError("budget", f"{budget} forward passes cannot score the {len(top)} "
                                            f"{top_gran.value} units of this prompt (at least {len(top) + 1} needed)")
    levels, above = [], None
    for g, level in zip(grans, chosen):
        parents = None if above is None else parent_indices(level, above)
        levels.append(SearchLevel(g, tuple(level), tuple(make_job(u) for u in level), parents))
        above = level
    return tuple(levels)


def _strength(ce: np.ndarray, base: np.ndarray, postprocessing: Postprocessing) -> np.ndarray:
    """How much each unit matters, as its reported score ranks it (before normalization)."""
    return postprocess((ce - base[None, :]).mean(axis=1), postprocessing)


def _select(strength: np.ndarray, children_of: dict[int, list[int]], cost_of: Callable[[int], int],
            share: int) -> list[int]:
    """Parents to refine, strongest first, while their children's forks fit in ``share``."""
    chosen = []
    for p in sorted(range(len(strength)), key=lambda i: (-strength[i], i)):
        if share <= 0:
            break
        cost = cost_of(p)
        if p in children_of and cost <= share:
            chosen.append(p)
            share -= cost
    return chosen


def hierarchical_steps(plan: "ExplainPlan", started: float) -> "Steps[ExplainResult]":
    """Run ``plan``'s search within ``plan.options.budget`` forward passes; return the result."""
    from .steps import RunForks  # steps imports this module

    budget = int(plan.options.budget)
    levels = list(plan.levels)
    base_job = plan.jobs[0]
    all_results: list[ForkResult] = []
    top = levels[0] if levels else None
    if top is None:  # the exhaustive search fits: every unit refined
        results = yield RunForks(tuple(plan.jobs))
        all_results += results
        ce = np.stack([_ce(r) for r in results])
        return plan.score(ce[0], ce[1:], all_results, time.perf_counter() - started, [None] * len(plan.units))
    results = yield RunForks((base_job, *top.jobs))
    all_results += results
    rounds = 1
    base = _ce(results[0])
    ce = np.stack([_ce(r) for r in results[1:]])
    # Per unit of the current level: None if it had its fork (or shares its parent's exact tokens
    # and fork), else the granularity whose fork it inherits.
    source: list[str | None] = [None] * len(top.units)
    above_units, above_gran = top.units, top.granularity
    below = [(lvl.granularity, lvl.units, lvl.jobs, lvl.parents) for lvl in levels[1:]]
    below.append((plan.options.granularity, plan.units, tuple(plan.jobs[1:]),
                  None))
    for k, (gran, units, jobs, parents) in enumerate(below):
        if parents is None:
            parents = parent_indices(units, above_units)
        levels_left = len(below) - k
        remaining = budget - len(all_results)
        forks_left = remaining - levels_left  # each remaining round also reruns the unperturbed pass
        share = forks_left if levels_left == 1 else forks_left // levels_left
        children_of: dict[int, list[int]] = {}
        for i, p in enumerate(parents):
            children_of.setdefault(p, []).append(i)

        def same(i: int) -> bool:  # a child with its parent's tokens has its parent's fork
            return units[i].positions == above_units[parents[i]].positions and source[parents[i]] is None

        def cost(p: int) -> int:
            return sum(1 for i in children_of.get(p, ()) if not same(i))

        chosen = set(_select(_strength(ce, base, plan.options.postprocessing), children_of, cost, share))
        run = [i for p in sorted(chosen) for i in children_of[p] if not same(i)]
        new_ce = np.empty((len(units), ce.shape[1]))
        new_source: list[str | None] = [None] * len(units)
        for i, p in enumerate(parents):  # inherit first; refined children overwrite below
            new_ce[i] = ce[p]
            inherited = not (p in chosen or same(i))
            new_source[i] = (source[p] or above_gran.value) if inherited else None
        if run:
            results = yield RunForks((base_job, *(jobs[i] for i in run)))
            all_results += results
            rounds += 1
            for i, r in zip(run, results[1:]):
                new_ce[i] = _ce(r)
        ce, source, above_units, above_gran = new_ce, new_source, units, gran
    return plan.score(base, ce, all_results, time.perf_counter() - started, source, rounds)


def _ce(result: ForkResult) -> np.ndarray:
    return np.asarray(result.target_ce, dtype=np.float64).reshape(-1)
