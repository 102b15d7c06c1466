"""Computes explanations in a process of its own, with either backend.

vLLM serves some families (GPT-NeoX in 0.32.0) through its Transformers
backend, which rewrites Hugging Face model classes in the process that loads
them; a reference model of that family built in the same process would then
break. So the engine tests compute reference results, and the vLLM results
for such a family, in fresh interpreters: JSON cases on stdin, JSON results
on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys


def compute(cases: list[dict], backend: str) -> list[dict]:
    from atman_vllm.core import ExplainOptions

    def load(model_dir):
        if backend == "reference":
            from atman_vllm.reference import ReferenceExplainer

            return ReferenceExplainer(model_dir)
        from atman_vllm.api import AtmanLLM

        from .conftest import ENGINE_ARGS

        return AtmanLLM(model_dir, **ENGINE_ARGS)

    explainers = {}
    out = []
    for case in cases:
        model = case["model_dir"]
        if model not in explainers:
            explainers[model] = load(model)
        options = ExplainOptions.from_dict(case["options"])
        out.append(explainers[model].explain(case["prompt"], case["target"], options).to_dict())
    return out


def results_in_subprocess(cases: list[dict], backend: str = "reference") -> list[dict]:
    """Run ``compute`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "engine.reference_runner", backend], input=json.dumps(cases),
                          capture_output=True, text=True, cwd=__file__.rsplit("/engine/", 1)[0], timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} runner failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.rsplit("\nRESULTS", 1)[1])


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    results = compute(cases, sys.argv[1])
    print("\nRESULTS" + json.dumps(results))
