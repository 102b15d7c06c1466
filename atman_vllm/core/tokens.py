"""Tokenization with character offsets, so every score maps back to text.

The scored target tokens are exactly the tokens the model sees for the
prompt and target together: ``prompt + target`` is tokenized as one text
(BPE merges across the boundary, leading spaces, SentencePiece's "▁" all as
the tokenizer does them) and split at the first token that carries a target
character. When that token also carries prompt characters (a prompt ending
in a space before a word, or in the middle of a word), no split on a token
boundary exists: that token is scored as the first target token, the prompt
characters it covers belong to no unit, and the result's ``target_boundary``
says so. Spans are never shifted to hide it.

A target given as token ids (generate-then-explain) is scored as those ids,
after the prompt's own tokens, exactly as the engine ran them; its text is
their decoding. Its offsets are the tokenizer's where tokenizing prompt +
text gives these very ids (so both ways report the same spans), else they
come from decoding incrementally (a token that ends inside a UTF-8 sequence
gets an empty span; the token that completes the character gets it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence, runtime_checkable

from .images import EncodedImage, PromptImage, VisionModel, check_image_count, expand_placeholders, locate_images
from .options import InvalidRequestError
from .results import TargetBoundary

Offsets = tuple[tuple[int, int], ...]


@runtime_checkable
class Tokenizer(Protocol):
    """What the core needs from a tokenizer."""

    bos_token_id: int | None  # prepended to every sequence when not None

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids without special tokens and each token's (start, end) char offsets into text."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """Adapter for a Hugging Face fast tokenizer (duck-typed; transformers is not imported).

    ``add_bos=None`` prepends the BOS token exactly when the tokenizer itself
    does so with ``add_special_tokens=True``: that is how the model was trained
    and how vLLM tokenizes a plain prompt, so explanations see the same input.
    """

    def __init__(self, tok: Any, add_bos: bool | None = None):
        self.tok = tok
        bos = getattr(tok, "bos_token_id", None)
        if add_bos is None and bos is not None:
            probe = tok("a", add_special_tokens=True)["input_ids"]
            add_bos = bool(probe) and probe[0] == bos
        self.bos_token_id: int | None = bos if add_bos else None

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


@dataclass(frozen=True)
class EncodedPrompt:
    token_ids: tuple[int, ...]  # [BOS] + prompt tokens
    prompt_start: int  # 1 when a BOS is prepended, else 0
    prompt_offsets: Offsets  # relative to the prompt text


@dataclass(frozen=True)
class EncodedInput:
    """[BOS] + prompt tokens + target tokens, with offsets into each text."""

    token_ids: tuple[int, ...]
    prompt_start: int  # index of the first prompt token
    target_start: int  # index of the first target token
    prompt_offsets: Offsets  # relative to the prompt text
    target_offsets: Offsets  # relative to the target text (the first clamped at 0 when not aligned)
    target: str = ""  # the target text the offsets index (decoded, for a target given as ids)
    boundary: TargetBoundary = TargetBoundary(True)
    # A prompt with images: where each image's tokens are (an image token's offsets are its placeholder's).
    images: tuple[EncodedImage, ...] = ()

    @property
    def num_targets(self) -> int:
        return len(self.token_ids) - self.target_start


def check_text(text: Any, field: str) -> str:
    if not isinstance(text, str):
        raise InvalidRequestError(field, f"must be a string, got {type(text).__name__}")
    if not text:
        raise InvalidRequestError(field, "must not be empty")
    return text


def _encode(tokenizer: Tokenizer, text: str) -> tuple[list[int], Offsets]:
    ids, offsets = tokenizer.encode(text)
    if len(offsets) != len(ids):
        raise ValueError("tokenizer returned a different number of offsets than tokens")
    # Clamp to the text: some tokenizers report offsets past the end for byte pieces.
    n = len(text)
    clamped = tuple((min(max(int(s), 0), n), min(max(int(e), int(s), 0), n)) for s, e in offsets)
    return [int(i) for i in ids], clamped


def _bos(tokenizer: Tokenizer, add_bos: bool) -> list[int]:
    return [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []


def encode_prompt(tokenizer: Tokenizer, prompt: str, *, add_bos: bool = True) -> EncodedPrompt:
    """``add_bos=False``: the text as it is (a rendered chat prompt carries its template's specials)."""
    ids, offsets = _encode(tokenizer, check_text(prompt, "prompt"))
    if not ids:
        raise InvalidRequestError("prompt", f"yields no tokens: {prompt!r}")
    bos = _bos(tokenizer, add_bos)
    return EncodedPrompt(tuple(bos + ids), len(bos), offsets)


def encode_input(tokenizer: Tokenizer, prompt: str, target: str, *, add_bos: bool = True) -> EncodedInput:
    """Prompt and target tokenized together, split at the first token with a target character."""
    check_text(prompt, "prompt")
    check_text(target, "target")
    ids, offsets = _encode(tokenizer, prompt + target)
    p = len(prompt)
    k = next((i for i, (_, e) in enumerate(offsets) if e > p), len(ids))
    if not ids or offsets[0][0] >= p:
        raise InvalidRequestError("prompt", f"yields no tokens: {prompt!r}")
    if k == len(ids):
        raise InvalidRequestError("target", f"yields no tokens after the prompt: {target!r}")
    if k == 0:
        raise InvalidRequestError("prompt", f"the tokenizer merges the whole prompt with the target's start into "
                                            f"one token {(prompt + target)[slice(*offsets[0])]!r}; no prompt token "
                                            "is left to explain")
    boundary = TargetBoundary(True)
    first_start = offsets[k][0]
    if first_start < p:
        joined = (prompt + target)[first_start:offsets[k][1]]
        boundary = TargetBoundary(False, p - first_start, (
            f"the tokenizer merges the prompt's last {p - first_start} character(s) {prompt[first_start:]!r} "
            f"with the target's start into one token {joined!r}; the model sees that token, so it is scored as "
            "the first target token, and those prompt characters belong to no unit"))
    bos = _bos(tokenizer, add_bos)
    return EncodedInput(
        token_ids=tuple(bos + ids),
        prompt_start=len(bos),
        target_start=len(bos) + k,
        prompt_offsets=offsets[:k],
        target_offsets=tuple((max(s - p, 0), e - p) for s, e in offsets[k:]),
        target=target,
        boundary=boundary,
    )


def decoded_offsets(tokenizer: Tokenizer, token_ids: Sequence[int]) -> tuple[str, Offsets]:
    """The text of ``token_ids`` and each token's (start, end) in it, from incremental decoding.

    Token j ends where the decoded text of ids[:j+1] stops agreeing with the
    whole text; a token ending inside a multi-byte character decodes to a
    replacement character there, so it gets an empty span and the token that
    completes the character gets the character.
    """
    text = tokenizer.decode(token_ids)
    offsets, end = [], 0
    for j in range(len(token_ids)):
        prefix = tokenizer.decode(token_ids[:j + 1]) if j + 1 < len(token_ids) else text
        agree = 0
        limit = min(len(prefix), len(text))
        while agree < limit and prefix[agree] == text[agree]:
            agree += 1
        new_end = max(end, agree)
        offsets.append((end, new_end))
        end = new_end
    return text, tuple(offsets)


def encode_with_target_ids(tokenizer: Tokenizer, prompt: str, target_ids: Sequence[int], *,
                           add_bos: bool = True) -> EncodedInput:
    """[BOS] + the prompt's tokens + ``target_ids`` as given (the generated ids themselves)."""
    if not target_ids:
        raise InvalidRequestError("target", "no target token ids to explain")
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in target_ids):
        raise InvalidRequestError("target", "target token ids must be non-negative integers")
    p = encode_prompt(tokenizer, prompt, add_bos=add_bos)
    target, target_offsets = decoded_offsets(tokenizer, target_ids)
    token_ids = p.token_ids + tuple(int(t) for t in target_ids)
    try:  # where tokenizing the text gives these very ids, its offsets are the ones to report
        joint = encode_input(tokenizer, prompt, target, add_bos=add_bos) if target.strip() else None
    except InvalidRequestError:
        joint = None
    if joint is not None and joint.token_ids == token_ids and joint.target_start == len(p.token_ids):
        target_offsets = joint.target_offsets
    return EncodedInput(
        token_ids=token_ids,
        prompt_start=p.prompt_start,
        target_start=len(p.token_ids),
        prompt_offsets=p.prompt_offsets,
        target_offsets=target_offsets,
        target=target,
    )


