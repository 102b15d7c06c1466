"""vLLM general plugin: loaded by vLLM in every process (entry point
``vllm.general_plugins`` → ``atman``). Installs the AtMan attention backend
and the scheduler and runner hooks; see docs/vllm_touchpoints.md."""

from __future__ import annotations

import os

_installed = False
# Seams to leave out (comma-separated): a diagnostic switch, so that a test can show the
# start-up self-test refusing an engine whose seam is missing (as after a vLLM upgrade).
DISABLE_ENV = "ATMAN_VLLM_DISABLE_SEAMS"
SEAMS = ("backend", "admission", "block_hash", "runner_hooks")


def register() -> None:
    global _installed
    if _installed:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import admission, block_hash, runner_hooks
    from .seams import check_vllm_version

    check_vllm_version()
    from .forks import check_multimodal_seams

    check_multimodal_seams()
    disabled = {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}
    if disabled - set(SEAMS):
        raise ValueError(f"{DISABLE_ENV}: unknown seams {sorted(disabled - set(SEAMS))}; known: {', '.join(SEAMS)}")
    if "backend" not in disabled:
        _check_stock_backend(current_platform)
        if current_platform.is_cpu():
            register_backend(AttentionBackendEnum.CPU_ATTN, "atman_vllm.vllm.backend_cpu.AtmanCPUAttentionBackend")
        elif current_platform.is_cuda():
            # vLLM's CUSTOM slot, selected by AtmanLLM / serve (engine_config.CUDA_BACKEND); an
            # engine that does not ask for it keeps stock TRITON_ATTN. The CPU platform
            # ignores a backend selection (always CPU_ATTN), hence the override above.
            register_backend(AttentionBackendEnum.CUSTOM, "atman_vllm.vllm.backend_gpu.AtmanTritonAttentionBackend")
    if "admission" not in disabled:
        admission.install()
    if "block_hash" not in disabled:
        block_hash.install()
    if "runner_hooks" not in disabled:
        runner_hooks.install(GPUModelRunner)
    _install_kv_block_stats()
    _installed = True


def _check_stock_backend(platform) -> None:
    from .biased_attention import check_stock_impl

    if platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as stock
    elif platform.is_cuda():
        from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl as stock
    else:
        return
    check_stock_impl(stock)


def _install_kv_block_stats() -> None:
    """An engine-core utility method, so tests and the server can check that
    aborted or finished explanations give every KV block back."""
    from vllm.v1.engine.core import EngineCore

    def atman_kv_block_stats(self) -> dict:
        pool = self.scheduler.kv_cache_manager.block_pool
        return {"free": pool.get_num_free_blocks(), "total": pool.num_gpu_blocks}

    def atman_cached_blocks(self) -> int:
        """Blocks in this engine's prefix cache (scale-out tests: which replica holds which forks)."""
        return len(self.scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block)

    EngineCore.atman_kv_block_stats = atman_kv_block_stats
    EngineCore.atman_cached_blocks = atman_cached_blocks


def seam_status() -> dict[str, bool]:
    """Which seams are installed in this process (the worker's are checked by the self-test)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    backend = AttentionBackendEnum.CPU_ATTN if current_platform.is_cpu() else AttentionBackendEnum.CUSTOM
    try:
        backend_installed = backend.get_path().startswith("atman_vllm.")
    except ValueError:  # CUSTOM that nothing registered
        backend_installed = False
    return {
        "backend": backend_installed,
        "admission": getattr(InputProcessor.process_inputs, "_atman", False),
        "block_hash": getattr(kv_cache_utils.generate_block_hash_extra_keys, "_atman", False),
        "runner_hooks": getattr(GPUModelRunner, "_atman_hooks_installed", False),
    }
