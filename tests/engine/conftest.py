"""Real vLLM engines for the engine tests, started once per session.

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): several can
share one process and start in seconds. The multiprocess path (plugin loaded
by entry point in spawned engine and worker processes) is covered by the
stock-behaviour test, the async tests and the service tests.
"""

from __future__ import annotations

import contextlib
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

# Small, float32 (fidelity is checked at 1e-4), eager (no compile warm-up),
# 32-token blocks: several blocks for a 100-token context.
ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=1024, block_size=32,
                   kv_cache_memory_bytes=128 << 20)



@contextlib.contextmanager
def multiprocess_engine():
    """Start the engine core and worker in processes of their own."""
    previous = os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    try:
        yield
    finally:
        if previous is not None:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


# vLLM 0.32.0 serves GPT-NeoX through its Transformers backend, which rewrites
# the Hugging Face GPT-NeoX classes in the process that loads the model; the
# reference tests build those classes in this process. So GPT-NeoX's vLLM
# results are computed in a subprocess (reference_runner), never here.
IN_PROCESS_FAMILIES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="session")
def engines(tiny_models):
    """One in-process AtmanLLM per family of IN_PROCESS_FAMILIES."""
    from atman_vllm.api import AtmanLLM

    return {family: AtmanLLM(str(tiny_models[family]), **ENGINE_ARGS) for family in IN_PROCESS_FAMILIES}


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
    from .reference_runner import results_in_subprocess
    from .texts import FIDELITY_CASES

    cases = [dict(engine=engine, model_dir=str(tiny_models[family]), prompt=p, target=t, options=o)
             for engine, family, p, t, o in FIDELITY_CASES]
    return list(zip(cases, results_in_subprocess(cases, "reference")))


@pytest.fixture(scope="session")
def subprocess_vllm_results(reference_cases):
    """vLLM results of the cases whose family cannot load in this process."""
    cases = [c for c, _ in reference_cases if c["engine"] not in (*IN_PROCESS_FAMILIES, "chunked")]
    from .reference_runner import results_in_subprocess

    return [(c, r) for c, r in zip(cases, results_in_subprocess(cases, "vllm"))]


async def cancel_mid_explain(llm, request):
    """Start explaining ``request``, cancel it once the base run and some forks are done (others in
    flight), wait until the engine(s) gave the aborted forks' blocks back; (before, after, progress)."""
    import asyncio

    before = await llm.kv_block_stats()
    progress = []
    task = asyncio.ensure_future(llm.explain(request, on_progress=lambda done, total: progress.append((done, total))))
    while len(progress) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):  # aborts reach the engine cores asynchronously
        after = await llm.kv_block_stats()
        if after == before:
            break
        await asyncio.sleep(0.05)
    return before, after, progress


@pytest.fixture(scope="session")
def shapes_vlm():
    """The shipped, trained Idefics3 (``tiny-shapes-vlm``): its attention is as peaked as a model's
    that looks, which random weights' is not."""
    from atman_vllm.models import resolve_model

    return resolve_model("tiny-shapes-vlm")


@pytest.fixture(scope="session")
def vlm_engine(shapes_vlm):
    """An in-process AtmanLLM on the shapes VLM (up to 4 images per prompt, no image splitting)."""
    from atman_vllm.api import AtmanLLM

    return AtmanLLM(str(shapes_vlm), **{**ENGINE_ARGS, "max_model_len": 256})


@pytest.fixture(scope="session")
def vlm_reference(shapes_vlm):
    from atman_vllm.reference.vlm import ReferenceVLMExplainer

    return ReferenceVLMExplainer(shapes_vlm)
