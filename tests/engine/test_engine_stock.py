"""With the plugin loaded, unperturbed requests behave exactly as stock vLLM.

Both sides run in fresh interpreters with the default multiprocess engine,
so this also shows the plugin loading by entry point in vLLM's spawned
engine-core and worker processes. ``VLLM_PLUGINS=""`` loads no plugin at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tolerances import assert_close, tolerance

SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

def main():
    llm = LLM(model=sys.argv[1], enforce_eager=True, dtype="float32", max_model_len=256, block_size=32,
              kv_cache_memory_bytes=64 << 20)
    prompts = ["Ben likes to eat burgers and", "Mira works as a pilot in", "The quick brown fox"]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=3)
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen = [{"ids": list(o.outputs[0].token_ids),
            "lp": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]} for o in outs]
    mixed = None
    if sys.argv[2] == "mixed":
        # Perturbed forks in the same batch as the unperturbed prompts.
        from atman_vllm.core import KeyBias
        from atman_vllm.vllm.wire import AtmanRequestInfo
        tok = llm.get_tokenizer()
        ids = tok(prompts[0])["input_ids"]
        forks = [SamplingParams(max_tokens=8, temperature=0.0, logprobs=3,
                                extra_args=AtmanRequestInfo(KeyBias((p,), (0.1,))).to_extra_args()) for p in (1, 2, 3)]
        outs = llm.generate(prompts + [TokensPrompt(prompt_token_ids=ids)] * 3, [params] * 3 + forks, use_tqdm=False)
        mixed = [{"ids": list(o.outputs[0].token_ids),
                  "lp": [{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs]} for o in outs]
    print("RESULT" + json.dumps({"gen": gen, "mixed": mixed}))

if __name__ == "__main__":
    main()
"""


def _run(model_dir, plugins: str | None, mode: str) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), mode], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _logprobs(outputs: list[dict]) -> list[float]:
    return [lp for o in outputs for step in o["lp"] for _, lp in sorted(step.items())]


def _top_tokens(output: dict) -> list:
    return [output["ids"], [sorted(step) for step in output["lp"]]]


def test_plugin_leaves_stock_generation_unchanged(tiny_models):
    stock = _run(tiny_models["llama"], "", "plain")
    with_plugin = _run(tiny_models["llama"], None, "mixed")
    # Bitwise by construction: the same prompts in the same batches through the same stock kernels
    # (the plugin's backend hands batches without perturbations to the stock implementation).
    assert with_plugin["gen"] == stock["gen"]
    # Unperturbed rows of a batch that also holds perturbed forks are untouched too: the same tokens
    # and top-logprob tokens, and logprobs equal up to float32 rounding (not bitwise by construction:
    # the larger batch gives the GEMMs other shapes).
    mixed = with_plugin["mixed"][:3]
    assert [_top_tokens(o) for o in mixed] == [_top_tokens(o) for o in stock["gen"]]
    assert_close(_logprobs(mixed), _logprobs(stock["gen"]), torch.float32, what="unperturbed rows")
    # ... and the forks really were perturbed: other tokens, or logprobs beyond rounding.
    plain = with_plugin["mixed"][0]
    rounding = tolerance(torch.float32, max(abs(lp) for lp in _logprobs([plain])))

    def moved(fork: dict) -> bool:
        if _top_tokens(fork) != _top_tokens(plain):
            return True
        return max(abs(a - b) for a, b in zip(_logprobs([fork]), _logprobs([plain]))) > 100 * rounding

    assert any(moved(f) for f in with_plugin["mixed"][3:])
