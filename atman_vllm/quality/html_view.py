"""A static HTML page: per example, each method's top units highlighted in the prompt.

One block per example; one line per (method, granularity). Each unit's
background is its min-max-normalised score (over the example's context
units); the top-k units (k = number of evidence units) are outlined; the
evidence is underlined in green. No scripts, no external resources.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

import numpy as np

from .metrics import overlaps

if TYPE_CHECKING:
    from .harness import EvalReport

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
.ex { border-top: 1px solid #ccc; padding: 0.6em 0; }
.meta { color: #555; font-size: 90%; }
table { border-collapse: collapse; }
td { padding: 0.2em 0.5em; vertical-align: top; }
td.m { white-space: nowrap; font-size: 85%; color: #333; }
.u { border-radius: 3px; }
.top { outline: 2px solid #c0392b; }
.ev { text-decoration: underline; text-decoration-color: #27ae60; text-decoration-thickness: 2px; }
"""


def _normalise(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0:
        return s
    lo, hi = float(s.min()), float(s.max())
    return np.zeros_like(s) if hi <= lo else (s - lo) / (hi - lo)


def _highlighted(prompt: str, units, scores, evidence) -> str:
    norm = _normalise(scores)
    n_pos = sum(overlaps((u.start, u.start + u.length), evidence) for u in units)
    top = set(np.argsort(-np.asarray(scores), kind="stable")[:max(1, n_pos)].tolist()) if len(units) else set()
    out, pos = [], 0
    for i, u in enumerate(units):
        out.append(html.escape(prompt[pos:u.start]))
        classes = ["u"] + (["top"] if i in top else []) + \
                  (["ev"] if overlaps((u.start, u.start + u.length), evidence) else [])
        alpha = 0.05 + 0.85 * float(norm[i])
        out.append(f'<span class="{" ".join(classes)}" style="background: rgba(230,126,34,{alpha:.2f})" '
                   f'title="{float(scores[i]):.4g}">{html.escape(u.text)}</span>')
        pos = u.start + u.length
    out.append(html.escape(prompt[pos:]))
    return "".join(out)


def render_html(report: "EvalReport", max_examples: int = 20) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>AtMan explanation quality</title>",
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>Explanation quality: {html.escape(report.data)}</h1>",
             f"<p class='meta'>model {html.escape(report.model_dir)}; {report.n_examples} examples; "
             "orange = score (min-max per example), red outline = top-k units (k = evidence units), "
             "green underline = evidence. Only context units are scored.</p>"]
    keys = sorted(report.unit_scores, key=lambda k: (k[1], k[0]))
    for ex in report.examples[:max_examples]:
        e = ex.example
        parts.append("<div class='ex'>")
        parts.append(f"<div class='meta'>#{ex.index} · {html.escape(e.qtype)} · Q: {html.escape(e.question)} "
                     f"· answer: <b>{html.escape(e.answer)}</b></div><table>")
        for method, granularity in keys:
            scores = report.unit_scores[(method, granularity)][ex.index]
            row = _highlighted(e.prompt, ex.units[granularity], scores, e.evidence_spans)
            parts.append(f"<tr><td class='m'>{html.escape(method)}<br>{granularity}</td><td>{row}</td></tr>")
        parts.append("</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
