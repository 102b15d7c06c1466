"""Units of suppression: groups of tokens reported as character spans (ATMAN_SPEC §4).

How a prompt becomes units, in two steps:

1. The granularity cuts the text into character segments (sorted,
   non-overlapping, non-empty, surrounding whitespace trimmed):
   token = each token's own characters (tokens sharing characters, such as
   byte pieces of one character, are merged: a client can only see
   characters); word = runs of non-whitespace; sentence = pieces of a
   paragraph ending in ``.``/``!``/``?`` (plus closing quotes/brackets)
   followed by whitespace or the end; paragraph = pieces between blank lines;
   custom = pieces between occurrences of the delimiter (the delimiter's own
   characters belong to no segment); spans = the caller's ranges, as given.
   If the text has no segment at all (e.g. only whitespace), the whole text
   is one segment, so every prompt has at least one unit.
2. Each token joins the segment its characters overlap most (ties: the
   earlier segment). A token overlapping no segment (pure whitespace between
   words, a delimiter, a zero-width special piece) joins the unit of the next
   token that does overlap one, or of the previous one at the end of the
   prompt: BPE tokenizers glue whitespace to the following word, so this
   matches how the model sees it. Exception: with explicit ``spans``,
   uncovered tokens belong to no unit (the caller asked only about those
   ranges) and each span must receive at least one token.

So for token/word/sentence/paragraph/custom, every prompt token is in exactly
one unit. A chat prompt is segmented per message (``PromptRegion``): each
message's content is cut as above, only the tokens whose characters lie in
that content take part, and the units carry the message index; template
tokens belong to no unit. A unit is reported with its segment's span, not its tokens' span,
so spans never overlap; segments that receive no token are dropped.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, replace
from typing import Literal, Sequence

from .images import EncodedImage, Rect, cell_rect, image_granularity_for, image_tiles
from .options import ExplainOptions, Granularity, InvalidRequestError, TargetGranularity

AUTO_MAX_UNITS = 30  # auto picks the finest granularity with at most this many units
_AUTO_ORDER = (Granularity.TOKEN, Granularity.WORD, Granularity.SENTENCE, Granularity.PARAGRAPH)

Region = Literal["prompt", "target"]
CharSpan = tuple[int, int]  # (start, end), end exclusive


@dataclass(frozen=True)
class Unit:
    """Tokens suppressed together, and the text span they are reported as."""

    start: int  # char offset into the prompt (or target, for region "target")
    length: int
    text: str  # == source_text[start:start + length]
    positions: tuple[int, ...]  # absolute token indices in the sequence, increasing
    region: Region = "prompt"
    message: int | None = None  # chat: the message whose content start/length index
    # An image tile: the image's index and the tile's rectangle in the original image; start/length/text
    # are then the image's placeholder in the prompt.
    image: int | None = None
    rect: Rect | None = None

    def __post_init__(self):
        if not self.positions:
            raise ValueError("a unit needs at least one token")
        if list(self.positions) != sorted(set(self.positions)):
            raise ValueError("unit positions must be strictly increasing")


def _trim(text: str, start: int, end: int) -> CharSpan | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _pieces(text: str, cuts: Sequence[CharSpan], lo: int = 0, hi: int | None = None) -> list[CharSpan]:
    """The trimmed, non-empty pieces of text[lo:hi] between the separator spans ``cuts``."""
    hi = len(text) if hi is None else hi
    out, pos = [], lo
    for cs, ce in list(cuts) + [(hi, hi)]:
        piece = _trim(text, pos, cs)
        if piece:
            out.append(piece)
        pos = ce
    return out


def _paragraphs(text: str) -> list[CharSpan]:
    # A blank line is a newline, optional horizontal whitespace, another newline.
    return _pieces(text, [m.span() for m in re.finditer(r"\n[^\S\n]*\n", text)])


_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|\Z)")


def sentence_spans(text: str) -> list[CharSpan]:
    """The sentences of ``text`` as trimmed character spans (the ``sentence`` units)."""
    # Sentences never cross a paragraph break, so sentence is always finer than paragraph.
    out = []
    for ps, pe in _paragraphs(text):
        ends = [ps + m.end() for m in _SENTENCE_END.finditer(text[ps:pe])]
        out += _pieces(text, [(e, e) for e in ends], ps, pe)
    return out


def _custom(text: str, delimiter: str) -> list[CharSpan]:
    cuts, i = [], text.find(delimiter)
    while i >= 0:
        cuts.append((i, i + len(delimiter)))
        i = text.find(delimiter, i + len(delimiter))
    return _pieces(text, cuts)


def _token_segments(offsets: Sequence[CharSpan]) -> list[CharSpan]:
    merged: list[list[int]] = []
    for s, e in sorted(o for o in offsets if o[1] > o[0]):
        if merged and s < merged[-1][1]:  # shares characters with the previous token
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _check_spans(text: str, spans: Sequence[tuple[int, int]]) -> list[CharSpan]:
    out = []
    for start, length in spans:
        if length <= 0:
            raise InvalidRequestError("spans", f"span ({start}, {length}) is empty")
        if start < 0 or start + length > len(text):
            raise InvalidRequestError("spans", f"span ({start}, {length}) lies outside the prompt (length {len(text)})")
        out.append((start, start + length))
    out.sort()  # reported in text order, whatever order the caller used
    for (s1, e1), (s2, e2) in zip(out, out[1:]):
        if s2 < e1:
            raise InvalidRequestError("spans", f"spans ({s1}, {e1 - s1}) and ({s2}, {e2 - s2}) overlap")
    return out


def _segments(text: str, offsets: Sequence[CharSpan], granularity: Granularity, options: ExplainOptions) -> list[CharSpan]:
    if granularity is Granularity.TOKEN:
        segs = _token_segments(offsets)
    elif granularity is Granularity.WORD:
        segs = [m.span() for m in re.finditer(r"\S+", text)]
    elif granularity is Granularity.SENTENCE:
        segs = sentence_spans(text)
    elif granularity is Granularity.PARAGRAPH:
        segs = _paragraphs(text)
    elif granularity is Granularity.CUSTOM:
        segs = _custom(text, options.delimiter)
    else:
        raise ValueError(f"no segmenter for {granularity}")
    return segs or [(0, len(text))]


def _assign(offsets: Sequence[CharSpan], segs: Sequence[CharSpan]) -> list[int | None]:
    """Index of the segment each token overlaps most (ties: earlier), None if it overlaps none."""
    starts, ends = [s for s, _ in segs], [e for _, e in segs]
    owner: list[int | None] = []
    for ts, te in offsets:
        best, best_overlap = None, 0
        # Segments are sorted and disjoint: only those with end > ts and start < te can overlap.
        for j in range(bisect.bisect_right(ends, ts), bisect.bisect_left(starts, te)):
            overlap = min(te, ends[j]) - max(ts, starts[j])
            if overlap > best_overlap:
                best, best_overlap = j, overlap
        owner.append(best)
    return owner


def _attach_uncovered(owner: list[int | None]) -> list[int]:
    """Uncovered tokens join the next covered token's segment (the previous one at the end)."""
    if all(o is None for o in owner):
        return [0] * len(owner)  # no token has characters in any segment: one unit
    out: list[int | None] = list(owner)
    nxt = None
    for i in range(len(out) - 1, -1, -1):
        if out[i] is None:
            out[i] = nxt
        else:
            nxt = out[i]
    prev = None
    for i in range(len(out)):
        if out[i] is None:
            out[i] = prev
        prev = out[i]
    return out  # type: ignore[return-value]


