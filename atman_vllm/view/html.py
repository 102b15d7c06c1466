"""HTML views of an explanation: the notebook display and the page of /ui and ``atman-vllm view``.

- ``notebook_html``: a fragment rendered here, in Python, with no script, so
  it shows wherever a notebook is displayed (Jupyter, exported HTML, viewers
  that drop scripts); hovering a unit shows its exact score (``title``).
- ``page_html``: one self-contained page (CSS and JS inlined from
  ``static/``, nothing fetched from anywhere). With ``api`` it is the live
  page of ``/ui``, which calls the server's ``/v1`` API; with ``result`` it
  shows a saved result (``atman-vllm view``). The page renders in JS, so
  the heatmap is built twice (here and in ui.js): the notebook cannot rely on
  scripts and the live page cannot rely on Python.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from importlib import resources
from typing import Mapping, Sequence

from atman_vllm.core import ExplainOptions, ExplainResult, Granularity, Mode, SpanScore, TargetGranularity

from .scale import NEGATIVE_RGB, POSITIVE_RGB, explanation_scale, hex_colour, prompt_texts, strength
from .terminal import TOP_UNITS, stats_line, target_title

# Units the page's form can ask for: "custom" and "spans" need a delimiter or spans it has no field for.
FORM_GRANULARITIES = tuple(g.value for g in Granularity if g not in (Granularity.CUSTOM, Granularity.SPANS))


@lru_cache(maxsize=None)
def _asset(name: str) -> str:
    return (resources.files("atman_vllm.view") / "static" / name).read_text(encoding="utf-8")


def stylesheet() -> str:
    """view.css with the palette of scale.py."""
    palette = f".atman {{ --pos: {hex_colour(POSITIVE_RGB)}; --neg: {hex_colour(NEGATIVE_RGB)}; }}\n"
    return palette + _asset("view.css")


def _signed(x: float) -> str:
    return f"{x:+.4g}".replace("-", "−")


def _heat(text: str, scores: Sequence[SpanScore], scale: float, where: str) -> str:
    # Spans are in code points, as Python indexes str: slice directly.
    out, pos = [], 0
    for s in sorted(scores, key=lambda s: s.start):
        out.append(html.escape(text[pos:s.start]))
        sign = "pos" if s.score > 0 else "neg" if s.score < 0 else "zero"
        title = html.escape(f"{where} {s.start}:{s.length} {s.text!r}: {s.score:.6g}", quote=True)
        out.append(f'<span class="u {sign}" style="--a:{strength(s.score, scale):.4f}" data-score="{s.score!r}" '
                   f'title="{title}">{html.escape(text[s.start:s.start + s.length])}</span>')
        pos = max(pos, s.start + s.length)
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _legend(scale: float) -> str:
    return (f'<div class="legend"><span>{_signed(-scale)}</span><span class="bar"></span>'
            f'<span>{_signed(scale)}</span></div>'
            '<p class="legend-text">red: suppressing the unit made the target less likely; '
            'blue: more likely; hover a unit for its score</p>')


def notebook_html(result: ExplainResult) -> str:
    """The explanation as an HTML fragment without scripts (``ExplainResult._repr_html_``)."""
    parts = [f'<div class="atman"><style>{stylesheet()}</style>']
    for i, exp in enumerate(result.explanations):
        scale = explanation_scale(exp)
        parts.append(f'<div class="tt">{html.escape(target_title(i, result, exp))}</div>')
        for label, text, scores in prompt_texts(result, exp.prompt_scores):
            parts.append(f'<div class="heat">{html.escape(label)}{_heat(text, scores, scale, "prompt")}</div>')
        if exp.target_scores:
            parts.append(f'<div class="heat">{_heat(result.target, exp.target_scores, scale, "target")}</div>')
        parts.append(_legend(scale))
    parts.append(f'<p class="meta">{html.escape(stats_line(result))}</p></div>')
    return "".join(parts)


def _script_json(value: object) -> str:
    # Inside <script>, user text such as "</script>" or "<!--" would end or
    # change the element: escaping <, > and & keeps the JSON identical for JSON.parse.
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page_config(result: Mapping | None, api: Mapping[str, str] | None) -> dict:
    return {
        "result": result,
        "api": dict(api) if api else None,
        "choices": {"granularity": list(FORM_GRANULARITIES),
                    "target_granularity": [t.value for t in TargetGranularity],
                    "mode": [m.value for m in Mode]},
        "defaults": ExplainOptions().to_dict(),
        "top_units": TOP_UNITS,
    }


def page_html(result: ExplainResult | Mapping | None = None, *, api: Mapping[str, str] | None = None) -> str:
    """The page: ``api`` = {"explain", "completions", "models"} paths for the live form; ``result``: shown at once."""
    if isinstance(result, ExplainResult):
        result = result.to_dict()
    # Placeholders are replaced in one pass each; the config goes last so user text is never scanned for them.
    page = _asset("ui.html").replace("/*ATMAN:CSS*/", stylesheet()).replace("/*ATMAN:JS*/", _asset("ui.js"))
    return page.replace("/*ATMAN:CONFIG*/", _script_json(page_config(result, api)))
