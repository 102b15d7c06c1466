"""Attention steering for generation: the caller scales attention to parts of the prompt.

A ``Control`` is a character span of the prompt with a factor (< 1 suppresses,
> 1 amplifies). It turns into one ``KeyBias`` over the prompt tokens that is
applied for the whole generation.

- It applies to every prompt token its span overlaps. ``overlap="complete"``
  gives each such token the full factor; ``"partial"`` interpolates by the
  fraction of the token's characters covered, ``f_eff = 1 + (f − 1)·covered/len``
  (a 2.0 control over half a token gives 1.5), so selecting part of a word
  does not act like selecting all of it.
- Several controls on one token multiply (they are independent requests).
- With ``kappa`` each control also reaches tokens whose input embeddings are
  similar (ATMAN_SPEC §5, same formula with the control's factor). The
  candidates are the prompt's content tokens (never the BOS); generated
  tokens do not exist yet when the bias is planned.

An ``ImageControl`` is the same for an image of the prompt: which image (its
index among the prompt's images) and a rectangle ``{left, top, width,
height}`` in [0, 1] of the ORIGINAL image. It reaches the image's grid cells
whose rectangle (core/images.py ``cell_rect``, through the processor's
resize/crop) overlaps it; ``"partial"`` interpolates by the share of the
cell's area covered, ``"complete"`` gives the full factor. Both kinds ride in
one list and go through ``controls_bias`` together: a control is one thing
with one path to the key bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

import numpy as np

from .correlation import correlated_factors
from .images import EncodedImage, PromptImage, Rect, VisionModel, cell_rect, check_rect
from .options import MAX_FACTOR, MIN_FACTOR, InvalidRequestError, Mode, _enum, check_factor, check_kappa, factor_in_range
from .jobs import KeyBias
from .planning import EmbeddingRows, TokenSimilarity
from .tokens import EncodedPrompt, Tokenizer, encode_prompt, encode_prompt_with_images


class Overlap(str, Enum):
    PARTIAL = "partial"
    COMPLETE = "complete"


@dataclass(frozen=True)
class Control:
    start: int  # char offset into the prompt
    length: int
    factor: float


@dataclass(frozen=True)
class ImageControl:
    image: int  # index of the image among the prompt's images
    rect: Rect  # [0, 1] coordinates of the original image
    factor: float


AnyControl = Control | ImageControl


def _checked_factor(i: int, factor: Any) -> float:
    try:
        return check_factor(factor, "controls")
    except InvalidRequestError as exc:
        raise InvalidRequestError("controls", f"controls[{i}].factor {exc.message}") from None


def _coerce_image(i: int, c: Any, image_count: int) -> ImageControl:
    if isinstance(c, dict):
        unknown = sorted(set(c) - {"image", "rect", "factor"})
        if unknown:
            raise InvalidRequestError("controls", f"controls[{i}] has unknown field(s) {unknown}")
        c = ImageControl(c.get("image"), c.get("rect"), c.get("factor"))
    index = c.image
    if not isinstance(index, int) or isinstance(index, bool):
        raise InvalidRequestError("controls", f"controls[{i}].image must be an integer, got {index!r}")
    if not 0 <= index < image_count:
        raise InvalidRequestError("controls", f"controls[{i}].image {index} is not an image of the prompt "
                                              f"({image_count} image(s))")
    try:
        rect = check_rect(c.rect, "controls")
    except InvalidRequestError as exc:
        raise InvalidRequestError("controls", f"controls[{i}].rect {exc.message}") from None
    return ImageControl(index, rect, _checked_factor(i, c.factor))


def _coerce(i: int, c: Any, text_length: int, text_name: str, image_count: int) -> AnyControl:
    if isinstance(c, ImageControl) or (isinstance(c, dict) and "image" in c):
        return _coerce_image(i, c, image_count)
    if isinstance(c, dict):
        c = Control(c.get("start"), c.get("length"), c.get("factor"))
    elif not isinstance(c, Control):
        try:
            c = Control(*c)
        except TypeError:
            raise InvalidRequestError("controls", f"controls[{i}] must be (start, length, factor), got {c!r}") from None
    for name in ("start", "length"):
        v = getattr(c, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise InvalidRequestError("controls", f"controls[{i}].{name} must be an integer, got {v!r}")
    if c.length <= 0:
        raise InvalidRequestError("controls", f"controls[{i}] is an empty span (length {c.length})")
    if c.start < 0 or c.start + c.length > text_length:
        raise InvalidRequestError(
            "controls", f"controls[{i}] span ({c.start}, {c.length}) lies outside {text_name} (length {text_length})")
    return Control(c.start, c.length, _checked_factor(i, c.factor))


def check_controls(
    controls: Sequence[AnyControl | dict | tuple] | None,
    text_length: int,
    *,
    text_name: str = "the prompt",
    indices: Sequence[int] | None = None,
    image_count: int = 0,
) -> tuple[AnyControl, ...]:
    """The controls as ``Control``s inside a text of ``text_length`` characters, sorted by start,
    then the ``ImageControl``s (a dict with ``image`` is one) on the prompt's ``image_count`` images.

    Raises InvalidRequestError("controls") for a malformed control, a span
    outside the text, a factor that is not finite and > 0, or overlapping
    spans. ``indices`` are the controls' positions in the caller's request
    (default 0, 1, ...), so messages point at the right one when a request's
    controls are checked in groups (one group per chat message).
    """
    controls = list(controls or ())
    indices = list(range(len(controls))) if indices is None else list(indices)
    coerced = [_coerce(i, c, text_length, text_name, image_count) for i, c in zip(indices, controls)]
    checked = sorted((c for c in coerced if isinstance(c, Control)), key=lambda c: c.start)
    for a, b in zip(checked, checked[1:]):
        if b.start < a.start + a.length:
            raise InvalidRequestError("controls", f"spans ({a.start}, {a.length}) and ({b.start}, {b.length}) overlap")
    # Image controls may overlap: several on one cell multiply, as on a token.
    return tuple(checked) + tuple(c for c in coerced if isinstance(c, ImageControl))


def _text_reach(c: Control, encoded: EncodedPrompt, text: str, overlap: Overlap) -> dict[int, float]:
    direct: dict[int, float] = {}
    for i, (s, e) in enumerate(encoded.prompt_offsets):
        covered = min(e, c.start + c.length) - max(s, c.start)
        if covered > 0:
            share = 1.0 if overlap is Overlap.COMPLETE else covered / (e - s)
            direct[encoded.prompt_start + i] = 1.0 + (c.factor - 1.0) * share
    if not direct:
        raise InvalidRequestError("controls", f"span ({c.start}, {c.length}) {text[c.start:c.start + c.length]!r} "
                                              "covers no token")
    return direct


def _image_reach(c: ImageControl, image: EncodedImage, overlap: Overlap) -> dict[int, float]:
    """The image's cells whose original-image rectangle overlaps the control's, with their factors."""
    direct: dict[int, float] = {}
    for k, position in enumerate(image.cell_positions):
        r, col = divmod(k, image.cols)
        cell = cell_rect(r, col, r + 1, col + 1, image.rows, image.cols, image.content)
        covered = 0.0 if cell is None else cell.overlap(c.rect)
        if covered > 0:
            share = 1.0 if overlap is Overlap.COMPLETE else min(covered / (cell.width * cell.height), 1.0)
            direct[position] = 1.0 + (c.factor - 1.0) * share
    if not direct:
        raise InvalidRequestError("controls", f"rect {c.rect.to_dict()} of image {c.image} overlaps no image cell")
    return direct


def controls_bias(
    encoded: EncodedPrompt,
    text: str,
    controls: Sequence[AnyControl],
    mode: Mode | str = Mode.LOG_ADDITIVE,
    kappa: float | None = None,
    overlap: Overlap | str = "partial",
    embedding_rows: EmbeddingRows | None = None,
    images: Sequence[EncodedImage] = (),
) -> KeyBias | None:
    """The bias of ``controls`` (from ``check_controls``) over tokens already encoded from ``text``.

    ``encoded.prompt_offsets`` are the char offsets into ``text`` of the
    tokens from ``encoded.prompt_start`` on; the tokens before it (the BOS)
    are never steered, not even through ``kappa``. ``images``: where the prompt's images sit
    (``encode_prompt_with_images``), for image controls. Used by ``plan_controls``
    and by callers whose token ids come from elsewhere (the HTTP server steers
    a chat prompt rendered and tokenized by vLLM). None: no change.
    """
    mode = _enum(Mode, mode, "mode")
    overlap = _enum(Overlap, overlap, "overlap")
    kappa = check_kappa(kappa)
    if not controls:
        return None
    base = encoded.prompt_start
    candidates = tuple(range(base, len(encoded.token_ids)))
    similarity = TokenSimilarity(encoded.token_ids, embedding_rows) if kappa is not None else None
    factors = np.ones(len(encoded.token_ids))
    for c in controls:
        direct = (_image_reach(c, images[c.image], overlap) if isinstance(c, ImageControl)
                  else _text_reach(c, encoded, text, overlap))
        reach = dict(direct)
        if similarity is not None:
            positions = sorted(direct)
            correlated = correlated_factors(positions, candidates, similarity.between(positions, candidates), kappa, c.factor)
            reach.update({k: f for k, f in correlated.items() if k not in direct})
        for p, f in reach.items():
            factors[p] *= f
    positions = tuple(int(p) for p in np.flatnonzero(factors != 1.0))
    if not positions:
        return None
    for p in positions:
        if not factor_in_range(float(factors[p])):
            raise InvalidRequestError("controls", f"controls reaching token {p} multiply to a factor of "
                                                  f"{factors[p]:g}, outside [{MIN_FACTOR:g}, {MAX_FACTOR:g}]")
    return KeyBias(positions, tuple(float(factors[p]) for p in positions), mode)


def plan_controls(
    prompt: str,
    tokenizer: Tokenizer,
    controls: Sequence[AnyControl | dict | tuple],
    mode: Mode | str = Mode.LOG_ADDITIVE,
    kappa: float | None = None,
    overlap: Overlap | str = "partial",
    embedding_rows: EmbeddingRows | None = None,
) -> tuple[tuple[int, ...], KeyBias | None]:
    """Token ids of a text prompt (with BOS) and the bias the controls ask for (None: no change)."""
    encoded, _, bias = plan_prompt_controls(prompt, tokenizer, controls, mode, kappa, overlap, embedding_rows)
    return encoded.token_ids, bias


def plan_prompt_controls(
    prompt: str,
    tokenizer: Tokenizer,
    controls: Sequence[AnyControl | dict | tuple],
    mode: Mode | str = Mode.LOG_ADDITIVE,
    kappa: float | None = None,
    overlap: Overlap | str = "partial",
    embedding_rows: EmbeddingRows | None = None,
    images: Sequence[PromptImage] = (),
    vision: VisionModel | None = None,
) -> tuple[EncodedPrompt, tuple[EncodedImage, ...], KeyBias | None]:
    """The encoded prompt (with BOS; ``images`` expanded through ``vision``, one per placeholder), where
    its images sit, and the bias the controls ask for (None: no change)."""
    mode = _enum(Mode, mode, "mode")
    overlap = _enum(Overlap, overlap, "overlap")
    kappa = check_kappa(kappa)
    if images:
        if vision is None:
            raise InvalidRequestError("images", "this model takes no images")
        if kappa is not None:
            # Every cell carries the same placeholder id: token-embedding similarity would tie all cells
            # together. Steering's kappa over the vision features is not built (docs/design.md).
            raise InvalidRequestError("kappa", "correlated steering (kappa) is not supported for prompts with images")
        encoded, located = encode_prompt_with_images(tokenizer, prompt, images, vision)
    else:
        encoded, located = encode_prompt(tokenizer, prompt), ()
    checked = check_controls(controls, len(prompt), image_count=len(images))
    return encoded, located, controls_bias(encoded, prompt, checked, mode, kappa, overlap, embedding_rows, located)
