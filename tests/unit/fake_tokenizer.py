"""Tiny deterministic tokenizers with character offsets, for tests of the pure core.

``FakeTokenizer``: GPT-2-like pre-tokenization (a word or punctuation mark
takes one leading space; other whitespace runs are tokens of their own).
``HFStyleTokenizer`` mimics what Hugging Face byte-level BPE reports with
``trim_offsets=True``: leading spaces trimmed from offsets, whitespace-only
tokens with zero-width offsets, and a non-ASCII character split into two
byte tokens that share its offsets. Ids are assigned in order of first
appearance, so equal strings get equal ids.
"""

from __future__ import annotations

import re
from typing import Sequence

TOKEN_RE = re.compile(r" ?\w+| ?[^\w\s]|\s+")


class FakeTokenizer:
    def __init__(self, bos: bool = True):
        self.bos_token_id = 0 if bos else None
        self.inverse: dict[int, str] = {0: "<s>"}
        self.vocab: dict[str, int] = {"<s>": 0}

    def _id(self, piece: str) -> int:
        if piece not in self.vocab:
            self.vocab[piece] = len(self.vocab)
            self.inverse[self.vocab[piece]] = piece
        return self.vocab[piece]

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        matches = list(TOKEN_RE.finditer(text))
        return [self._id(m.group()) for m in matches], [m.span() for m in matches]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.inverse[i] for i in ids if i != 0)


class HFStyleTokenizer(FakeTokenizer):
    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for m in TOKEN_RE.finditer(text):
            s, e = m.span()
            piece = m.group()
            if piece.isspace():
                ids.append(self._id(piece))
                offsets.append((e, e))  # zero-width, like trimmed byte-level offsets
                continue
            s += len(piece) - len(piece.lstrip())
            for i in range(s, e):
                pieces = [text[i] + "#1", text[i] + "#2"] if ord(text[i]) > 127 else [text[i]]
                for p in pieces:  # one token per char; two "byte" tokens for non-ASCII
                    ids.append(self._id(p))
                    offsets.append((i, i + 1))
        return ids, offsets
