"""Forks reuse the unperturbed run's KV blocks, exactly up to their first perturbed block."""

from __future__ import annotations

import numpy as np
import torch

from atman_vllm.core import ExplainOptions, ExplainRequest
from tolerances import assert_close

from .texts import LONG

BLOCK = 32  # ENGINE_ARGS block_size


def test_token_granularity_shares_prefix_blocks(engines):
    llm = engines["llama"]
    # A prompt no other test sends, so the unperturbed run finds nothing cached.
    request = ExplainRequest("Sharing probe. " + LONG, " Lisbon.", ExplainOptions(granularity="token"))
    plan = llm.plan(request)
    length, target_start = len(plan.encoded.token_ids), plan.encoded.target_start
    firsts = [job.bias.first_position for job in plan.jobs[1:]]
    n = len(firsts)

    result = llm.explain(request.prompt, request.target, request.options)

    # Block-granular sharing: a fork reuses every whole block that ends before
    # both its first perturbed position and the first target-scoring position.
    expected_cached = [BLOCK * (min(p, target_start - 1) // BLOCK) for p in firsts]
    assert result.stats.cached_tokens == sum(expected_cached)
    assert result.stats.computed_tokens == length + sum(length - c for c in expected_cached)

    fork_computed = result.stats.computed_tokens - length
    ideal = sum(length - p for p in firsts)  # token-granular sharing
    print(f"L={length} n={n} fork tokens computed={fork_computed} ideal={ideal} n*L={n * length}")
    assert ideal <= fork_computed <= ideal + n * BLOCK
    # ~L²/2 plus half a block per fork: 0.61 here (L=147); it tends to 0.5 as L grows.
    assert fork_computed < 0.65 * n * length


def test_repeated_request_gives_identical_scores(engines):
    llm = engines["qwen2"]
    first = llm.explain(LONG, " Lisbon.", granularity="word")
    second = llm.explain(LONG, " Lisbon.", granularity="word")
    # The second unperturbed run reads the first's prefix blocks, never its target blocks.
    assert second.stats.cached_tokens > first.stats.cached_tokens
    assert second.stats.computed_tokens >= first.stats.perturbations + 1
    # Same spans, exactly. The values are not bitwise by construction: the second run computes
    # fewer positions per forward (the cached ones are read), so its GEMMs have other shapes; they
    # are equal up to float32 rounding of the cross-entropies. Reading a wrong block would move
    # them by orders of magnitude more.
    spans = [[(s.start, s.length, s.text) for s in (*e.prompt_scores, *e.target_scores)]
             for e in (*first.explanations, *second.explanations)]
    assert spans[len(first.explanations):] == spans[:len(first.explanations)]
    assert [(t.text, t.start) for t in second.target_tokens] == [(t.text, t.start) for t in first.target_tokens]
    ce_scale = max(abs(t.logprob) for t in first.target_tokens)
    assert_close([t.logprob for t in second.target_tokens], [t.logprob for t in first.target_tokens], torch.float32,
                 what="target logprobs")
    scores = [[s.score for e in r.explanations for s in (*e.prompt_scores, *e.target_scores)] for r in (first, second)]
    assert_close(scores[1], scores[0], torch.float32, scale=ce_scale, what="scores")
    assert np.isfinite([s.score for s in second.explanations[0].prompt_scores]).all()
