"""Per-request limits and the explain slots (back-pressure without a queue)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import ErrorCode, ServiceError

DEFAULT_MAX_UNITS = 256
DEFAULT_MAX_CONCURRENT_EXPLAINS = 4
DEFAULT_MAX_GENERATE_TOKENS = 1024
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20
DEFAULT_MAX_IMAGES = 4  # images per prompt (the engine's limit_mm_per_prompt caps it too)
# Token positions all explanations' forks may have in the engine at once (0: no cap);
# bounds what forks add to each step that generation shares (benchmarks/load/soak.py).
DEFAULT_FORK_TOKENS_IN_FLIGHT = 0
# Prompt characters per allowed token, when --max-prompt-chars is not given: generous
# (a BPE token is a handful of characters, a long whitespace run a few dozen) and still
# small enough that tokenizing a text at the limit takes milliseconds.
PROMPT_CHARS_PER_TOKEN = 64


@dataclass(frozen=True)
class ServiceLimits:
    max_explain_tokens: int  # prompt + target tokens of one explain (never above max_model_len)
    max_units: int = DEFAULT_MAX_UNITS  # units = perturbations = forks beyond the first
    max_concurrent_explains: int = DEFAULT_MAX_CONCURRENT_EXPLAINS
    max_generate_tokens: int = DEFAULT_MAX_GENERATE_TOKENS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_prompt_chars: int | None = None  # None: PROMPT_CHARS_PER_TOKEN × max_explain_tokens
    max_images: int = DEFAULT_MAX_IMAGES  # images per prompt, counted before any is decoded

    @property
    def prompt_chars(self) -> int:
        """Characters of a prompt (or target), checked before anything tokenizes it."""
        return self.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * self.max_explain_tokens


class ExplainSlots:
    """At most ``capacity`` explains run at once; one more is refused at once.

    An explain is n + 1 forward passes; queueing them behind each other would
    only grow latency without bound, so a caller over the limit gets
    RESOURCE_EXHAUSTED / HTTP 429 and retries. The server runs one asyncio
    loop, so a plain counter is race-free.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("max concurrent explains must be >= 1")
        self.capacity = capacity
        self.in_use = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.in_use >= self.capacity:
            raise ServiceError(
                ErrorCode.RESOURCE_EXHAUSTED,
                f"all {self.capacity} explain slots are busy; retry later "
                "(the server's --max-concurrent-explains)",
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
