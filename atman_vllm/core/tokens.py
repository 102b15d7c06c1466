"""Tokenization with character offsets, so every score maps back to text.

Prompt and target are tokenized separately and concatenated, so the target's
tokens are exactly the tokens scored (no token straddles the boundary) and
both texts keep their own offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from .options import InvalidRequestError

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
    target_offsets: Offsets  # relative to the target text

    @property
    def num_targets(self) -> int:
        return len(self.token_ids) - self.target_start


def _tokenize(tokenizer: Tokenizer, text: Any, field: str) -> tuple[list[int], Offsets]:
    if not isinstance(text, str):
        raise InvalidRequestError(field, f"must be a string, got {type(text).__name__}")
    if not text:
        raise InvalidRequestError(field, "must not be empty")
    ids, offsets = tokenizer.encode(text)
    if not ids:
        raise InvalidRequestError(field, f"yields no tokens: {text!r}")
    if len(offsets) != len(ids):
        raise ValueError("tokenizer returned a different number of offsets than tokens")
    # Clamp to the text: some tokenizers report offsets past the end for byte pieces.
    n = len(text)
    clamped = tuple((min(max(int(s), 0), n), min(max(int(e), int(s), 0), n)) for s, e in offsets)
    return [int(i) for i in ids], clamped


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> EncodedPrompt:
    ids, offsets = _tokenize(tokenizer, prompt, "prompt")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return EncodedPrompt(tuple(bos + ids), len(bos), offsets)


def encode_input(tokenizer: Tokenizer, prompt: str, target: str) -> EncodedInput:
    p = encode_prompt(tokenizer, prompt)
    target_ids, target_offsets = _tokenize(tokenizer, target, "target")
    return EncodedInput(
        token_ids=p.token_ids + tuple(target_ids),
        prompt_start=p.prompt_start,
        target_start=len(p.token_ids),
        prompt_offsets=p.prompt_offsets,
        target_offsets=target_offsets,
    )
