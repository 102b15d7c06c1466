"""AtMan quality numbers come through the vLLM engine: same scores as the reference, same ranking."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from atman_vllm.quality.harness import DEFAULT_MODEL_DIR, evaluate, load_explainer
from atman_vllm.quality.tasks import generate_examples
from tolerances import assert_close

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def vllm_explainer():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return load_explainer("vllm", DEFAULT_MODEL_DIR)


def test_vllm_and_reference_agree_on_demo_model(vllm_explainer):
    examples = generate_examples(4, seed=31)
    methods = ["atman", "atman-kappa", "atman-mult"]
    fast = evaluate(examples, backend="vllm", methods=methods, progress=False, explainer=vllm_explainer, threads=1)
    ref = evaluate(examples, backend="reference", methods=methods, progress=False, threads=1)
    for key, scores in ref.unit_scores.items():
        for a, b in zip(fast.unit_scores[key], scores):
            # The fidelity bound, 1e-4 plus 1e-4 of the largest score (vLLM and transformers round differently).
            assert_close(a, b, torch.float32, bound=1e-4 * (1 + np.abs(b).max()), what=str(key))
    rows = {(r.method, r.granularity): r for r in fast.rows}
    assert rows[("atman", "sentence")].backend == "vllm"
    assert rows[("atman", "sentence")].summary.mAP >= 0.75
