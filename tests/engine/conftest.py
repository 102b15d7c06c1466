"""Real vLLM engines for the engine tests, started once per session.

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): several can
share one process and start in seconds. The multiprocess path (plugin loaded
by entry point in spawned engine and worker processes) is covered by the
stock-behaviour test, the async tests and the service tests.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# Small, float32 (fidelity is checked at 1e-4), eager (no compile warm-up),
# 32-token blocks: several blocks for a 100-token context.
ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=1024, block_size=32,
                   kv_cache_memory_bytes=128 << 20)



@pytest.fixture(scope="session")
def engines(tiny_models):
    """One AtmanLLM per family."""
    from atman_vllm.api import AtmanLLM

    return {family: AtmanLLM(str(tiny_models[family]), **ENGINE_ARGS) for family in ("llama", "qwen2", "gpt2", "gpt_neox")}


@pytest.fixture(scope="session")
def chunked_engine(tiny_models):
    """A llama engine whose prefill chunk (64 tokens) is shorter than the test contexts."""
    from atman_vllm.api import AtmanLLM

    return AtmanLLM(str(tiny_models["llama"]), **{**ENGINE_ARGS, "max_num_batched_tokens": 64,
                                                  "max_num_seqs": 8, "max_model_len": 512})


@pytest.fixture(scope="session")
def reference_cases(tiny_models):
    """Every (family, prompt, target, options) the fidelity tests compare, with
    its reference result computed in a separate process (see reference_runner)."""
    from .reference_runner import reference_results
    from .texts import FIDELITY_CASES

    cases = [dict(engine=engine, model_dir=str(tiny_models[family]), prompt=p, target=t, options=o)
             for engine, family, p, t, o in FIDELITY_CASES]
    return list(zip(cases, reference_results(cases)))
