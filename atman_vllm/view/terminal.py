"""Terminal rendering of an explanation: the prompt as a heatmap plus the top units.

Backgrounds follow ``scale``: warm where suppressing a span made the target
less likely (positive score), cool for the opposite, strength relative to the
explanation's largest |score|. Used by the CLI, the server's demo and
``ExplainResult.__rich__``.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console, Group, RenderableType
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from atman_vllm.core import ExplainResult, ExplanationForTarget, SpanScore

from .scale import explanation_scale, mixed_rgb, prompt_texts, strength

TOP_UNITS = 5


def _style(score: float, scale: float) -> str | None:
    if strength(score, scale) == 0:
        return None
    r, g, b = mixed_rgb(score, scale)
    return f"black on rgb({r},{g},{b})"


def _heatmap(text: str, scores: Sequence[SpanScore], scale: float) -> Text:
    out = Text(text)
    for s in scores:
        style = _style(s.score, scale)
        if style:
            out.stylize(style, s.start, s.start + s.length)
    return out


def target_title(index: int, result: ExplainResult, exp: ExplanationForTarget) -> str:
    whole = exp.target.start == 0 and exp.target.length == len(result.target)
    return f"target {exp.target.text!r}" if whole else f"target token {index}: {exp.target.text!r}"


def _one(index: int, result: ExplainResult, exp: ExplanationForTarget) -> list[RenderableType]:
    scale = explanation_scale(exp)
    parts: list[RenderableType] = [Rule(Text(target_title(index, result, exp), style="bold"))]  # Text: never markup
    for label, text, scores in prompt_texts(result, exp.prompt_scores):
        line = Text()
        line.append(label, style="bold")  # a chat message's role; the content keeps its own styles
        parts.append(line.append_text(_heatmap(text, scores, scale)))
    if exp.target_scores:
        target = _heatmap(result.target, exp.target_scores, scale)
        target.stylize("bold underline", exp.target.start, exp.target.start + exp.target.length)
        parts.append(Text("target: ") + target)
    table = Table(title=f"top {TOP_UNITS} units", show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("span")
    table.add_column("text")
    table.add_column("score", justify="right")
    tagged = [("prompt", s) for s in exp.prompt_scores] + [("target", s) for s in exp.target_scores]
    top = sorted(tagged, key=lambda ws: ws[1].score, reverse=True)[:TOP_UNITS]
    for rank, (where, s) in enumerate(top, 1):
        if s.message is not None:
            where = f"message {s.message}"
        span = f"{where} {s.start}:{s.length}"
        if s.image is not None:  # an image tile: where in the image, in [0, 1] of the original image
            r = s.rect
            span = f"image {s.image} x {r.left:.2f}+{r.width:.2f} y {r.top:.2f}+{r.height:.2f}"
        table.add_row(str(rank), span, Text(repr(s.text)), f"{s.score:+.4f}")
    parts.append(table)
    return parts


def stats_line(result: ExplainResult) -> str:
    st, opts = result.stats, result.options.to_dict()
    return (f"{opts['granularity']} units, factor {opts['factor']}, {opts['mode']}; "
            f"{st.forward_passes} forward passes, {st.computed_tokens} tokens computed, "
            f"{st.cached_tokens} cached, {st.elapsed_s:.2f}s")


def explanation_group(result: ExplainResult) -> Group:
    """Every explanation of ``result`` (one, or one per target token) and the run's stats, as one renderable."""
    parts = [p for i, exp in enumerate(result.explanations) for p in _one(i, result, exp)]
    parts.append(Text(stats_line(result), style="dim"))
    return Group(*parts)


def render_explanation(result: ExplainResult, console: Console) -> None:
    console.print(explanation_group(result))
