"""Chat prompts: a message list, validated, and where each message's content sits in the rendered prompt.

Rendering (the model's chat template) belongs to the backend; the core only
needs the rendered text and, per message, where its content begins in it.
Only tokens whose characters lie in a message's content become units, and
their spans are reported relative to that content (with the message index),
so the template's own tokens (``<|im_start|>user\\n``, a default system
prompt) are never suppressed nor scored.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Callable, Sequence

from .options import InvalidRequestError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, d: dict) -> "ChatMessage":
        return cls(d["role"], d["content"])


@dataclass(frozen=True)
class ChatPrompt:
    """A message list and where each message's content begins in the rendered prompt text."""

    messages: tuple[ChatMessage, ...]
    content_starts: tuple[int, ...]  # one per message, into the rendered prompt


def check_messages(messages) -> tuple[ChatMessage, ...]:
    """Validated messages for explaining the assistant answer that follows them (field ``messages``).

    The answer is the next assistant turn (the template's generation prompt),
    so the list must end with a user message.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, ChatMessage):
            role, content = m.role, m.content
        elif isinstance(m, dict):
            unknown = sorted(set(m) - {"role", "content"})
            if unknown:
                raise InvalidRequestError("messages", f"messages[{i}] has the unknown field {unknown[0]!r}; "
                                                      "expected role and content")
            role, content = m.get("role"), m.get("content")
        else:
            raise InvalidRequestError("messages", f"messages[{i}] must be a {{role, content}} object, "
                                                  f"got {type(m).__name__}")
        if role not in ROLES:
            raise InvalidRequestError("messages", f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                                                  f"got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequestError("messages", f"messages[{i}].content must be a string, "
                                                  f"got {type(content).__name__}")
        out.append(ChatMessage(role, content))
    if out[-1].role != "user":
        raise InvalidRequestError("messages", f"the last message must be from the user (the explained answer is "
                                              f"the assistant's reply to it), got role {out[-1].role!r}")
    if not any(m.content.strip() for m in out):
        raise InvalidRequestError("messages", "every message content is empty; there is nothing to explain")
    return tuple(out)


def locate_contents(messages: Sequence[ChatMessage], render: Callable[[list[dict]], str]) -> tuple[str, ChatPrompt]:
    """``render(messages)`` and where each message's content begins in it.

    Searching the rendered text for a content could find a copy elsewhere (a
    system prompt quoting it), so the chat is rendered once more with a unique
    marker in place of each content; the template must copy every content
    verbatim and once, which is checked: putting the contents back in place
    of the markers must give exactly the real rendering.
    """
    rendered = render([m.to_dict() for m in messages])
    markers = [f"ATMANMSG{i}X{uuid.uuid4().hex}" for i in range(len(messages))]
    marked = render([{"role": m.role, "content": markers[i]} for i, m in enumerate(messages)])
    starts = split_at_markers(marked, markers, [m.content for m in messages], rendered)
    return rendered, ChatPrompt(tuple(messages), tuple(starts[i] for i in range(len(messages))))


def split_at_markers(marked: str, markers: Sequence[str], contents: Sequence[str], rendered: str,
                     field: str = "messages", indices: Sequence[int] | None = None) -> dict[int, int]:
    """Start of contents[i] in ``rendered``, from a rendering with markers[i] in place of each content.

    ``indices`` name the messages (default 0..n-1) in errors; InvalidRequestError(``field``) when
    the template does not copy each content verbatim and once.
    """
    indices = list(range(len(markers))) if indices is None else list(indices)

    def not_verbatim(k: int) -> InvalidRequestError:
        return InvalidRequestError(field, f"the chat template does not copy messages[{indices[k]}].content into "
                                          "the prompt verbatim and once, so its spans cannot be placed")

    by_marker = {marker: k for k, marker in enumerate(markers)}
    starts: dict[int, int] = {}
    rebuilt, length = [], 0
    for piece in re.split("(" + "|".join(map(re.escape, markers)) + ")", marked):
        k = by_marker.get(piece)
        if k is not None:
            if indices[k] in starts:
                raise not_verbatim(k)
            starts[indices[k]] = length
            piece = contents[k]
        rebuilt.append(piece)
        length += len(piece)
    for k in range(len(markers)):
        if indices[k] not in starts:
            raise not_verbatim(k)
    if "".join(rebuilt) != rendered:
        raise not_verbatim(0)
    return starts
