"""Admission: only payloads this process built and sealed enter the engine, and a bad one
fails its own request before any engine step, leaving everyone else's results unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tolerances import assert_close

PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Q: Where does Otto live? A:"
TARGET = " Lisbon"
UNSEALED = [
    {"bias": {"positions": [1], "factors": [0.1], "mode": "log-additive"}},  # well-formed, but not ours
    {"bias": {"positions": [1], "factors": [1e300], "mode": "multiplicative"}},  # what once stopped the engine
    {"bias": {"positions": "x"}, "seal": "0" * 64},  # a forged seal
    {"target_start": -5},
    "not json",
    json.dumps({"bias": {"positions": [0], "factors": [0.5], "mode": "log-additive"}}),  # JSON text, as vllm_xargs
    5,
    [],
]


def _generate(llm, extra_args):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = llm.tokenizer.encode(PROMPT)[0]
    return llm.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                            [SamplingParams(max_tokens=2, extra_args=extra_args)], use_tqdm=False)


@pytest.mark.parametrize("payload", UNSEALED, ids=lambda p: str(p)[:40])
def test_unsealed_payloads_are_refused_naming_the_field(engines, payload):
    from vllm.exceptions import VLLMValidationError

    llm = engines["llama"]
    before = llm.explain(PROMPT, TARGET, granularity="word")
    with pytest.raises(VLLMValidationError) as err:
        _generate(llm, {"atman": payload})
    assert err.value.parameter == "vllm_xargs.atman" and "reserved" in str(err.value)
    after = llm.explain(PROMPT, TARGET, granularity="word")
    # Not bitwise: the second explain reads the first one's prefix-cache blocks. Scores are
    # differences of cross-entropies, so the tolerance follows the cross-entropies' size.
    scale = abs(before.target_tokens[0].logprob) + max(abs(s.score) for s in before.explanations[0].prompt_scores)
    assert_close([s.score for s in after.explanations[0].prompt_scores],
                 [s.score for s in before.explanations[0].prompt_scores], "float32", scale=scale)
    assert llm.kv_block_stats()["free"] > 0


def test_sealed_payload_that_does_not_fit_its_prompt_fails_alone(engines):
    from atman_vllm.core import KeyBias
    from atman_vllm.vllm.admission import RejectedPayload
    from atman_vllm.vllm.wire import AtmanRequestInfo

    llm = engines["llama"]
    num_tokens = len(llm.tokenizer.encode(PROMPT)[0]) + 1  # with BOS
    for info in (AtmanRequestInfo(KeyBias((num_tokens + 3,), (0.1,))),  # past the end
                 AtmanRequestInfo(None, target_start=num_tokens, nonce="n")):  # no target token left
        with pytest.raises(RejectedPayload):
            _generate(llm, info.to_extra_args())
    steered = _generate(llm, AtmanRequestInfo(KeyBias((2,), (0.5,))).to_extra_args())
    assert len(steered[0].outputs[0].token_ids) == 2


def test_worker_leaves_uncomputed_targets_nan_and_the_front_end_fails_that_fork():
    from atman_vllm.core.jobs import ForkJob
    from atman_vllm.vllm.forks import fork_result

    class Output:
        prompt_token_id_logprobs = [1.0, float("nan")]
        num_cached_tokens = 0

    with pytest.raises(RuntimeError, match="non-finite"):
        fork_result(ForkJob((1, 2, 3, 4), 2), Output())
    Output.prompt_token_id_logprobs = [1.0, 2.0]
    assert np.array_equal(fork_result(ForkJob((1, 2, 3, 4), 2), Output()).target_ce, [1.0, 2.0])


def test_a_model_the_biased_attention_cannot_serve_is_refused_at_start(tiny_models, tmp_path):
    """Sliding-window attention: refused while the engine builds its layers, not in a step.

    In a process of its own: a failed in-process engine start tears down vLLM's distributed
    groups, which the session's other in-process engines still use."""
    import json
    import shutil
    import subprocess
    import sys

    model = tmp_path / "qwen2-sliding"
    shutil.copytree(tiny_models["qwen2"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=16, max_window_layers=0,
                  layer_types=["sliding_attention"] * config["num_hidden_layers"])
    (model / "config.json").write_text(json.dumps(config))
    script = ("import sys\nfrom atman_vllm.api import AtmanLLM\nif __name__ == '__main__':\n"
              "    AtmanLLM(sys.argv[1], enforce_eager=True, dtype='float32', max_model_len=256)\n")
    done = subprocess.run([sys.executable, "-c", script, str(model)], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "cannot perturb attention with sliding-window attention" in done.stdout + done.stderr
