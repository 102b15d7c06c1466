"""The Triton kernels on a CPU-only machine, each check in its own process.

1. interpreter_cases.py runs the kernels in Triton's interpreter against the
   float64 reference. TRITON_INTERPRET=1 has to be in the environment before
   triton.language is first imported, so it is set only in the child
   process's environment and never in this one (no leak into other folders).
2. compile_check compiles a few specialisations for sm_90 with the ptxas
   that ships in the Triton wheel: the interpreter never runs the compiler,
   so type and layout errors would otherwise only show up on a GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("interpreter_cases.py")


def test_triton_kernels_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", str(CASES)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = res.stdout + res.stderr
    summary = report.strip().splitlines()[-1] if report.strip() else ""
    print(summary)
    assert res.returncode == 0, report
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 15 and "failed" not in summary and "error" not in summary, report


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # keep the suite out of ~/.triton
    res = subprocess.run(
        [sys.executable, "-m", "atman_vllm.kernels.compile_check", "--quick", "--json", "--arch", "90"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4, res.stdout + res.stderr
    for row in rows:
        assert row["registers"] is not None and row["spill_bytes"] == 0, row
