"""vLLM general plugin: loaded by vLLM in every process (entry point
``vllm.general_plugins`` → ``atman``). Installs the AtMan attention backend
and the scheduler and runner hooks; see docs/vllm_touchpoints.md."""

from __future__ import annotations

_installed = False


def register() -> None:
    global _installed
    if _installed:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from . import admission, block_hash, runner_hooks

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, "atman_vllm.vllm.backend_cpu.AtmanCPUAttentionBackend")
    elif current_platform.is_cuda():
        # AtmanLLM selects TRITON_ATTN on CUDA: its cache layout is the one the kernel reads.
        register_backend(AttentionBackendEnum.TRITON_ATTN, "atman_vllm.vllm.backend_gpu.AtmanTritonAttentionBackend")
    admission.install()
    block_hash.install()
    runner_hooks.install(GPUModelRunner)
    _install_kv_block_stats()
    _installed = True


def _install_kv_block_stats() -> None:
    """An engine-core utility method, so tests and the server can check that
    aborted or finished explanations give every KV block back."""
    from vllm.v1.engine.core import EngineCore

    def atman_kv_block_stats(self) -> dict:
        pool = self.scheduler.kv_cache_manager.block_pool
        return {"free": pool.get_num_free_blocks(), "total": pool.num_gpu_blocks}

    EngineCore.atman_kv_block_stats = atman_kv_block_stats
