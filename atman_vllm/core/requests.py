"""One explain request: the texts and the options, before tokenization."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat import ChatPrompt
from .images import PromptImage
from .options import ExplainOptions


@dataclass(frozen=True)
class ExplainRequest:
    """Explain ``target`` after ``prompt``.

    ``target_token_ids``: score these ids (generate-then-explain: the ids the
    engine generated, never a re-tokenized copy of their text); ``target`` is
    then ignored and the result's target is their decoded text.
    ``chat``: ``prompt`` is a rendered chat prompt (the backend rendered it
    with the model's template); units come from the messages' contents only
    and the text is tokenized as it is, without an added BOS (as vLLM does for
    chat).
    ``images``: the prompt's images in order; ``prompt`` marks where each goes
    with the model's image placeholder (core/images.py).
    """

    prompt: str
    target: str
    options: ExplainOptions = field(default_factory=ExplainOptions)
    target_token_ids: tuple[int, ...] | None = None
    chat: ChatPrompt | None = None
    images: tuple[PromptImage, ...] = ()
