"""A hand-built Llama whose prediction depends on exactly one input token.

Starting from the factory's random tiny Llama (GQA), the weights are edited
so that one "needle" token both draws attention and carries the only signal
that reaches the target's logit:

- residual dims 0..2 are reserved: every token has dim 2 = 1 (a constant
  feature for the query), only the needle has dim 0 (its identity), no
  embedding uses dim 1 (the output channel);
- layer 0, head 0: the query reads dim 2, the key reads dim 0, so the needle
  scores ~+3 and every other key 0 (the q/k pair sits in RoPE's slowest
  frequency, which barely rotates over a short prompt); the value reads dim 0
  and o_proj writes it to dim 1;
- every other path that could carry information to the last position is cut
  (head 0's other projections, the MLPs, layer 1's outputs) and the target
  token's lm_head row reads only dim 1.

So suppressing the needle must raise the target's cross-entropy and
suppressing anything else lowers it (the needle's share grows): the needle
must get the top score, in both modes.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from atman_vllm.core import Mode
from atman_vllm.reference import ReferenceExplainer

PROMPT = "Alice found a bright lamp in Paris yesterday, then she walked home. Q: Where was the lamp? A:"
NEEDLE, TARGET = " Paris", " Oslo"


def _needle_llama(model_dir, needle_id: int, target_id: int):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    head_dim = cfg.head_dim
    slow = head_dim // 2 - 1  # RoPE pairs (i, i + head_dim/2); pair head_dim/2 - 1 has the lowest frequency
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, :3] = 0.0
        emb[:, 2] = 1.0
        emb[needle_id] = 0.0
        emb[needle_id, 0], emb[needle_id, 2] = 2.0, 1.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            layer.mlp.down_proj.weight.zero_()
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.weight.zero_()
        attn = model.model.layers[0].self_attn
        attn.q_proj.weight[slow, 2] = 0.58  # query head 0 (uses KV head 0)
        attn.k_proj.weight[slow, 0] = 0.58  # KV head 0
        attn.v_proj.weight[0, 0] = 0.4
        attn.o_proj.weight[1, 0] = 1.0  # query head 0, value dim 0 -> residual dim 1
        model.model.norm.weight.fill_(1.0)
        head = model.get_output_embeddings().weight
        head[:, 1] = 0.0
        head[target_id] = 0.0
        head[target_id, 1] = 1.0
    return model


@pytest.fixture(scope="module")
def needle_explainer(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    (needle_id,) = tok(NEEDLE, add_special_tokens=False)["input_ids"]
    (target_id,) = tok(TARGET, add_special_tokens=False)["input_ids"]
    return ReferenceExplainer(_needle_llama(tiny_models["llama"], needle_id, target_id), tok)


@pytest.mark.parametrize("granularity", ["token", "word"])
@pytest.mark.parametrize("mode", list(Mode))
def test_the_needle_gets_the_top_score(needle_explainer, mode, granularity):
    result = needle_explainer.explain(PROMPT, TARGET, mode=mode, granularity=granularity)
    scores = result.explanations[0].prompt_scores
    top = max(scores, key=lambda s: s.score)
    assert (top.text, top.start) == ("Paris", PROMPT.index("Paris"))
    assert top.score > 1.0
    assert all(s.score < 0.05 * top.score for s in scores if s is not top)
    # The construction really makes the target likely only through the needle.
    assert result.target_tokens[0].logprob > -2.0
    without_needle = needle_explainer.explain(PROMPT.replace(" Paris", " Lima"), TARGET, mode=mode)
    assert without_needle.target_tokens[0].logprob < -4.0
