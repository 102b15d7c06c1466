"""One explain request: the texts and the options, before tokenization."""

from __future__ import annotations

from dataclasses import dataclass, field

from .options import ExplainOptions


@dataclass(frozen=True)
class ExplainRequest:
    prompt: str
    target: str
    options: ExplainOptions = field(default_factory=ExplainOptions)
