"""Results in the shapes other attribution tools plot: Captum's LLMAttributionResult, tidy rows, pandas.

Captum and pandas are optional: each is imported only by the function that
needs it, and a missing one is an ImportError that says what to install.
"""

from __future__ import annotations

import math
from typing import Any

from atman_vllm.core import ExplainResult

# The columns of ``to_records`` / ``to_dataframe``, one row per (explained target, unit).
RECORD_COLUMNS = ("target_index", "target_start", "target_length", "target_text",
                  "source", "unit_index", "unit_start", "unit_length", "unit_text", "score")


def to_records(result: ExplainResult) -> list[dict[str, Any]]:
    """Tidy rows: one per explained target (whole target or target token) and scored unit.

    ``source`` is "prompt" or "target" (earlier target tokens, target granularity "token");
    ``unit_index`` counts units within their source.
    """
    rows = []
    for t, exp in enumerate(result.explanations):
        for source, scores in (("prompt", exp.prompt_scores), ("target", exp.target_scores)):
            for u, s in enumerate(scores):
                rows.append({"target_index": t, "target_start": exp.target.start, "target_length": exp.target.length,
                             "target_text": exp.target.text, "source": source, "unit_index": u,
                             "unit_start": s.start, "unit_length": s.length, "unit_text": s.text, "score": s.score})
    return rows


def to_dataframe(result: ExplainResult):
    """``to_records`` as a pandas DataFrame (columns ``RECORD_COLUMNS``)."""
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError("to_dataframe needs pandas (pip install pandas); to_records needs nothing") from e
    return pd.DataFrame(to_records(result), columns=list(RECORD_COLUMNS))


def _is_complete(result: ExplainResult) -> bool:
    return result.options.target_granularity.value == "complete"


def to_captum(result: ExplainResult):
    """Captum's ``LLMAttributionResult``: input tokens = the prompt's units, output tokens = the target's tokens.

    - ``seq_attr``: each unit's score for the whole target. Target granularity
      "complete" gives it directly; with "token" it is the mean of the
      per-token scores, which is what "complete" computes from raw scores (it
      is not that with postprocessing or normalize, which act per explanation).
    - ``token_attr`` [output tokens × units]: with target granularity "token",
      one row per target token; with "complete" only for a one-token target
      (its row is ``seq_attr``), else None, as Captum has it for sequence-only
      attributions. Scores of earlier target tokens as units have no place
      in Captum's shape and are left out.
    - ``output_probs``: each target token's probability in the unperturbed run.

    Then ``plot_seq_attr()`` and, when ``token_attr`` is set, ``plot_token_attr()`` work.
    """
    try:
        from captum.attr import LLMAttributionResult
    except ImportError as e:
        raise ImportError("to_captum needs captum (pip install captum)") from e
    import torch

    input_tokens = [s.text for s in result.explanations[0].prompt_scores]
    output_tokens = [t.text for t in result.target_tokens]
    rows = [[s.score for s in exp.prompt_scores] for exp in result.explanations]
    if _is_complete(result):
        seq_attr = torch.tensor(rows[0], dtype=torch.float64)
        token_attr = seq_attr.unsqueeze(0) if len(output_tokens) == 1 else None
    else:
        token_attr = torch.tensor(rows, dtype=torch.float64)
        seq_attr = token_attr.mean(dim=0)
    probs = torch.tensor([math.exp(t.logprob) for t in result.target_tokens], dtype=torch.float64)
    return LLMAttributionResult(input_tokens=input_tokens, output_tokens=output_tokens, seq_attr=seq_attr,
                                token_attr=token_attr, output_probs=probs)