def _build_units(text: str, segs: Sequence[CharSpan], owner: Sequence[int | None], first_position: int, region: Region,
                 message: int | None = None) -> list[Unit]:
    members: dict[int, list[int]] = {}
    for i, seg in enumerate(owner):
        if seg is not None:
            members.setdefault(seg, []).append(first_position + i)
    return [
        Unit(s, e - s, text[s:e], tuple(members[j]), region, message)
        for j, (s, e) in enumerate(segs)
        if j in members  # a segment that received no token is dropped
    ]


def _units_for(text: str, offsets: Sequence[CharSpan], prompt_start: int, granularity: Granularity,
               options: ExplainOptions, message: int | None = None) -> list[Unit]:
    if granularity is Granularity.SPANS:
        segs = _check_spans(text, options.spans)
        owner = _assign(offsets, segs)
        covered = set(o for o in owner if o is not None)
        for j, (s, e) in enumerate(segs):
            if j not in covered:
                raise InvalidRequestError("spans", f"span ({s}, {e - s}) {text[s:e]!r} covers no token of its own")
        return _build_units(text, segs, owner, prompt_start, "prompt")
    segs = _segments(text, offsets, granularity, options)
    return _build_units(text, segs, _attach_uncovered(_assign(offsets, segs)), prompt_start, "prompt", message)


