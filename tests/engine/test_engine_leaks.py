"""Every KV block comes back: after explains, and after an aborted explain."""

from __future__ import annotations

import asyncio

import pytest

from atman_vllm.core import ExplainOptions, ExplainRequest

from .texts import LONG


def test_blocks_return_after_explains(engines):
    llm = engines["gpt2"]
    before = llm.kv_block_stats()
    llm.explain(LONG, " Lisbon.", granularity="token")
    llm.explain(LONG, None, max_tokens=3, granularity="sentence")
    assert llm.kv_block_stats() == before
