"""The one colour scale every view uses (terminal, notebook, web page).

Diverging: a score's sign picks the hue, |score| / scale its strength, where
the scale is the largest |score| of that explanation (prompt and target units
together), so every explanation uses the full range and 0 is always white.
The end colours are ColorBrewer RdBu's (readable with the common colour-vision
deficiencies) at a lightness where black text keeps a contrast above 5:1.
"""

from __future__ import annotations

from atman_vllm.core import ExplanationForTarget

POSITIVE_RGB = (214, 96, 77)  # #d6604d: suppressing the unit made the target less likely (it mattered)
NEGATIVE_RGB = (67, 147, 195)  # #4393c3: suppressing the unit made the target more likely
WHITE = (255, 255, 255)


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def explanation_scale(exp: ExplanationForTarget) -> float:
    """The largest |score| among the explanation's units (0.0 when all are 0)."""
    return max((abs(s.score) for s in (*exp.prompt_scores, *exp.target_scores)), default=0.0)


def strength(score: float, scale: float) -> float:
    """|score| / scale clipped to [0, 1]; 0 for a zero scale (nothing to show)."""
    if not scale > 0:
        return 0.0
    return min(abs(score) / scale, 1.0)


def mixed_rgb(score: float, scale: float) -> tuple[int, int, int]:
    """The colour of ``score``: white blended towards the end colour of its sign.

    The HTML views do the same blend in CSS (``color-mix`` in view.css) from
    ``strength``; this is the terminal's copy of that one line of arithmetic.
    """
    end = POSITIVE_RGB if score > 0 else NEGATIVE_RGB
    x = strength(score, scale)
    return tuple(int(round(w + (e - w) * x)) for w, e in zip(WHITE, end))  # type: ignore[return-value]


def prompt_texts(result, scores) -> list[tuple[str, str, list]]:
    """(label, text, the scores whose spans index that text): the prompt, or for a chat each message's
    content (scores name their message), so every view highlights spans in the text they index. An
    image tile's score is no text highlight (its span is the image's placeholder): the heatmap shows it."""
    scores = [s for s in scores if s.image is None]
    if result.messages is None:
        return [("", result.prompt, scores)]
    return [(f"{m.role}: ", m.content, [s for s in scores if s.message == i]) for i, m in enumerate(result.messages)]
