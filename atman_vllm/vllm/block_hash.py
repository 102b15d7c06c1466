"""Prefix-cache keys for perturbed and scoring requests (scheduler side).

vLLM chains block hashes and lets extra keys (LoRA, multimodal, cache salt)
enter through ``generate_block_hash_extra_keys``. AtMan adds its own there
(``AtmanRequestInfo.block_hash_keys``): a fork shares exactly the blocks
before its first perturbed position, and target-scoring blocks are never
shared. The function is imported by name into several vLLM modules, so each
binding is replaced.
"""

from __future__ import annotations

import importlib

from .wire import request_info

# Modules that bind generate_block_hash_extra_keys at import (vLLM 0.32.0).
_BINDING_MODULES = (
    "vllm.v1.core.kv_cache_utils",
    "vllm.v1.core.block_pool",
    "vllm.v1.simple_kv_offload.manager",
)


def install() -> None:
    from .seams import expect_function

    base = importlib.import_module(_BINDING_MODULES[0])
    original = base.generate_block_hash_extra_keys
    if getattr(original, "_atman", False):
        return
    expect_function("block_hash", base, "generate_block_hash_extra_keys",
                    ("request", "start_token_idx", "end_token_idx", "start_mm_idx"))

    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm_idx = original(request, start_token_idx, end_token_idx, start_mm_idx)
        info = request_info(request)
        if info is not None:
            atman_keys = info.block_hash_keys(start_token_idx, end_token_idx)
            if atman_keys:
                keys = (keys or ()) + atman_keys
        return keys, next_mm_idx

    generate_block_hash_extra_keys._atman = True
    for name in _BINDING_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "generate_block_hash_extra_keys"):
            module.generate_block_hash_extra_keys = generate_block_hash_extra_keys