@dataclass(frozen=True)
class PromptRegion:
    """Text whose tokens become units: the whole prompt, or one chat message's content."""

    text: str
    offsets: tuple[CharSpan, ...]  # its tokens' char offsets into text
    first_position: int  # absolute position of the token with offset index 0
    message: int | None = None


def _between_images(start: int, end: int, images: Sequence[EncodedImage]) -> list[CharSpan]:
    """[start, end) of the prompt cut at the placeholders of the images that lie inside it."""
    pieces, pos = [], start
    for im in images:
        ps, pe = im.placeholder_start, im.placeholder_start + len(im.placeholder)
        if start <= ps and pe <= end:
            pieces.append((pos, ps))
            pos = pe
    pieces.append((pos, end))
    return pieces


def _image_positions(images: Sequence[EncodedImage]) -> set[int]:
    return {p for im in images for p in range(im.token_start, im.token_end)}


def _blanked(text: str, start: int, end: int) -> str:
    """``text`` with every character outside [start, end) replaced by a space (lengths kept)."""
    return " " * start + text[start:end] + " " * (len(text) - end)


def chat_regions(prompt_offsets: Sequence[CharSpan], prompt_start: int, content_starts: Sequence[int],
                 contents: Sequence[str], images: Sequence[EncodedImage] = ()) -> list[PromptRegion]:
    """One region per text piece of each message's content (the whole content, or the pieces between
    the placeholders of its images): the tokens whose characters overlap it, offsets into the content.

    ``prompt_offsets`` index the rendered prompt; the tokens overlapping one
    piece are consecutive. A piece's text is the content with every character
    outside the piece blanked, so its units stay inside the piece (a sentence
    never runs across an image) and report content offsets. A message with
    only whitespace (or only images) has no text units; an image's tokens are
    never in a text unit.
    """
    excluded = _image_positions(images)
    regions = []
    for m, (cs, content) in enumerate(zip(content_starts, contents)):
        for a, b in _between_images(cs, cs + len(content), images):
            inside = [i for i, (s, e) in enumerate(prompt_offsets)
                      if s < b and e > a and prompt_start + i not in excluded]
            if not content[a - cs:b - cs].strip() or not inside:
                continue
            offsets = tuple((max(s, a) - cs, min(e, b) - cs) for s, e in prompt_offsets[inside[0]:inside[-1] + 1])
            regions.append(PromptRegion(_blanked(content, a - cs, b - cs), offsets, prompt_start + inside[0], m))
    return regions


def text_regions(prompt: str, prompt_offsets: Sequence[CharSpan], prompt_start: int,
                 images: Sequence[EncodedImage]) -> list[PromptRegion]:
    """The text pieces of a prompt with images (between placeholders), one region each, spans into the prompt.

    A region's text is the prompt with every character outside its piece blanked, so its units
    stay inside the piece (a sentence never runs across an image) and report prompt offsets.
    """
    excluded = _image_positions(images)
    regions = []
    for a, b in _between_images(0, len(prompt), images):
        if not prompt[a:b].strip():
            continue
        inside = [i for i, (s, e) in enumerate(prompt_offsets)
                  if prompt_start + i not in excluded and a <= s and e <= b and (s < e or a < s < b)]
        if not inside:
            continue
        first, last = inside[0], inside[-1]
        regions.append(PromptRegion(_blanked(prompt, a, b), tuple(prompt_offsets[first:last + 1]),
                                    prompt_start + first))
    return regions


