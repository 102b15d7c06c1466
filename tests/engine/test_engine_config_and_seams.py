"""The pinned engine settings (engine_config) and the seams' install-time checks (seams).

The CUDA pins cannot run here (no GPU in CI); they are plain argument rewriting, so
they are tested by asking for the CUDA platform explicitly.
"""

import pytest

from atman_vllm.vllm.engine_config import (
    CPU_EXPLAIN_DTYPE,
    CUDA_BACKEND,
    V2_RUNNER_ENV,
    UnsupportedEngineSetting,
    supported_engine_kwargs,
)
from atman_vllm.vllm.seams import SeamMismatch, check_vllm_version, expect_fields, expect_function


def test_cuda_pins_v1_runner_custom_backend_sync_scheduling_and_piecewise_graphs():
    environ: dict = {}
    kw = supported_engine_kwargs("m", {"max_model_len": 64}, platform="cuda", environ=environ)
    assert environ[V2_RUNNER_ENV] == "0"
    assert kw["attention_backend"] == CUDA_BACKEND
    assert kw["async_scheduling"] is False
    assert kw["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}
    assert kw["max_model_len"] == 64 and kw["enable_prefix_caching"] is True
    assert "dtype" not in kw  # CUDA keeps vLLM's dtype choice (not measured there)


def test_cuda_keeps_compatible_user_settings():
    kw = supported_engine_kwargs("m", {"compilation_config": {"cudagraph_mode": "NONE", "mode": 0},
                                       "attention_backend": "CUSTOM", "async_scheduling": False},
                                 platform="cuda", environ={V2_RUNNER_ENV: "0"})
    assert kw["compilation_config"] == {"cudagraph_mode": "NONE", "mode": 0}


@pytest.mark.parametrize("engine_args, environ, setting", [
    ({}, {V2_RUNNER_ENV: "1"}, V2_RUNNER_ENV),
    ({"attention_backend": "TRITON_ATTN"}, {}, "attention_backend"),
    ({"async_scheduling": True}, {}, "async_scheduling"),
    ({"compilation_config": {"cudagraph_mode": "FULL_AND_PIECEWISE"}}, {}, "compilation_config.cudagraph_mode"),
    ({"compilation_config": {"cudagraph_mode": "full_decode_only"}}, {}, "compilation_config.cudagraph_mode"),
])
def test_cuda_refuses_conflicting_settings_by_name(engine_args, environ, setting):
    with pytest.raises(UnsupportedEngineSetting) as err:
        supported_engine_kwargs("m", engine_args, platform="cuda", environ=environ)
    assert err.value.setting == setting and str(err.value).startswith(setting)


def test_cpu_defaults_and_float32_explanations():
    kw = supported_engine_kwargs("m", {"dtype": "auto"}, platform="cpu", environ={})
    assert kw["dtype"] == CPU_EXPLAIN_DTYPE == "float32"
    assert kw["block_size"] == 32 and kw["kv_cache_memory_bytes"] == 1 << 30
    assert supported_engine_kwargs("m", {"dtype": "bfloat16"}, platform="cpu", environ={})["dtype"] == "bfloat16"
    # The KV-cache size follows vLLM's own variable when the user set it.
    assert "kv_cache_memory_bytes" not in supported_engine_kwargs("m", {}, platform="cpu",
                                                                  environ={"VLLM_CPU_KVCACHE_SPACE": "2"})


class _Stock:
    def forward(self, layer, query, key):
        return query


def test_expect_function_names_the_seam_and_the_mismatch():
    assert expect_function("s", _Stock, "forward", ("layer", "query")) is _Stock.forward
    with pytest.raises(SeamMismatch, match=r"seam 'backend'.*_Stock.forward takes \(layer, query, key\)"):
        expect_function("backend", _Stock, "forward", ("layer", "query", "key", "value"))
    with pytest.raises(SeamMismatch, match=r"_Stock.missing is missing"):
        expect_function("backend", _Stock, "missing", ())


def test_expect_fields_and_version():
    from vllm.v1.outputs import ModelRunnerOutput

    expect_fields("runner_hooks", ModelRunnerOutput, ("prompt_token_id_logprobs_dict",))
    with pytest.raises(SeamMismatch, match="no field nope"):
        expect_fields("runner_hooks", ModelRunnerOutput, ("nope",))
    check_vllm_version("0.32.0+cpu")
    with pytest.raises(SeamMismatch, match="found vLLM 0.33.1"):
        check_vllm_version("0.33.1")


def test_every_installed_seam_matches_the_installed_vllm():
    """What each owner module checks before it patches, against the real vLLM 0.32.0."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from atman_vllm.vllm import plugin
    from atman_vllm.vllm.biased_attention import check_stock_impl

    check_vllm_version()
    check_stock_impl(CPUAttentionBackendImpl)
    plugin.register()
    status = plugin.seam_status()
    assert status == {"backend": True, "admission": True, "block_hash": True, "runner_hooks": True}
    # Installed wrappers keep the originals reachable, and a second check sees through them.
    expect_function("admission", InputProcessor, "process_inputs", ("request_id", "prompt", "params"))
    expect_function("block_hash", kv_cache_utils, "generate_block_hash_extra_keys", ("request", "start_token_idx"))
    assert GPUModelRunner._atman_hooks_installed


def test_the_image_path_seams_and_pins():
    """What the image path uses of vLLM (touchpoints row 24) is checked at start-up; Idefics3 engines
    get image splitting off and an image limit, and splitting on is refused by name."""
    from typing import TypedDict

    from atman_vllm.vllm.forks import check_multimodal_seams
    from atman_vllm.vllm.seams import expect_keys

    check_multimodal_seams()

    class OldPrompt(TypedDict):
        prompt_token_ids: list

    with pytest.raises(SeamMismatch, match="no key multi_modal_uuids"):
        expect_keys("multimodal", OldPrompt, ("prompt_token_ids", "multi_modal_uuids"))


def test_idefics3_engines_pin_one_grid_per_image(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    kwargs = supported_engine_kwargs(str(tmp_path), {}, platform="cpu", environ={})
    assert kwargs["mm_processor_kwargs"] == {"do_image_splitting": False}
    assert kwargs["limit_mm_per_prompt"] == {"image": 4}
    with pytest.raises(UnsupportedEngineSetting) as e:
        supported_engine_kwargs(str(tmp_path), {"mm_processor_kwargs": {"do_image_splitting": True}},
                                platform="cpu", environ={})
    assert e.value.setting == "mm_processor_kwargs.do_image_splitting"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "mm_processor_kwargs" not in supported_engine_kwargs(str(tmp_path), {}, platform="cpu", environ={})
