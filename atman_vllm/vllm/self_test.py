"""The start-up self-test: are the plugin's seams in effect in this engine?

Each seam fails silently when it is missing (a vLLM upgrade, another model
runner, a backend chosen elsewhere): explanations would come back without
scores, with wrong prefix sharing, or unperturbed; steered decoding would be
unsteered. So before serving, a few tiny requests check each one against an
answer the front end knows:

- target scoring (runner hooks): a fork returns one finite cross-entropy per
  target token;
- the biased attention (backend): suppressing a key changes those scores;
- the prefix-cache keys (block hash): a fork perturbed in block 1 reuses
  exactly block 0 of the unperturbed run, never the block it perturbs;
- steering in decode steps: the log-probability of a steered generation's
  second token (a decode step) equals the cross-entropy that the prefill path
  gives the same token under the same bias, and differs from the unsteered one.

The plan, the order of the requests and the checks are here, once, as steps
(``self_test_steps``) that the sync and async APIs answer (``atman_vllm.api``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from atman_vllm.core.jobs import ForkJob, ForkResult, KeyBias
from atman_vllm.core.steps import RunForks, Steps

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. "
TARGET_TOKENS = 2


@dataclass(frozen=True)
class SelfTestPlan:
    token_ids: tuple[int, ...]  # two full blocks and a short target
    block_size: int
    prefix_caching: bool
    factor: float  # random per run: a repeated self-test must not find its own perturbed blocks cached

    @property
    def bias(self) -> KeyBias:
        """Suppress one key inside block 1: block 0 may be shared, block 1 may not."""
        return KeyBias((self.block_size + 1,), (self.factor,))

    @property
    def forks(self) -> list[ForkJob]:
        """[unperturbed, perturbed]: run in that order (the first commits its blocks)."""
        start = len(self.token_ids) - TARGET_TOKENS
        return [ForkJob(self.token_ids, start), ForkJob(self.token_ids, start, self.bias)]

    def decode_forks(self, generated: tuple[int, ...]) -> list[ForkJob]:
        """The steered generation's two tokens scored by the prefill path, [biased, plain]."""
        ids = self.token_ids + tuple(generated[:2])
        return [ForkJob(ids, len(ids) - 1, self.bias), ForkJob(ids, len(ids) - 1)]


def self_test_plan(tokenizer, block_size: int, prefix_caching: bool) -> SelfTestPlan:
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    while len(ids) < 2 * block_size + TARGET_TOKENS:
        ids += tokenizer.encode(TEXT)[0]
    return SelfTestPlan(tuple(ids[: 2 * block_size + TARGET_TOKENS]), block_size, prefix_caching,
                        factor=round(random.uniform(0.05, 0.2), 6))


@dataclass(frozen=True)
class SteeredDecode:
    """Step: generate two greedy tokens under ``plan.bias`` (the second from a decode step); answer with
    the generated ids and the second token's log-probability."""

    plan: SelfTestPlan


def self_test_steps(plan: SelfTestPlan) -> Steps[list[str]]:
    """What is not in effect (empty: every seam is). A RuntimeError from a step (e.g. no target
    scores at all: the runner hooks are missing) is the driver's to report."""
    failures = fork_failures(plan, (yield RunForks(tuple(plan.forks))))
    ids, logprob = yield SteeredDecode(plan)
    biased, plain = yield RunForks(tuple(plan.decode_forks(ids)))
    return failures + decode_failures(logprob, biased, plain)


def fork_failures(plan: SelfTestPlan, results: list[ForkResult]) -> list[str]:
    plain, perturbed = results
    failures = []
    if plain.target_ce.shape != (TARGET_TOKENS,) or not all(math.isfinite(c) for c in plain.target_ce):
        failures.append(f"target scoring (runner hooks): got {plain.target_ce!r} for {TARGET_TOKENS} target tokens")
        return failures
    if list(perturbed.target_ce) == list(plain.target_ce):
        failures.append("biased attention (backend): suppressing a key left the target scores unchanged")
    expected = plan.block_size if plan.prefix_caching else 0
    if perturbed.cached_tokens != expected:
        failures.append(f"prefix-cache keys (block hash): a fork perturbed in block 1 reused {perturbed.cached_tokens} "
                        f"cached tokens, expected exactly {expected}")
    return failures


def decode_failures(steered_logprob: float, biased: ForkResult, plain: ForkResult) -> list[str]:
    """The decode step's log-probability must be the biased one, not the plain one."""
    want, stock = -float(biased.target_ce[0]), -float(plain.target_ce[0])
    if abs(want - stock) < 1e-6 * (1 + abs(want)):
        return []  # this model does not care about that key here: nothing to tell apart
    if abs(steered_logprob - want) > 0.25 * abs(want - stock):
        return [f"steering in decode steps: a steered decode step gave log p {steered_logprob:.5f}; the bias gives "
                f"{want:.5f}, no bias {stock:.5f}"]
    return []