def in_messages(units: Sequence[Unit], content_starts: Sequence[int], contents: Sequence[str]) -> list[Unit]:
    """A chat's image tiles placed as its text units are: in the message whose content holds the
    image's placeholder, at the placeholder's offset into that content."""
    out = []
    for u in units:
        if u.image is not None:
            m = next((m for m, (cs, c) in enumerate(zip(content_starts, contents)) if cs <= u.start < cs + len(c)),
                     None)
            if m is None:
                raise InvalidRequestError("messages", f"image {u.image}'s placeholder is not inside a message's "
                                                      "content (the chat template adds it)")
            u = replace(u, start=u.start - content_starts[m], message=m)
        out.append(u)
    return out


def region_units(regions: Sequence[PromptRegion], granularity: Granularity, options: ExplainOptions) -> list[Unit]:
    """Units of every region for one (resolved) granularity."""
    return [u for r in regions for u in _units_for(r.text, r.offsets, r.first_position, granularity, options, r.message)]


def image_units(images: Sequence[EncodedImage], granularity: Granularity) -> list[Unit]:
    """Tiles of each image's cell grid as units (core/images.py), row-major per image."""
    units = []
    for im in images:
        for r0, c0, r1, c1 in image_tiles(im.rows, im.cols, granularity):
            rect = cell_rect(r0, c0, r1, c1, im.rows, im.cols, im.content)
            if rect is None:  # padding only: nothing of the image to suppress
                continue
            positions = tuple(im.cell_positions[r * im.cols + c] for r in range(r0, r1) for c in range(c0, c1))
            units.append(Unit(im.placeholder_start, len(im.placeholder), im.placeholder, tuple(sorted(positions)),
                              "prompt", None, im.index, rect))
    return units


def _with_images(units: list[Unit], images: Sequence[EncodedImage], granularity: Granularity,
                 options: ExplainOptions) -> list[Unit]:
    if not images:
        return units
    tiles = image_units(images, image_granularity_for(granularity, options.image_granularity))
    return sorted(units + tiles, key=lambda u: u.positions[0])  # in the order the model reads them


def segment_regions(regions: Sequence[PromptRegion], options: ExplainOptions,
                    images: Sequence[EncodedImage] = ()) -> tuple[list[Unit], Granularity]:
    """Units of every region (and image tiles of ``images``) for ``options.granularity``, in sequence
    order, and the granularity used (auto: the finest with at most AUTO_MAX_UNITS units over all
    regions and images together; images follow it unless ``image_granularity`` is set)."""
    if not regions and not images:
        raise InvalidRequestError("messages", "no message content has a token of its own to explain")
    granularity = Granularity(options.granularity)
    if granularity is Granularity.SPANS and any(r.message is not None for r in regions):
        raise InvalidRequestError("spans", "are character spans of a prompt; with messages use another granularity")
    if granularity is Granularity.SPANS and images:
        raise InvalidRequestError("spans", "are character spans of a text prompt; with images use another granularity")
    if granularity is Granularity.AUTO:
        for candidate in _AUTO_ORDER:
            units = _with_images(region_units(regions, candidate, options), images, candidate, options)
            if len(units) <= AUTO_MAX_UNITS:
                return units, candidate
        return units, Granularity.PARAGRAPH
    return _with_images(region_units(regions, granularity, options), images, granularity, options), granularity


def segment_prompt(
    text: str, offsets: Sequence[CharSpan], prompt_start: int, options: ExplainOptions
) -> tuple[list[Unit], Granularity]:
    """Units of the prompt for ``options.granularity``, and the granularity used (auto resolved).

    ``offsets`` are the prompt tokens' char offsets into ``text``; the token
    with offset index i sits at absolute position ``prompt_start + i``.
    """
    return segment_regions([PromptRegion(text, tuple(offsets), prompt_start)], options)


def target_units(
    target: str, offsets: Sequence[CharSpan], target_start: int, target_granularity: TargetGranularity
) -> list[Unit]:
    """Target tokens as units ("explain everything"), only for target granularity ``token``.

    Target token j can only influence later target tokens, so the last target
    token is never a unit. Spans are the tokens' own offsets into the target.
    """
    if TargetGranularity(target_granularity) is not TargetGranularity.TOKEN:
        return []
    return [
        Unit(s, e - s, target[s:e], (target_start + j,), "target")
        for j, (s, e) in enumerate(offsets[:-1])
    ]
