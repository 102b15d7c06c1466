"""`atman-vllm explain --backend vllm --json` end to end: a real console script,
a real multiprocess engine, output that validates against the contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema

from atman_vllm.core import EXPLAIN_RESULT_SCHEMA


def test_cli_explain_with_vllm_backend_prints_the_contract(tiny_models):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    cmd = [sys.executable, "-m", "atman_vllm.cli", "explain", "--model", str(tiny_models["llama"]),
           "--prompt", "Ben likes to eat burgers and", "--target", " fries", "--granularity", "word",
           "--backend", "vllm", "--json", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
           "--kv-cache-space-gib", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds the JSON alone: vLLM's logs go to stderr
    jsonschema.validate(result, EXPLAIN_RESULT_SCHEMA)
    assert [s["text"] for s in result["explanations"][0]["prompt_scores"]] == ["Ben", "likes", "to", "eat", "burgers", "and"]
    assert result["stats"]["forward_passes"] == 7
