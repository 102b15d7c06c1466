#!/usr/bin/env python
"""The one GPU check (issue 14): on a single CUDA GPU, in at most ~8 minutes,

1. start an engine with the plugin (AtmanLLM: engine_config pins the V1 runner,
   synchronous scheduling, piecewise CUDA graphs and the CUSTOM AtMan backend)
   and run the start-up self-test (vllm/self_test.py);
2. compare its scores with the plain-transformers reference on a tiny random
   Llama, float32 and bfloat16, both modes, kappa on and off (token units);
3. run the kernel micro-benchmark against stock TRITON_ATTN (bench_kernel.py --quick);
4. time one explanation against Captum's RemoteLLMAttribution (FeatureAblation,
   one /v1/completions request per ablation) over a stock vLLM server
   (``VLLM_PLUGINS=''``) on the same model.

and print one table. ``bash benchmarks/gpu/check.sh`` runs it; everything
written goes to ``$OUT`` (or ./gpu_check_out). Exits 2 without a GPU.
Not run in CI (no GPU there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("OUT") or "gpu_check_out")
PROMPT = ("The keeper of the lighthouse on the northern cape counts the ships every night. "
          "Anna keeps bees behind the old mill. Tom repairs clocks in the city. ") * 3 + "Anna keeps"
TARGET = " bees"
rows: list[tuple[str, str, str]] = []  # (check, result, detail)


def row(check: str, ok: bool | None, detail: str) -> None:
    rows.append((check, {True: "pass", False: "FAIL", None: "info"}[ok], detail))
    print(f"[check] {check}: {rows[-1][1]} {detail}", flush=True)


def build_model() -> Path:
    from atman_vllm.models import build_tiny_model

    return build_tiny_model("llama", OUT / "tiny_llama", seed=0, vocab_size=32000, hidden=256, layers=4, heads=8,
                            kv_heads=2, head_dim=32)


def check_engine_and_fidelity(model_dir: Path) -> None:
    from atman_vllm.api import AtmanLLM
    from atman_vllm.reference import ReferenceExplainer

    reference = ReferenceExplainer(model_dir)
    cases = [dict(mode=m, kappa=k) for m in ("log-additive", "multiplicative") for k in (None, 0.6)]
    expected = [reference.explain(PROMPT, TARGET, granularity="token", **c) for c in cases]
    for dtype, rel_tol in (("float32", 1e-4), ("bfloat16", 0.1)):
        t0 = time.perf_counter()
        llm = AtmanLLM(str(model_dir), dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3)
        row(f"engine start ({dtype})", True, f"{time.perf_counter() - t0:.1f} s; backend "
            f"{llm.vllm_config.attention_config.backend}, cudagraph {llm.vllm_config.compilation_config.cudagraph_mode}")
        failures = llm.self_test()
        row(f"self-test ({dtype})", not failures, "; ".join(failures) or "all seams in effect")
        worst = 0.0
        for case, ref in zip(cases, expected):
            got = llm.explain(PROMPT, TARGET, granularity="token", **case)
            a = [s.score for s in got.explanations[0].prompt_scores]
            b = [s.score for s in ref.explanations[0].prompt_scores]
            scale = max(abs(x) for x in b) or 1.0
            worst = max(worst, max(abs(x - y) for x, y in zip(a, b)) / scale)
        row(f"scores vs reference ({dtype})", worst <= rel_tol,
            f"max |diff| / max |score| = {worst:.2e} over {len(cases)} cases (tolerance {rel_tol:g})")
        t0 = time.perf_counter()
        result = llm.explain(PROMPT, TARGET, granularity="token")
        if dtype == "bfloat16":
            row("one explanation, atman-vllm (bf16)", None,
                f"{time.perf_counter() - t0:.2f} s, {result.stats.forward_passes} passes, "
                f"{result.stats.computed_tokens} computed tokens")
        llm.shutdown()
        del llm


def check_kernel(_model_dir: Path) -> None:
    out = OUT / "bench_kernel.json"
    done = subprocess.run([sys.executable, str(HERE / "bench_kernel.py"), "--quick", "--json-out", str(out)],
                          capture_output=True, text=True, timeout=240)
    (OUT / "bench_kernel.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        row("kernel vs stock TRITON_ATTN", False, f"exit {done.returncode}: {done.stderr[-300:]}")
        return
    results = json.loads(out.read_text())["results"]
    # bf16 outputs: errors up to a few bf16 ulps of values of order 1.
    worst = max((v for r in results for v in r["max_abs_err"].values()), default=float("nan"))
    ratios = ", ".join(f"{r['case']} {r['ratio_vs_stock'].get('plain', float('nan')):.2f}x" for r in results)
    row("kernel vs stock TRITON_ATTN (bf16)", worst <= 3e-2,
        f"unbiased kernel / stock: {ratios}; max |error| {worst:.1e} (full table: bench_kernel.log)")


def check_captum_remote(model_dir: Path) -> None:
    from captum.attr import FeatureAblation, RemoteLLMAttribution, TextTokenInput, VLLMProvider
    from transformers import AutoTokenizer

    port = 8765
    env = dict(os.environ, VLLM_PLUGINS="", NO_PROXY="127.0.0.1,localhost")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512",
           "--gpu-memory-utilization", "0.3"]
    log = open(OUT / "stock_server.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    row("Captum RemoteLLMAttribution (stock vLLM server, bf16)", False, "server did not start")
                    return
                time.sleep(2)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        attr = RemoteLLMAttribution(FeatureAblation(RemoteLLMAttribution.placeholder_model), tokenizer,
                                    VLLMProvider(f"http://127.0.0.1:{port}/v1"))
        inp = TextTokenInput(PROMPT, tokenizer)
        t0 = time.perf_counter()
        attr.attribute(inp, target=TARGET)
        row("one explanation, Captum RemoteLLMAttribution (bf16)", None,
            f"{time.perf_counter() - t0:.2f} s, {inp.n_itp_features + 1} requests")
    finally:
        server.kill()  # a stock server with nothing to save
        server.wait()
        log.close()


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu/check.py: no CUDA GPU here; nothing checked", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    row("GPU", None, torch.cuda.get_device_name(0))
    model_dir = build_model()
    for step in (check_engine_and_fidelity, check_kernel, check_captum_remote):
        try:
            step(model_dir)
        except Exception as exc:  # one failed step must not hide the others' rows
            row(step.__name__, False, f"{type(exc).__name__}: {exc}"[:300])
    width = max(len(c) for c, _, _ in rows)
    print("\n| check | result | detail |\n|---|---|---|")
    for check, result, detail in rows:
        print(f"| {check:<{width}} | {result} | {detail} |")
    (OUT / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(r != "FAIL" for _, r, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
