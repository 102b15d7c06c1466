#!/bin/bash
# The one GPU check (issue 14; benchmarks/gpu/check.py says what it runs). On a
# machine with one CUDA GPU and the project installed with the gpu extra:
#   bash benchmarks/gpu/check.sh        # results and logs under $OUT (default ./gpu_check_out)
# Bounded to 8 minutes; prints one table. Exit 2: no GPU.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
test -x "$PY" || PY=python3
exec timeout 480 "$PY" benchmarks/gpu/check.py
