"""Images in a prompt: one representation, image tokens, image units (tiles) and their rectangles.

**The representation.** A prompt with images is the prompt text with the
model's image placeholder (``VisionModel.placeholder``, e.g. Idefics3's
``<image>``) where each image goes, plus the images in order: the i-th
placeholder is ``images[i]``. Text and images mix in any order. Ordered parts
(gRPC's ``oneof``, HTTP's part list) are joined into this form by
``join_parts``; nothing else exists downstream.

**Image tokens.** The backend says how its processor turns one image into
decoder tokens (``ImageLayout``): the text the placeholder expands to (for
Idefics3 without splitting: ``<fake_token_around_image><global-img>`` + 16 ×
``<image>`` + ``<fake_token_around_image>``) and which of those tokens are
the cells of the image's grid (row-major, ``rows × cols``). The prompt is
tokenized with every placeholder expanded, as the processor does; each
image's tokens are found there and the other tokens' offsets are mapped back
to the prompt text, so text units report spans of the prompt as always.

**Image units** (like the Aleph Alpha explanation API): tiles of the cell
grid, ``token`` = one cell, ``word`` = 2 × 2 cells, ``sentence`` = 4 × 4
cells, ``paragraph`` = the whole image (tiles at the right/bottom edge are
smaller when the grid does not divide). Only cells are units; the markers
around them (``<fake_token_around_image>``, ``<global-img>``) are never
suppressed, like a chat template's tokens.

**Rectangles.** A tile is reported as ``{left, top, width, height}`` in
[0, 1] of the ORIGINAL image. The processed image the grid covers is mapped
to the original through ``ImageLayout.content``: the rectangle of the
processed image (normalised) that the original image's pixels occupy.
Idefics3 with ``do_image_splitting=False`` resizes every image to a square of
``max_image_size`` (stretching; no crop, no pad): content = the whole square,
so cell (r, c) of an R × C grid is ``left = c/C, top = r/R, width = 1/C,
height = 1/R`` of the original image whatever its aspect ratio. A processor
that pads (content smaller than the square) or crops (content larger) maps a
tile through ``content``: the tile is cut to the content and rescaled; a tile
entirely in padding shows nothing of the image and is not a unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from .options import IMAGE_GRANULARITIES, Granularity, InvalidRequestError

# Tile side in grid cells per granularity (paragraph: the whole image).
TILE_CELLS = {Granularity.TOKEN: 1, Granularity.WORD: 2, Granularity.SENTENCE: 4}


@dataclass(frozen=True)
class Rect:
    """A rectangle in [0, 1] coordinates of an image (left/top from the image's top-left corner)."""

    left: float
    top: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height

    def to_dict(self) -> dict:
        return {"left": self.left, "top": self.top, "width": self.width, "height": self.height}

    @classmethod
    def from_dict(cls, d: dict) -> "Rect":
        return cls(float(d["left"]), float(d["top"]), float(d["width"]), float(d["height"]))

    def overlap(self, other: "Rect") -> float:
        """Area of the intersection (0.0 when disjoint)."""
        w = min(self.right, other.right) - max(self.left, other.left)
        h = min(self.bottom, other.bottom) - max(self.top, other.top)
        return max(w, 0.0) * max(h, 0.0)


FULL = Rect(0.0, 0.0, 1.0, 1.0)


def check_rect(value, field_name: str) -> Rect:
    """A caller's rectangle: four finite numbers, inside [0, 1], not empty."""
    if isinstance(value, Rect):
        d = value.to_dict()
    elif isinstance(value, dict):
        d = value
    else:
        raise InvalidRequestError(field_name, "must be an object {left, top, width, height} in [0, 1]")
    keys = ("left", "top", "width", "height")
    unknown = sorted(set(d) - set(keys))
    if unknown or any(k not in d for k in keys):
        raise InvalidRequestError(field_name, "must have exactly left, top, width and height")
    vals = []
    for k in keys:
        v = d[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise InvalidRequestError(field_name, f"{k} must be a finite number, got {v!r}")
        vals.append(float(v))
    r = Rect(*vals)
    if r.left < 0 or r.top < 0 or r.width <= 0 or r.height <= 0 or r.right > 1 + 1e-9 or r.bottom > 1 + 1e-9:
        raise InvalidRequestError(field_name, f"must lie inside [0, 1] and not be empty, got {r.to_dict()}")
    return r


@dataclass(frozen=True)
class PromptImage:
    """One image of a prompt: a digest of its pixels, its original size, and the backend-ready pixels.

    ``data`` is opaque to the core (the vLLM and reference backends use a
    PIL image); equality and hashing use the digest.
    """

    digest: str
    width: int
    height: int
    data: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "digest": self.digest}


@dataclass(frozen=True)
class ImageLayout:
    """How the model's processor turns one image into decoder tokens (given by the backend)."""

    expansion: str  # the text the placeholder becomes
    cell_token_id: int  # the id of the grid cells' tokens inside the expansion
    rows: int
    cols: int
    content: Rect = FULL  # where the original image lies in the processed image, normalised


class VisionModel(Protocol):
    """What the core needs from a backend for images."""

    placeholder: str  # the text that marks an image in a prompt

    def image_layout(self, image: PromptImage) -> ImageLayout: ...

    def cell_embeddings(self, image: PromptImage) -> np.ndarray | None:
        """[rows * cols, d] decoder input embeddings of the image's cells (the projected vision
        features), row-major, for correlated suppression; None if the backend cannot give them."""
        ...


@dataclass(frozen=True)
class EncodedImage:
    """Where one image sits: in the prompt text (its placeholder) and in the token sequence."""

    index: int
    image: PromptImage
    placeholder_start: int  # char offset of its placeholder in the prompt
    placeholder: str  # the placeholder's text
    token_start: int  # absolute position of the first token of its expansion
    token_end: int  # one past its last
    cell_positions: tuple[int, ...]  # absolute positions of the grid cells, row-major
    rows: int
    cols: int
    content: Rect = FULL


def placeholder_starts(prompt: str, placeholder: str) -> list[int]:
    out, i = [], prompt.find(placeholder)
    while i >= 0:
        out.append(i)
        i = prompt.find(placeholder, i + len(placeholder))
    return out


def check_image_count(prompt: str, images: Sequence[PromptImage], placeholder: str) -> list[int]:
    """The placeholder offsets; InvalidRequestError("images") unless there is one per image."""
    starts = placeholder_starts(prompt, placeholder)
    if len(starts) != len(images):
        raise InvalidRequestError("images", f"the prompt marks {len(starts)} image(s) with {placeholder!r} but "
                                            f"{len(images)} image(s) were given; put one {placeholder!r} where "
                                            "each image goes")
    return starts


@dataclass(frozen=True)
class ExpandedPrompt:
    """The prompt with every placeholder replaced by its expansion, and the map back."""

    text: str
    placeholder: str
    # Per image: (start, end) of its expansion in ``text`` and (start, end) of its placeholder in the prompt.
    expansions: tuple[tuple[int, int], ...]
    placeholders: tuple[tuple[int, int], ...]

    def to_prompt(self, s: int, e: int) -> tuple[int, int] | int:
        """A text token's (s, e) in ``text`` as offsets of the prompt, or the image index whose
        expansion holds it entirely. ValueError if it straddles an expansion's edge."""
        shift = 0
        for i, ((xs, xe), (ps, pe)) in enumerate(zip(self.expansions, self.placeholders)):
            if e <= xs:
                break
            if s >= xe:
                shift = pe - xe
                continue
            if xs <= s and e <= xe:
                return i
            raise ValueError(f"a token at {s}..{e} straddles the edge of image {i}'s tokens")
        return (s + shift, e + shift)


def expand_placeholders(prompt: str, starts: Sequence[int], placeholder: str,
                        layouts: Sequence[ImageLayout]) -> ExpandedPrompt:
    pieces, expansions, placeholders, pos, length = [], [], [], 0, 0
    for start, layout in zip(starts, layouts):
        pieces.append(prompt[pos:start])
        length += start - pos
        expansions.append((length, length + len(layout.expansion)))
        placeholders.append((start, start + len(placeholder)))
        pieces.append(layout.expansion)
        length += len(layout.expansion)
        pos = start + len(placeholder)
    pieces.append(prompt[pos:])
    return ExpandedPrompt("".join(pieces), placeholder, tuple(expansions), tuple(placeholders))


def locate_images(expanded: ExpandedPrompt, token_ids: Sequence[int], prompt_start: int,
                  prompt_offsets: Sequence[tuple[int, int]], images: Sequence[PromptImage],
                  layouts: Sequence[ImageLayout]) -> tuple[tuple[tuple[int, int], ...], tuple[EncodedImage, ...]]:
    """Prompt offsets mapped back to the prompt text (an image's tokens get its placeholder's span) and
    each image's token positions, from the tokenization of the expanded prompt."""
    offsets, members = [], {i: [] for i in range(len(images))}
    for k, (s, e) in enumerate(prompt_offsets):
        where = expanded.to_prompt(s, e)
        if isinstance(where, int):
            members[where].append(prompt_start + k)
            offsets.append(expanded.placeholders[where])
        else:
            offsets.append(where)
    encoded = []
    for i, (image, layout) in enumerate(zip(images, layouts)):
        positions = members[i]
        if not positions or positions != list(range(positions[0], positions[-1] + 1)):
            raise ValueError(f"image {i}'s tokens are not one run in the tokenized prompt")
        cells = tuple(p for p in positions if token_ids[p] == layout.cell_token_id)
        if len(cells) != layout.rows * layout.cols:
            raise ValueError(f"image {i} has {len(cells)} cell tokens, its layout {layout.rows}x{layout.cols}")
        ps, pe = expanded.placeholders[i]
        encoded.append(EncodedImage(i, image, ps, expanded.placeholder, positions[0], positions[-1] + 1, cells,
                                    layout.rows, layout.cols, layout.content))
    return tuple(offsets), tuple(encoded)


def cell_rect(row0: int, col0: int, row1: int, col1: int, rows: int, cols: int, content: Rect = FULL) -> Rect | None:
    """The original-image rectangle of cells [row0, row1) x [col0, col1) of a rows x cols grid over the
    processed image, through ``content`` (None: the cells show none of the original image)."""
    tile = Rect(col0 / cols, row0 / rows, (col1 - col0) / cols, (row1 - row0) / rows)
    left, right = max(tile.left, content.left), min(tile.right, content.right)
    top, bottom = max(tile.top, content.top), min(tile.bottom, content.bottom)
    if right <= left or bottom <= top:
        return None
    return Rect((left - content.left) / content.width, (top - content.top) / content.height,
                (right - left) / content.width, (bottom - top) / content.height)


def image_tiles(rows: int, cols: int, granularity: Granularity) -> list[tuple[int, int, int, int]]:
    """(row0, col0, row1, col1) of each tile, row-major."""
    granularity = Granularity(granularity)
    if granularity is Granularity.PARAGRAPH:
        return [(0, 0, rows, cols)]
    side = TILE_CELLS[granularity]
    return [(r, c, min(r + side, rows), min(c + side, cols))
            for r in range(0, rows, side) for c in range(0, cols, side)]


def image_granularity_for(text_granularity: Granularity, image_granularity: str | None) -> Granularity:
    """The tile granularity of images: the option ``image_granularity``, else the text granularity
    (custom follows paragraph: a delimiter does not cut images)."""
    if image_granularity is not None:
        return Granularity(image_granularity)
    g = Granularity(text_granularity)
    return g if g.value in IMAGE_GRANULARITIES else Granularity.PARAGRAPH


def join_parts(parts: Sequence, placeholder: str, field: str = "prompt") -> tuple[str, tuple]:
    """Ordered prompt parts (str for text, anything else an image) as (prompt text, images)."""
    text, images = [], []
    for part in parts:
        if isinstance(part, str):
            if placeholder in part:
                raise InvalidRequestError(field, f"a text part contains the image placeholder {placeholder!r}; "
                                                    "give images as image parts")
            text.append(part)
        else:
            text.append(placeholder)
            images.append(part)
    return "".join(text), tuple(images)
