"""What streams out of an explanation or a generation while it runs (one type each,
shared by the Python API, the service and the clients)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExplainProgress:
    """``done_forks`` of the explanation's ``total_forks`` forward passes have finished."""

    done_forks: int
    total_forks: int


@dataclass(frozen=True)
class GenerationDelta:
    """One step of a streamed generation."""

    text: str  # new text in this step
    token_ids: tuple[int, ...]  # new token ids
    finished: bool
    finish_reason: str | None  # set on the last delta ("length", "stop")
    completion_text: str  # everything generated so far
