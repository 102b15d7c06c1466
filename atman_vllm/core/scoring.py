"""From target cross-entropies to scores over spans (ATMAN_SPEC §3).

Sign: ``Δ_{i,t} = CE_t(perturbed_i) − CE_t(base)``; positive means suppressing
unit i made target token t less likely, i.e. the unit mattered. (The
authors' code stores the negative of this.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .options import Postprocessing, TargetGranularity
from .results import ExplanationForTarget, SpanScore, TextSpan
from .units import CharSpan, Unit


def raw_deltas(base_ce: np.ndarray, perturbed_ce: np.ndarray) -> np.ndarray:
    """[n, T] matrix Δ from the base run's [T] and the perturbed runs' [n, T] cross-entropies."""
    base = np.asarray(base_ce, dtype=np.float64)
    pert = np.asarray(perturbed_ce, dtype=np.float64).reshape(-1, base.shape[0])
    return pert - base[None, :]


def postprocess(scores: np.ndarray, how: Postprocessing) -> np.ndarray:
    how = Postprocessing(how)
    if how is Postprocessing.ABSOLUTE:
        return np.abs(scores)
    if how is Postprocessing.SQUARE:
        return np.square(scores)
    return np.asarray(scores, dtype=np.float64)


def normalize_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]. All-equal scores (including a single one) carry no ranking: all 0.0."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores
    lo, hi = scores.min(), scores.max()
    if not hi > lo:  # also catches a single score; never divides by zero
        return np.zeros_like(scores)
    return (scores - lo) / (hi - lo)


def _finish_scores(values: np.ndarray, postprocessing: Postprocessing, normalize: bool) -> np.ndarray:
    values = postprocess(values, postprocessing)
    return normalize_scores(values) if normalize else values


def _span_scores(units: Sequence[Unit], values: np.ndarray) -> tuple[SpanScore, ...]:
    return tuple(SpanScore(u.start, u.length, u.text, float(v), u.message, image=u.image, rect=u.rect)
                 for u, v in zip(units, values))


def score_explanations(
    prompt_units: Sequence[Unit],
    target_units: Sequence[Unit],
    target: str,
    target_offsets: Sequence[CharSpan],
    target_start: int,
    deltas: np.ndarray,
    target_granularity: TargetGranularity,
    postprocessing: Postprocessing,
    normalize: bool,
) -> tuple[ExplanationForTarget, ...]:
    """Explanations from Δ, whose rows are the prompt units then the target units, columns the target tokens.

    complete: one explanation, Δ_i = mean_t Δ_{i,t}, prompt units only.
    token: one explanation per target token t; prompt units all scored, target
    unit j only if all its tokens precede t (a unit cannot influence what comes
    before it). Postprocessing, then normalization, per explanation over the
    prompt and target scores together.
    """
    if not prompt_units:
        raise ValueError("an explanation needs at least one prompt unit")
    n_prompt = len(prompt_units)
    deltas = np.asarray(deltas, dtype=np.float64)
    if deltas.shape != (n_prompt + len(target_units), len(target_offsets)):
        raise ValueError(f"deltas have shape {deltas.shape}, expected "
                         f"{(n_prompt + len(target_units), len(target_offsets))}")

    if TargetGranularity(target_granularity) is TargetGranularity.COMPLETE:
        values = _finish_scores(deltas[:n_prompt].mean(axis=1), postprocessing, normalize)
        return (ExplanationForTarget(TextSpan(0, len(target), target), _span_scores(prompt_units, values), ()),)

    explanations = []
    for t, (s, e) in enumerate(target_offsets):
        earlier = [j for j, u in enumerate(target_units) if max(u.positions) < target_start + t]
        values = np.concatenate([deltas[:n_prompt, t], deltas[[n_prompt + j for j in earlier], t]])
        values = _finish_scores(values, postprocessing, normalize)
        explanations.append(ExplanationForTarget(
            TextSpan(s, e - s, target[s:e]),
            _span_scores(prompt_units, values[:n_prompt]),
            _span_scores([target_units[j] for j in earlier], values[n_prompt:]),
        ))
    return tuple(explanations)
