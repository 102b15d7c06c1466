"""The engine configuration the plugin supports, pinned when AtmanLLM / serve build an engine.

vLLM picks several things by platform that decide whether the seams are in
effect at all (docs/vllm_touchpoints.md, "Pinned engine settings"):

- On CUDA, vLLM 0.32.0 runs **Model Runner V2** whenever Triton is present.
  V2's ``GPUModelRunner`` (``vllm/v1/worker/gpu/model_runner.py``) is not the
  V1 class ``runner_hooks`` wraps, so no bias would reach attention and no
  target score would come back. The V1 runner is pinned
  (``VLLM_USE_V2_MODEL_RUNNER=0``, read by ``VllmConfig.use_v2_model_runner``).
- Async scheduling (a CUDA default) makes ``sample_tokens`` return an output
  that cannot carry the target scores: pinned off.
- Full CUDA graphs replay attention without the per-step Python that builds
  the perturbed sub-batch, so steered decoding would silently run unsteered:
  pinned to piecewise graphs (attention runs eagerly between graph pieces).
- On CUDA the AtMan backend is vLLM's ``CUSTOM`` backend (registered by the
  plugin) and selected here, so engines that do not ask for it keep stock
  TRITON_ATTN. The CPU platform always uses CPU_ATTN (``CpuPlatform.
  get_attn_backend_cls`` ignores a selection), so there the plugin overrides
  CPU_ATTN itself.
- Explanations on CPU default to float32: bfloat16 moves SmolLM2's scores by
  up to 15 % of the largest score and reorders units below the top one
  (benchmarks/results/precision_smollm2.md); ``dtype="bfloat16"`` opts out.

A user setting that contradicts a pin is refused with a message naming it,
before any engine starts.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Defaults that make explanations share the prefix cache well on CPU: small
# blocks (sharing is block-granular) and a KV cache sized for a small machine.
CPU_DEFAULTS = {"block_size": 32, "kv_cache_memory_bytes": 1 << 30}
CPU_EXPLAIN_DTYPE = "float32"
V2_RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"
CUDA_BACKEND = "CUSTOM"  # AttentionBackendEnum.CUSTOM, registered to AtmanTritonAttentionBackend
_FULL_GRAPH_MODES = {"FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"}


class UnsupportedEngineSetting(ValueError):
    """A user's engine setting the plugin cannot serve explanations or steering under."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"{setting}: {message}")
        self.setting = setting


def current_platform_name() -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda():
        return "cuda"
    return str(current_platform.device_type)


def supported_engine_kwargs(model: str, engine_args: dict, platform: str | None = None,
                            environ: dict | None = None) -> dict:
    """vLLM engine arguments for ``model``: the user's, with the pins and defaults above.

    ``environ`` (default ``os.environ``) receives the V1-runner pin on CUDA, so
    the engine-core and worker processes inherit it.
    """
    platform = platform or current_platform_name()
    environ = os.environ if environ is None else environ
    kwargs = dict(engine_args)
    kwargs["model"] = str(model)
    kwargs.setdefault("enable_prefix_caching", True)
    kwargs.setdefault("scheduling_policy", "priority")  # explanation forks run behind generation
    _pin_images(kwargs)
    if platform == "cpu":
        for k, v in CPU_DEFAULTS.items():
            if k == "kv_cache_memory_bytes" and environ.get("VLLM_CPU_KVCACHE_SPACE"):
                continue
            kwargs.setdefault(k, v)
        if kwargs.get("dtype") in (None, "auto"):
            kwargs["dtype"] = CPU_EXPLAIN_DTYPE
    elif platform == "cuda":
        _pin_cuda(kwargs, environ)
    return kwargs


DEFAULT_MAX_IMAGES = 4  # images per prompt, when the caller does not set limit_mm_per_prompt


def model_type(model: str) -> str | None:
    """``model_type`` of a model directory's config.json (None: not a directory with one)."""
    import json
    from pathlib import Path

    path = Path(model) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def _pin_images(kwargs: dict) -> None:
    """Idefics3: one grid of cells per image (core/images.py), so image splitting stays off."""
    if model_type(kwargs["model"]) != "idefics3":
        return
    mm = dict(kwargs.get("mm_processor_kwargs") or {})
    if mm.setdefault("do_image_splitting", False):
        raise UnsupportedEngineSetting("mm_processor_kwargs.do_image_splitting", "image units are tiles of one "
                                       "cell grid per image; a split image is several grids: leave it off")
    kwargs["mm_processor_kwargs"] = mm
    kwargs.setdefault("limit_mm_per_prompt", {"image": DEFAULT_MAX_IMAGES})


def _pin_cuda(kwargs: dict, environ) -> None:
    if environ.get(V2_RUNNER_ENV, "").strip().lower() in ("1", "true", "yes"):
        raise UnsupportedEngineSetting(V2_RUNNER_ENV, "the atman plugin hooks vLLM's V1 model runner; "
                                       "unset it or set it to 0")
    environ[V2_RUNNER_ENV] = "0"
    backend = kwargs.setdefault("attention_backend", CUDA_BACKEND)
    if str(getattr(backend, "name", backend)) != CUDA_BACKEND:
        raise UnsupportedEngineSetting("attention_backend", f"explanations need the AtMan backend "
                                       f"({CUDA_BACKEND}, registered by the plugin), got {backend!r}")
    if kwargs.setdefault("async_scheduling", False):
        raise UnsupportedEngineSetting("async_scheduling", "the target scores ride on the synchronous runner "
                                       "output; turn async scheduling off")
    compilation = kwargs.get("compilation_config")
    mode = _graph_mode(compilation)
    if mode in _FULL_GRAPH_MODES:
        raise UnsupportedEngineSetting("compilation_config.cudagraph_mode",
                                       "full CUDA graphs would replay attention without the per-step bias (steered "
                                       f"decoding would run unsteered); use PIECEWISE or NONE, got {mode}")
    if mode is None:
        if compilation is None or isinstance(compilation, dict):
            kwargs["compilation_config"] = {**(compilation or {}), "cudagraph_mode": "PIECEWISE"}
        else:  # a CompilationConfig
            from vllm.config import CUDAGraphMode

            compilation.cudagraph_mode = CUDAGraphMode.PIECEWISE


def _graph_mode(compilation) -> str | None:
    """The CUDA-graph mode's name in a dict or CompilationConfig, None when unset."""
    mode = compilation.get("cudagraph_mode") if isinstance(compilation, dict) else getattr(
        compilation, "cudagraph_mode", None)
    return None if mode is None else str(getattr(mode, "name", mode)).upper()
