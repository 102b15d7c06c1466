"""Attention controls steer generation (issue: steering), on the real engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atman_vllm.core import Control, plan_controls
from tolerances import assert_close

from .conftest import ENGINE_ARGS

VOCAB = 1024  # the factory default vocabulary: ask for every logprob
PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Ben likes to eat burgers and fries. Q: Who flies? A:"


def _span(text: str, word: str) -> tuple[int, int]:
    start = PROMPT.index(word)
    return start, len(word)


def test_factor_one_changes_nothing(engines):
    llm = engines["llama"]
    plain = llm.generate(PROMPT, max_tokens=8)[0]
    neutral = llm.generate(PROMPT, max_tokens=8, controls=[Control(*_span(PROMPT, "pilot"), 1.0)])[0]
    assert neutral.token_ids == plain.token_ids
    # Bitwise by construction: a factor-1 control is dropped by plan_controls, so both calls send the
    # same token ids without bias, one request alone, to an engine whose prefix cache the generate
    # calls above already filled: the same forward, the same shapes.
    assert llm.next_token_logprobs(PROMPT, controls=[Control(0, 4, 1.0)]) == llm.next_token_logprobs(PROMPT)


@pytest.mark.parametrize("mode,overlap,kappa", [("log-additive", "partial", None), ("multiplicative", "complete", None),
                                                 ("log-additive", "partial", 0.6)])
def test_control_effect_equals_reference_biased_forward(engines, tiny_models, mode, overlap, kappa):
    from atman_vllm.reference import ReferenceExplainer

    llm = engines["llama"]
    controls = [Control(*_span(PROMPT, "Lisbon"), 0.05), Control(PROMPT.index("ilot"), 3, 3.0)]  # partial token
    top = llm.next_token_logprobs(PROMPT, controls=controls, control_mode=mode, control_overlap=overlap,
                                  control_kappa=kappa)
    token_ids, bias = plan_controls(PROMPT, llm.tokenizer, controls, mode, kappa, overlap, llm.embedding_rows)
    assert bias is not None
    reference = ReferenceExplainer(tiny_models["llama"])
    biased = reference.biased_next_token_logprobs(token_ids, bias)
    ids = list(top)
    # The fidelity bound (as in test_engine_fidelity): vLLM and transformers round differently.
    # Low logprobs make the scale large; assert_close then allows 64 eps x scale if that is more.
    assert_close([top[i] for i in ids], biased[ids], torch.float32, bound=1e-4, what="biased next-token logprobs")
    # ... and the controls really moved the distribution.
    assert np.abs(biased - reference.biased_next_token_logprobs(token_ids, None)).max() > 1e-2


@pytest.fixture(scope="session")
def copy_model_llm(tiny_models, tmp_path_factory):
    """A llama whose next token is the prompt token it attends to most (uniform attention, value = identity).

    Session-scoped like every in-process engine: released at the end of this module, its engine core's
    shutdown would tear down vLLM's distributed groups that the session's other in-process engines use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from atman_vllm.api import AtmanLLM

    src = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = model.config
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            layer.mlp.down_proj.weight.zero_()
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.weight.zero_()
            if i == 0:  # equal scores everywhere; values copy the token embedding into the residual
                kv_dim = cfg.num_key_value_heads * cfg.head_dim
                attn.v_proj.weight[:, :kv_dim] = 8.0 * torch.eye(kv_dim)
                group = cfg.num_attention_heads // cfg.num_key_value_heads
                for kv in range(cfg.num_key_value_heads):
                    q_head = kv * group
                    rows = slice(kv * cfg.head_dim, (kv + 1) * cfg.head_dim)
                    cols = slice(q_head * cfg.head_dim, (q_head + 1) * cfg.head_dim)
                    attn.o_proj.weight[rows, cols] = torch.eye(cfg.head_dim)
        model.model.norm.weight.fill_(1.0)
        model.get_output_embeddings().weight.copy_(emb)
    out = tmp_path_factory.mktemp("copy_model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return AtmanLLM(str(out), **ENGINE_ARGS, max_logprobs=VOCAB)


def test_amplify_raises_and_suppress_lowers_the_attended_token(copy_model_llm):
    llm = copy_model_llm
    prompt = "Otto lives in Lisbon. Mira works as a pilot. Q:"
    word = next(w for w in (" pilot", " Lisbon", " works", " lives", " Mira") if len(llm.tokenizer.encode(w)[0]) == 1)
    (token,) = llm.tokenizer.encode(word)[0]
    span = (prompt.index(word), len(word))

    def p(factor):
        controls = [] if factor == 1 else [Control(*span, factor)]
        return llm.next_token_logprobs(prompt, controls=controls, num_logprobs=VOCAB).get(token, -np.inf)

    base, amplified, suppressed = p(1), p(4.0), p(0.1)
    assert amplified > base + 0.1 > suppressed + 0.2


def test_controlled_requests_share_only_the_uncontrolled_prefix(engines):
    llm = engines["gpt2"]
    prompt = "Cache rule probe. " + PROMPT * 2  # ~80 tokens: a few 32-token blocks
    start = prompt.index("pilot", 60)
    controls = [Control(start, 5, 0.2)]
    token_ids, bias = plan_controls(prompt, llm.tokenizer, controls)
    first = bias.first_position
    block = ENGINE_ARGS["block_size"]

    plain = llm.generate(prompt, max_tokens=2)[0]
    controlled = llm.generate(prompt, max_tokens=2, controls=controls)[0]
    plain_again = llm.generate(prompt, max_tokens=2)[0]
    controlled_again = llm.generate(prompt, max_tokens=2, controls=controls)[0]

    assert plain.cached_tokens == 0
    assert controlled.cached_tokens == block * (first // block)  # only blocks before the first controlled token
    full = block * ((len(token_ids) - 1) // block)
    assert plain_again.cached_tokens == full  # its own blocks, not the controlled ones
    assert controlled_again.cached_tokens == full
    assert controlled_again.token_ids == controlled.token_ids and plain_again.token_ids == plain.token_ids
