"""Image + text prompts on vLLM: the image tokens as vLLM expands them, fidelity to the transformers
reference on image units (both modes, κ on and off), and forks sharing the image's prefix blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atman_vllm.core import ExplainOptions, ExplainRequest, InvalidRequestError
from tolerances import assert_close

from .test_engine_fidelity import FIDELITY, _ce_scale, _scores

QUESTION = "Question: What colour is the square? Answer:"
BLOCK = 32  # ENGINE_ARGS' block size


def scene(seed: int):
    """A random 64x48 RGB image: each test its own, so no earlier test's blocks are in the prefix cache."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


# Image first, then enough text that text units lie past the first block (which holds the image, BOS
# to position 29); the words after it appear nowhere before, so with kappa too their forks keep block 0.
PROMPT = "<image>" + QUESTION + " green blue yellow purple white black orange triangle circle cross red"
TARGET = " red"


def test_image_tokens_are_the_ones_vllm_expands(vlm_engine):
    from vllm import SamplingParams

    img = scene(1)
    request = vlm_engine.explain_request(PROMPT, TARGET, images=[img])
    plan = vlm_engine.plan(request)
    (im,) = plan.encoded.images
    assert len(im.cell_positions) == 16 and im.token_end - im.token_start == 19
    out = vlm_engine.llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": img}}],
                                  SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == list(plan.encoded.token_ids[:plan.encoded.target_start])


OPTION_SETS = [dict(granularity="token"), dict(granularity="token", mode="multiplicative"),
               dict(granularity="token", kappa=0.5), dict(granularity="token", kappa=0.5, mode="multiplicative")]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_vllm_matches_reference_on_image_units(vlm_engine, vlm_reference, options):
    img = scene(10 + OPTION_SETS.index(options))  # its own image: its unperturbed pass is computed, not cached
    fast = vlm_engine.explain(PROMPT, TARGET, images=[img], **options)
    ref = vlm_reference.explain(PROMPT, TARGET, images=[img], **options)
    scores = fast.explanations[0].prompt_scores
    tiles = [s for s in scores if s.image is not None]
    assert len(tiles) == 16 and [s.rect for s in tiles] == [s.rect for s in ref.explanations[0].prompt_scores
                                                            if s.image is not None]
    assert_close(_scores(fast), _scores(ref), torch.float32, scale=_ce_scale(ref), bound=FIDELITY, what="scores")
    assert np.abs([s.score for s in tiles]).max() > 1e-3, "degenerate case: no image tile moved the target"
    # Forks after the first block reuse it, image and all: exactly whole blocks before the first
    # perturbed position (and before the target) come from the prefix cache. With kappa the two ":"
    # have one perturbation (each suppresses the other fully): the later fork may also find the
    # earlier one's blocks, up to the target's, depending on whether they ran in one step.
    plan = vlm_engine.plan(vlm_engine.explain_request(PROMPT, TARGET, ExplainOptions(**options), images=[img]))
    lowest = highest = 0
    biases = [(j.bias.positions, j.bias.factors) for j in plan.jobs[1:]]
    for job, bias in zip(plan.jobs[1:], biases):
        shared = min(job.bias.first_position, job.target_start) // BLOCK * BLOCK
        lowest += shared
        highest += shared if biases.count(bias) == 1 else job.target_start // BLOCK * BLOCK
    assert lowest > 0 and lowest <= fast.stats.cached_tokens <= highest
    if options.get("kappa") is None:
        assert fast.stats.cached_tokens == lowest
    assert fast.stats.computed_tokens + fast.stats.cached_tokens == len(plan.jobs) * plan.num_tokens


def test_two_images_and_text_in_any_order(vlm_engine, vlm_reference):
    prompt = QUESTION + " <image> and <image>" + " " + QUESTION
    images = [scene(3), scene(4)]
    fast = vlm_engine.explain(prompt, TARGET, images=images, granularity="word", image_granularity="word")
    ref = vlm_reference.explain(prompt, TARGET, images=images, granularity="word", image_granularity="word")
    tiles = [s for s in fast.explanations[0].prompt_scores if s.image is not None]
    assert [s.image for s in tiles] == [0] * 4 + [1] * 4
    assert_close(_scores(fast), _scores(ref), torch.float32, scale=_ce_scale(ref), bound=FIDELITY, what="scores")
    d = fast.to_dict()
    assert d["images"] == [{"width": 64, "height": 48, "digest": vlm_engine.prompt_images([im])[0].digest}
                           for im in images]