def _expanded(prompt: str, images: Sequence[PromptImage], vision: VisionModel):
    starts = check_image_count(check_text(prompt, "prompt"), images, vision.placeholder)
    layouts = [vision.image_layout(im) for im in images]
    return expand_placeholders(prompt, starts, vision.placeholder, layouts), layouts


def encode_prompt_with_images(tokenizer: Tokenizer, prompt: str, images: Sequence[PromptImage], vision: VisionModel,
                              *, add_bos: bool = True) -> tuple[EncodedPrompt, tuple[EncodedImage, ...]]:
    """The prompt alone (to generate after it) with its images expanded, as ``encode_with_images``."""
    expanded, layouts = _expanded(prompt, images, vision)
    enc = encode_prompt(tokenizer, expanded.text, add_bos=add_bos)
    offsets, encoded = locate_images(expanded, enc.token_ids, enc.prompt_start, enc.prompt_offsets, images, layouts)
    return replace(enc, prompt_offsets=offsets), encoded


def encode_with_images(tokenizer: Tokenizer, prompt: str, target: str, images: Sequence[PromptImage],
                       vision: VisionModel, *, add_bos: bool = True,
                       target_ids: Sequence[int] | None = None) -> EncodedInput:
    """A prompt with images (one ``vision.placeholder`` per image, core/images.py): tokenized with each
    placeholder expanded as the model's processor expands it, offsets mapped back to the prompt."""
    expanded, layouts = _expanded(prompt, images, vision)
    if target_ids is not None:
        enc = encode_with_target_ids(tokenizer, expanded.text, target_ids, add_bos=add_bos)
    else:
        enc = encode_input(tokenizer, expanded.text, target, add_bos=add_bos)
    offsets, encoded = locate_images(expanded, enc.token_ids, enc.prompt_start, enc.prompt_offsets, images, layouts)
    return replace(enc, prompt_offsets=offsets, images=encoded)
