"""``atman-vllm doctor``: what this installation runs on, and whether AtMan works in it.

Starts the engine in this process (so the worker's state can be read), prints
the vLLM version, platform, model runner, attention backend, dtype, block
size, the CPU kernels' ISA and each seam of the plugin, then runs the
start-up self-test that ``serve`` runs (atman_vllm/vllm/self_test.py).
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os

from pathlib import Path

from .engine_args import add_engine_arguments, engine_kwargs

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atman-vllm doctor", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory or prepared-model name (default: the demo model)")
    add_engine_arguments(p)
    return p


def _runner_name(llm) -> str:
    executor = llm.llm.llm_engine.engine_core.engine_core.model_executor
    worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
    runner = getattr(worker, "model_runner", None)
    return f"{type(runner).__module__}.{type(runner).__name__}" if runner is not None else "unknown"


def _backend_path(platform) -> str:
    """The class vLLM builds attention layers from on this platform (engine_config pins it on CUDA)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from ..vllm.engine_config import CUDA_BACKEND

    backend = AttentionBackendEnum.CPU_ATTN if platform.is_cpu() else AttentionBackendEnum[CUDA_BACKEND]
    try:
        return f"{backend.name} -> {backend.get_path()}"
    except ValueError as exc:  # CUSTOM that nothing registered
        return f"{backend.name} -> none ({exc})"


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process, to read its state
    import vllm
    from vllm.platforms import current_platform

    from atman_vllm.api import AtmanLLM

    from ..vllm.backend_cpu import PagedKVLayout
    from ..vllm.plugin import seam_status

    llm = AtmanLLM(args.model or str(DEMO_MODEL), **engine_kwargs(args))
    try:
        failures = llm.self_test()
        config = llm.vllm_config
        rows = {
            "vLLM": vllm.__version__,
            "platform": type(current_platform).__name__,
            "model": config.model_config.model,
            "model runner": _runner_name(llm),
            "attention backend": _backend_path(current_platform),
            "async scheduling": str(bool(config.scheduler_config.async_scheduling)),
            "CUDA graph mode": str(getattr(config.compilation_config.cudagraph_mode, "name", "NONE")),
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "block size": str(config.cache_config.block_size),
            "prefix caching": str(bool(config.cache_config.enable_prefix_caching)),
            "scheduling policy": str(config.scheduler_config.policy),
            "CPU kernel ISA (KV layout)": ", ".join(f"{isa} ({k}/{v})" for isa, (k, v) in PagedKVLayout._by_isa.items())
            or "none seen",
        }
        rows.update({f"seam: {name}": "installed" if on else "MISSING" for name, on in seam_status().items()})
        rows["self-test"] = "passed" if not failures else "FAILED"
        width = max(map(len, rows))
        for key, value in rows.items():
            print(f"{key:<{width}}  {value}")
        for failure in failures:
            print(f"  - {failure}")
        return 0 if not failures and all(seam_status().values()) else 1
    finally:
        llm.shutdown()
