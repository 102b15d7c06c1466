"""``atman-vllm doctor``: the report and the self-test, with every seam and with one left out."""

from __future__ import annotations

import os
import subprocess
import sys


def _doctor(model_dir, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "atman_vllm.cli", "doctor", "--model", str(model_dir),
                           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)


def test_doctor_reports_the_engine_and_a_passing_self_test(tiny_models):
    done = _doctor(tiny_models["llama"])
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    width = done.stdout.splitlines()[0].index("0.32.0")  # the report's two columns
    report = {line[:width].strip(): line[width:].strip() for line in done.stdout.splitlines()
              if line and not line.startswith("  -")}
    assert report["vLLM"] == "0.32.0" and report["dtype"] == "float32" and report["block size"] == "32"
    assert report["scheduling policy"] == "priority" and report["self-test"] == "passed"
    assert report["attention backend"].endswith("atman_vllm.vllm.backend_cpu.AtmanCPUAttentionBackend")
    assert report["async scheduling"] == "False"
    assert all(report[f"seam: {s}"] == "installed" for s in ("backend", "admission", "block_hash", "runner_hooks"))
    assert report["CPU kernel ISA (KV layout)"] != "none seen"


def test_doctor_fails_when_a_seam_is_left_out(tiny_models):
    done = _doctor(tiny_models["llama"], ATMAN_VLLM_DISABLE_SEAMS="runner_hooks")
    assert done.returncode == 1, done.stdout
    assert "MISSING" in done.stdout and "FAILED" in done.stdout and "no target scores" in done.stdout