def test_the_image_keys_its_blocks(vlm_engine):
    """Two images with the same tokens never share blocks: vLLM keys image blocks by the image hash,
    and our block keys are appended to vLLM's (they compose)."""
    a, b = scene(5), scene(6)
    plan_a = vlm_engine.plan(vlm_engine.explain_request(PROMPT, TARGET, images=[a]))
    plan_b = vlm_engine.plan(vlm_engine.explain_request(PROMPT, TARGET, images=[b]))
    assert plan_a.encoded.token_ids == plan_b.encoded.token_ids
    (ra,) = vlm_engine.run_jobs([plan_a.jobs[0]])
    (rb,) = vlm_engine.run_jobs([plan_b.jobs[0]])
    (ra2,) = vlm_engine.run_jobs([plan_a.jobs[0]])
    assert rb.cached_tokens == 0 and ra2.cached_tokens > 0
    assert not np.allclose(ra.target_ce, rb.target_ce)
    assert_close(ra2.target_ce, ra.target_ce, torch.float32, bound=FIDELITY, what="cached rerun")


def test_bad_image_requests_name_the_field(vlm_engine, engines):
    img = scene(7)
    cases = [
        (vlm_engine, dict(prompt="no placeholder", images=[img])),
        (vlm_engine, dict(prompt="<image>" * 5 + QUESTION, images=[img] * 5)),  # the engine takes 4
        (vlm_engine, dict(prompt="<image>" + QUESTION, images=[b"not an image"])),
        (vlm_engine, dict(prompt="<image>" + QUESTION, images=[np.zeros((4, 4), dtype=np.float32)])),
        (engines["llama"], dict(prompt="a b", images=[img])),  # a text-only model
    ]
    for llm, kw in cases:
        with pytest.raises(InvalidRequestError) as e:
            llm.explain(target=TARGET, **kw)
        assert e.value.field == "images", (kw, e.value)


def test_generate_then_explain_an_image_prompt(vlm_engine):
    """No target: the greedy completion after the image prompt (the engine's own ids) is explained."""
    img = scene(8)
    result = vlm_engine.explain("<image>" + QUESTION, None, images=[img], max_tokens=2, granularity="token")
    assert result.target and len(result.target_tokens) >= 1
    assert sum(s.image is not None for s in result.explanations[0].prompt_scores) == 16


@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
def test_vllm_matches_reference_on_scenes_the_model_reads(vlm_engine, vlm_reference, mode):
    """Real scenes of the shapes task with correlated suppression (the quality table's κ 0.6): the
    scores the paths agree on are the ones that find the asked object."""
    from atman_vllm.quality.scenes import generate_scenes

    options = dict(granularity="token", image_granularity="token", kappa=0.6, mode=mode)
    on_object = 0
    scenes = generate_scenes(5, seed=50)
    for sc in scenes:
        fast = vlm_engine.explain(sc.prompt(), " " + sc.answer, images=[sc.image()], **options)
        ref = vlm_reference.explain(sc.prompt(), " " + sc.answer, images=[sc.image()], **options)
        assert_close(_scores(fast), _scores(ref), torch.float32, scale=_ce_scale(ref), bound=FIDELITY, what="scores")
        tiles = [s for s in fast.explanations[0].prompt_scores if s.image is not None]
        best = max(tiles, key=lambda s: s.score).rect
        on_object += bool(sc.tile_mask(4)[round(best.top * 4), round(best.left * 4)])
    if mode == "multiplicative":  # mAP 0.862 on 100 scenes (benchmarks/results/multimodal.md)
        assert on_object >= 4, f"the strongest tile held the asked object in {on_object} of {len(scenes)} scenes"


@pytest.mark.parametrize("options", [dict(), dict(kappa=0.6, mode="multiplicative")],
                         ids=["log-additive", "kappa-multiplicative"])
def test_a_chat_with_an_image_matches_the_reference(vlm_engine, vlm_reference, options):
    """Messages with an image (the placeholder in a content, the image beside): rendered with the
    model's chat template (no added BOS), tiles and words placed in their message, vLLM = reference."""
    from atman_vllm.quality.scenes import generate_scenes

    sc = generate_scenes(1, seed=70)[0]
    messages = [{"role": "system", "content": "Answer with one colour."},
                {"role": "user", "content": sc.question + "<image>"}]
    request = vlm_engine.explain_request(messages=messages, target=" " + sc.answer, images=[sc.image()],
                                         options=ExplainOptions(granularity="word", image_granularity="token",
                                                                **options))
    # The rendering as it is, no BOS added: its first token is the text's own.
    assert request.prompt.startswith("System:")
    assert vlm_engine.prompt_ids(request)[0] == vlm_engine.tokenizer.encode(request.prompt)[0][0]
    fast = vlm_engine.explain_planned(request)
    ref = vlm_reference.explain_planned(request)
    assert_close(_scores(fast), _scores(ref), torch.float32, scale=_ce_scale(ref), bound=FIDELITY, what="scores")
    scores = fast.explanations[0].prompt_scores
    assert [(s.message, s.text) for s in scores if s.image is None] == \
        [(0, w) for w in messages[0]["content"].split()] + [(1, w) for w in sc.question.split()]
    tiles = [s for s in scores if s.image is not None]
    assert len(tiles) == 16 and {(s.message, s.start) for s in tiles} == {(1, len(sc.question))}
