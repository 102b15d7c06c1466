"""Image heatmaps: the relevance of each image tile drawn over the image, as a PNG people can look at.

Each tile's rectangle (in [0, 1] of the original image, core/images.py) is
tinted with the colour scale every view uses (``scale.mixed_rgb``: warm where
suppressing the tile made the target less likely, cool for the opposite,
strength relative to the explanation's largest |score|, text units
included), blended over the original image. Images smaller than
``MIN_SIDE`` are enlarged (nearest neighbour, so pixels stay sharp) so a
64-pixel image is visible. Several images (and, for target granularity
token, several explanations) make one sheet: one row per explanation, one
column per image.
"""

from __future__ import annotations

from typing import Sequence

from atman_vllm.core import ExplainResult, ExplanationForTarget

from .scale import explanation_scale, mixed_rgb, strength

MIN_SIDE = 256
OPACITY = 0.65  # the blend of the strongest tile's colour over the image
GAP = 8


def tile_overlay(image, exp: ExplanationForTarget, index: int):
    """``image`` (PIL) with explanation ``exp``'s tiles of image ``index`` blended over it (RGB)."""
    from PIL import Image

    base = image.convert("RGB")
    factor = max(1, -(-MIN_SIDE // max(1, min(base.size))))
    if factor > 1:
        base = base.resize((base.width * factor, base.height * factor), Image.NEAREST)
    colour = Image.new("RGB", base.size)
    alpha = Image.new("L", base.size, 0)
    scale = explanation_scale(exp)
    w, h = base.size
    for s in exp.prompt_scores:
        if s.image != index:
            continue
        r = s.rect
        box = (round(r.left * w), round(r.top * h), round(r.right * w), round(r.bottom * h))
        colour.paste(mixed_rgb(s.score, scale) if s.score != 0 else (255, 255, 255), box)
        alpha.paste(int(round(255 * OPACITY * strength(s.score, scale))), box)
    return Image.composite(colour, base, alpha)


def heatmap_sheet(result: ExplainResult, images: Sequence):
    """One PIL image: a row per explanation, a column per image of the prompt."""
    from PIL import Image

    if not images:
        raise ValueError("the explanation has no images to draw")
    tiles = [[tile_overlay(im, exp, i) for i, im in enumerate(images)] for exp in result.explanations]
    width = sum(t.width for t in tiles[0]) + GAP * (len(images) - 1)
    row_heights = [max(t.height for t in row) for row in tiles]
    sheet = Image.new("RGB", (width, sum(row_heights) + GAP * (len(tiles) - 1)), (255, 255, 255))
    y = 0
    for row, height in zip(tiles, row_heights):
        x = 0
        for t in row:
            sheet.paste(t, (x, y))
            x += t.width + GAP
        y += height + GAP
    return sheet


def save_heatmap(result: ExplainResult, images: Sequence, path) -> None:
    heatmap_sheet(result, images).save(path, format="PNG")


def heatmap_png(result: ExplainResult, images: Sequence) -> bytes:
    import io

    buf = io.BytesIO()
    heatmap_sheet(result, images).save(buf, format="PNG")
    return buf.getvalue()
