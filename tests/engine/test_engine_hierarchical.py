"""Hierarchical search through AtmanLLM (several rounds of forks on the real engine)."""

from __future__ import annotations

import numpy as np
import torch

from tolerances import assert_close

from .texts import LONG

# Three paragraphs (the search's top level), several sentences each.
DOC = LONG.replace(" The quick", "\n\nThe quick").replace(" Every morning", "\n\nEvery morning")


def test_hierarchical_search_on_the_engine(engines):
    llm = engines["llama"]
    exhaustive = llm.explain(DOC, " Lisbon.", granularity="word")
    hier = llm.explain(DOC, " Lisbon.", granularity="word", search="hierarchical", budget=16)
    ex, hi = exhaustive.explanations[0].prompt_scores, hier.explanations[0].prompt_scores
    assert [(s.start, s.length) for s in hi] == [(s.start, s.length) for s in ex]  # every word scored
    assert hier.stats.forward_passes <= 16 < exhaustive.stats.forward_passes
    refined = [i for i, s in enumerate(hi) if s.refined]
    assert 0 < len(refined) < len(hi)
    assert {s.inherited_from for s in hi if not s.refined} <= {"sentence", "paragraph"}
    # A refined word ran the same fork as in the exhaustive search.
    scale = max(abs(t.logprob) for t in exhaustive.target_tokens)
    assert_close([hi[i].score for i in refined], [ex[i].score for i in refined], torch.float32,
                 scale=scale, bound=1e-4, what="refined scores")
    assert np.abs([ex[i].score for i in refined]).max() > 1e-3
    # Rounds after the first rerun the unperturbed pass: from the prefix cache.
    assert hier.stats.cached_tokens >= 32
