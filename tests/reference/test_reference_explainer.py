"""The Hugging Face reference explainer on the tiny models of every family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from atman_vllm.core import ForkJob, KeyBias, Mode
from atman_vllm.models import FAMILIES
from atman_vllm.kernels import KeyBiasCSR
from atman_vllm.reference import key_bias_scope
from tolerances import assert_close, tolerance

PROMPT = "Alice found a bright lamp in Paris yesterday. Q: Where was the lamp? A:"
TARGET = " in Paris, near the river"


def _stock_eager(model_dir) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def _ids(explainer, text=PROMPT + TARGET) -> list[int]:
    body, _ = explainer.tokenizer.encode(text)
    return [explainer.tokenizer.bos_token_id, *body]


def _ce_scale(result) -> float:
    """The target cross-entropies' magnitude: a score is a difference of them, so is its rounding error."""
    return max(abs(t.logprob) for t in result.target_tokens)


@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("family", FAMILIES)
def test_factor_one_gives_zero_scores(reference_explainers, family, mode):
    result = reference_explainers[family].explain(
        PROMPT, TARGET, factor=1.0, mode=mode, granularity="word", target_granularity="token"
    )
    scores = [s.score for e in result.explanations for s in (*e.prompt_scores, *e.target_scores)]
    assert len(scores) > 14 * 5
    # Factor 1 leaves every score row bit-identical, but the forks run in batches of other sizes than
    # the unperturbed run (other GEMM shapes): zero up to float32 rounding of the cross-entropies.
    assert_close(scores, np.zeros(len(scores)), torch.float32, scale=_ce_scale(result), what=family)
    # ...while the default factor does move the target's cross-entropy.
    moved = reference_explainers[family].explain(PROMPT, TARGET, mode=mode, granularity="word")
    assert max(abs(s.score) for s in moved.explanations[0].prompt_scores) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_log_additive_factor_equals_masking_the_key(reference_explainers, tiny_models, family):
    explainer = reference_explainers[family]
    ids = _ids(explainer)
    length = len(ids)
    stock = _stock_eager(tiny_models[family])
    for key in (3, length // 2):
        visible = torch.tril(torch.ones(length, length, dtype=torch.bool))
        visible[key:, key] = False  # every row that could see the key, including its own
        mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
        with torch.no_grad():
            masked = stock(torch.tensor([ids]), attention_mask=mask).logits[0]
            plain = stock(torch.tensor([ids])).logits[0]
        # f = 1e-9 leaves the key a weight of ~1e-9: equal to masking up to float32 rounding. Set as a
        # KeyBiasCSR directly, since KeyBias refuses factors below MIN_FACTOR (1e-6), where the key keeps a
        # real weight (~10 eps x the logits here: a modelling difference, not rounding).
        bias = KeyBiasCSR(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([key], dtype=torch.int32),
                          torch.tensor([math.log(1e-9)]), torch.zeros(1, dtype=torch.bool))
        with torch.no_grad(), key_bias_scope(bias):
            biased = explainer.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
        assert (plain - masked).abs().max() > 0.1  # masking that key matters at all
        assert_close(biased, masked, torch.float32, what=f"{family} key {key}")
    # No bias leaks into the next call; unbiased, the reference is exactly stock eager attention.
    # Bitwise by construction: the same matmuls, scale and float32 softmax on the same batch of one;
    # the reference masks with -inf where eager adds a 0 / float32-min mask (same row max, exp of
    # either exactly 0).
    with torch.no_grad():
        assert torch.equal(explainer._logits(ids, [None])[0], stock(torch.tensor([ids])).logits[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_target_units_only_score_later_target_tokens(reference_explainers, family):
    explainer = reference_explainers[family]
    result = explainer.explain(PROMPT, TARGET, granularity="word", target_granularity="token")
    assert len(result.explanations) == len(result.target_tokens) >= 4
    for t, explanation in enumerate(result.explanations):
        earlier = [(tok.start, tok.text) for tok in result.target_tokens[:t]]
        assert [(s.start, s.text) for s in explanation.target_scores] == earlier

    # At the model level: suppressing target position p leaves every target token up to p untouched.
    ids = _ids(explainer)
    start = len(_ids(explainer, PROMPT))
    p = start + 2
    base, perturbed = explainer.run_jobs([
        ForkJob(tuple(ids), start), ForkJob(tuple(ids), start, KeyBias((p,), (0.1,)))
    ])
    unaffected = p - start + 1  # tokens at positions <= p are predicted from positions < p
    # Same values; both rows of one batch, but not bitwise by construction (GEMM tiles by row).
    assert_close(perturbed.target_ce[:unaffected], base.target_ce[:unaffected], torch.float32,
                 scale=np.abs(base.target_ce).max(), what=family)
    assert np.abs(perturbed.target_ce[unaffected:] - base.target_ce[unaffected:]).max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_perturbations_equal_one_at_a_time(reference_explainers, family):
    from atman_vllm.reference import ReferenceExplainer

    batched = reference_explainers[family]
    single = ReferenceExplainer(batched.model, batched.tokenizer, batch_size=1)
    ids = tuple(_ids(batched))
    other = tuple(_ids(batched, "The capital of Norway is Oslo."))
    start = len(_ids(batched, PROMPT))
    jobs = [ForkJob(ids, start)]
    for p in range(1, start):
        jobs.append(ForkJob(ids, start, KeyBias((p,), (0.1,), Mode.LOG_ADDITIVE)))
        jobs.append(ForkJob(ids, start, KeyBias((p, p + 1), (0.2, 0.5), Mode.MULTIPLICATIVE)))
    jobs[5:5] = [ForkJob(other, 6), ForkJob(other, 4, KeyBias((2,), (0.1,)))]  # interleaved: order must be kept
    assert len(jobs) > 2 * batched.batch_size  # several full batches
    fast, slow = batched.run_jobs(jobs), single.run_jobs(jobs)
    for job, a, b in zip(jobs, fast, slow):
        assert a.target_ce.shape == (job.num_targets,) and a.target_ce.dtype == np.float64
        assert a.computed_tokens == len(job.token_ids) and a.cached_tokens == 0
        assert b.target_ce.shape == a.target_ce.shape
    # Batches of 16 rows and of one are other GEMM shapes: equal up to float32 rounding of the
    # cross-entropies (~9 here), far below what a row given another job's bias would change (> 1e-3).
    assert_close(np.concatenate([a.target_ce for a in fast]), np.concatenate([b.target_ce for b in slow]),
                 torch.float32, what=family)


def test_cross_entropy_and_next_token_logprobs_match_the_model(reference_explainers, tiny_models):
    explainer = reference_explainers["qwen2"]
    ids = _ids(explainer)
    start = len(ids) - 3
    (result,) = explainer.run_jobs([ForkJob(tuple(ids), start)])
    with torch.no_grad():
        logits = _stock_eager(tiny_models["qwen2"])(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    expected = [-logprobs[start - 1 + t, ids[start + t]].item() for t in range(3)]
    assert_close(result.target_ce, expected, torch.float32, what="target CE")
    assert_close(explainer.biased_next_token_logprobs(ids, None), logprobs[-1].numpy(), torch.float32,
                 what="next-token logprobs")
    steered = explainer.biased_next_token_logprobs(ids, KeyBias((3, 5), (0.1, 4.0)))
    assert steered.shape == (1024,)
    # A float64 log-softmax, exponentiated and summed: one rounding per term.
    assert_close(np.exp(steered).sum(), 1.0, np.float64, ops=steered.size, what="sum of probabilities")
    assert np.abs(steered - logprobs[-1].numpy()).max() > 1e-2


def test_embedding_rows_and_kappa(reference_explainers):
    explainer = reference_explainers["llama"]
    rows = explainer.embedding_rows([5, 7, 5])
    weight = explainer.model.get_input_embeddings().weight.detach().double().numpy()
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows, weight[[5, 7, 5]])  # copied rows, float32 -> float64 is exact
    # Correlated suppression needs those rows: "lamp" appears twice, so kappa=1 suppresses both copies.
    with_kappa = explainer.explain(PROMPT, TARGET, granularity="word", kappa=1.0)
    without = explainer.explain(PROMPT, TARGET, granularity="word")
    lamp = [i for i, s in enumerate(without.explanations[0].prompt_scores) if s.text == "lamp"]
    a, b = with_kappa.explanations[0].prompt_scores[lamp[0]], without.explanations[0].prompt_scores[lamp[0]]
    assert abs(a.score - b.score) > tolerance(torch.float32, _ce_scale(without)), (a.score, b.score)


def test_generated_target_is_greedy(reference_explainers):
    from atman_vllm.core import ExplainRequest

    explainer = reference_explainers["gpt_neox"]
    generated = explainer.generate_target_ids(ExplainRequest("The capital of France is", ""), max_tokens=4)
    ids = _ids(explainer, "The capital of France is")
    prompt_length = len(ids)
    for _ in range(4):
        next_id = int(np.argmax(explainer.biased_next_token_logprobs(ids, None)))
        if next_id == explainer.tokenizer.tok.eos_token_id:
            break
        ids.append(next_id)
    assert list(generated) == ids[prompt_length:]
