"""Computes reference explanations in a process of its own.

vLLM serves some families (GPT-NeoX in 0.32.0) through its Transformers
backend, which rewrites Hugging Face model classes in the process that loads
them; a reference model built in the same process would then break. So the
engine tests ask this script, run with a fresh interpreter, for the reference
results: JSON cases on stdin, JSON results on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys


def compute(cases: list[dict]) -> list[dict]:
    from atman_vllm.core import ExplainOptions
    from atman_vllm.reference import ReferenceExplainer

    explainers: dict[str, ReferenceExplainer] = {}
    out = []
    for case in cases:
        model = case["model_dir"]
        if model not in explainers:
            explainers[model] = ReferenceExplainer(model)
        options = ExplainOptions.from_dict(case["options"])
        out.append(explainers[model].explain(case["prompt"], case["target"], options).to_dict())
    return out


def reference_results(cases: list[dict]) -> list[dict]:
    """Run ``compute`` in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "engine.reference_runner"], input=json.dumps(cases),
                          capture_output=True, text=True, cwd=__file__.rsplit("/engine/", 1)[0], timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"reference runner failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


if __name__ == "__main__":
    json.dump(compute(json.load(sys.stdin)), sys.stdout)
