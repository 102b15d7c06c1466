"""Terminal rendering of an explanation: the prompt as a heatmap plus the top units.

Warm (red) backgrounds mark spans whose suppression made the target less
likely (positive score), cool (blue) the opposite; the intensity is the score
relative to the largest |score| of that explanation, so every explanation uses
the full colour range. Shared by the CLI and the server's demo.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from atman_vllm.core import ExplainResult, ExplanationForTarget, SpanScore

TOP_UNITS = 5


def _style(score: float, scale: float) -> str | None:
    if scale <= 0 or score == 0:
        return None
    x = min(abs(score) / scale, 1.0)
    fade = int(round(255 * (1 - x)))  # 255: white, 0: full colour
    rgb = (255, fade, fade) if score > 0 else (fade, fade, 255)
    return f"black on rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def _heatmap(text: str, scores: Sequence[SpanScore], scale: float) -> Text:
    out = Text(text)
    for s in scores:
        style = _style(s.score, scale)
        if style:
            out.stylize(style, s.start, s.start + s.length)
    return out


def _render_one(index: int, result: ExplainResult, exp: ExplanationForTarget, console: Console) -> None:
    all_scores = [*exp.prompt_scores, *exp.target_scores]
    scale = max((abs(s.score) for s in all_scores), default=0.0)
    whole = exp.target.start == 0 and exp.target.length == len(result.target)
    title = f"target {exp.target.text!r}" if whole else f"target token {index}: {exp.target.text!r}"
    console.rule(Text(title, style="bold"))  # Text: user text is never read as markup
    console.print(_heatmap(result.prompt, exp.prompt_scores, scale))
    if exp.target_scores:
        target = _heatmap(result.target, exp.target_scores, scale)
        target.stylize("bold underline", exp.target.start, exp.target.start + exp.target.length)
        console.print(Text("target: ") + target)
    table = Table(title=f"top {TOP_UNITS} units", show_edge=False)
    table.add_column("#", justify="right")
    table.add_column("span")
    table.add_column("text")
    table.add_column("score", justify="right")
    tagged = [("prompt", s) for s in exp.prompt_scores] + [("target", s) for s in exp.target_scores]
    top = sorted(tagged, key=lambda ws: ws[1].score, reverse=True)[:TOP_UNITS]
    for rank, (where, s) in enumerate(top, 1):
        table.add_row(str(rank), f"{where} {s.start}:{s.length}", Text(repr(s.text)), f"{s.score:+.4f}")
    console.print(table)


def render_explanation(result: ExplainResult, console: Console) -> None:
    """Print every explanation of ``result`` (one, or one per target token) and the run's stats."""
    for i, exp in enumerate(result.explanations):
        _render_one(i, result, exp, console)
    st, opts = result.stats, result.options.to_dict()
    console.print(
        f"[dim]{opts['granularity']} units, factor {opts['factor']}, {opts['mode']}; "
        f"{st.forward_passes} forward passes, {st.computed_tokens} tokens computed, "
        f"{st.cached_tokens} cached, {st.elapsed_s:.2f}s[/dim]"
    )
