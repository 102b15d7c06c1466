"""Steering with image controls (issue #15 item 3) on the real engine and the tiny Idefics3: a rectangle
of an image suppressed or amplified for a whole generation, equal to the transformers reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atman_vllm.core import ImageControl, InvalidRequestError, plan_prompt_controls
from atman_vllm.core.images import Rect
from tolerances import assert_close

from .test_engine_images import scene

PROMPT = "Question: What colour is the triangle? <image> Answer:"
WHOLE = Rect(0.0, 0.0, 1.0, 1.0)


def test_image_control_reaches_the_cells_its_rect_overlaps(vlm_engine):
    img = vlm_engine.prompt_images([scene(40)])
    # The top-left quarter of a 4x4 grid: cells (0,0) (0,1) (1,0) (1,1); complete: the full factor each.
    encoded, (im,), bias = plan_prompt_controls(PROMPT, vlm_engine.tokenizer, [ImageControl(0, Rect(0, 0, .5, .5), .1)],
                                                overlap="complete", images=img, vision=vlm_engine.vision)
    assert bias.positions == tuple(im.cell_positions[k] for k in (0, 1, 4, 5)) and bias.factors == pytest.approx((0.1,) * 4)
    # Partial: a rect over half of cell (0,0) gives 1 + (f - 1) / 2.
    _, _, bias = plan_prompt_controls(PROMPT, vlm_engine.tokenizer, [{"image": 0, "rect": {
        "left": 0, "top": 0, "width": 0.125, "height": 0.25}, "factor": 3.0}], images=img, vision=vlm_engine.vision)
    assert bias.positions == (im.cell_positions[0],) and bias.factors == pytest.approx((2.0,))


@pytest.mark.parametrize("mode,factor", [("log-additive", 0.01), ("multiplicative", 0.05), ("log-additive", 4.0)])
def test_image_control_equals_reference_biased_forward(vlm_engine, vlm_reference, mode, factor):
    img = scene(41)
    controls = [ImageControl(0, WHOLE, factor)] if factor != 4.0 else [ImageControl(0, Rect(.3, .2, .5, .6), factor)]
    plain = vlm_engine.next_token_logprobs(PROMPT, images=[img])
    top = vlm_engine.next_token_logprobs(PROMPT, images=[img], controls=controls, control_mode=mode)
    encoded, located, bias = plan_prompt_controls(PROMPT, vlm_engine.tokenizer, controls, mode,
                                                  images=vlm_engine.prompt_images([img]), vision=vlm_engine.vision)
    ref_images = plan_prompt_controls(PROMPT, vlm_reference.tokenizer, [], images=vlm_reference.prompt_images([img]),
                                      vision=vlm_reference.vision)[1]
    biased = vlm_reference.biased_next_token_logprobs(encoded.token_ids, bias, ref_images)
    ids = list(top)
    assert_close([top[i] for i in ids], biased[ids], torch.float32, bound=1e-4, what="steered next-token logprobs")
    # ... and the control really moved vLLM's distribution.
    common = sorted(set(plain) & set(top))
    assert max(abs(plain[i] - top[i]) for i in common) > 1e-3


def test_steered_generation_with_an_image_runs(vlm_engine):
    img = scene(42)
    out = vlm_engine.generate(PROMPT, images=[img], max_tokens=4, controls=[ImageControl(0, WHOLE, 0.05)])[0]
    assert len(out.token_ids) >= 1


@pytest.mark.parametrize("control,words", [
    ({"image": 1, "rect": {"left": 0, "top": 0, "width": 1, "height": 1}, "factor": 0.1}, "controls[0].image"),
    ({"image": 0, "rect": {"left": 0.5, "top": 0, "width": 0.8, "height": 1}, "factor": 0.1}, "controls[0].rect"),
    ({"image": 0, "rect": {"left": 0.2, "top": 0, "width": 0, "height": 1}, "factor": 0.1}, "controls[0].rect"),
    ({"image": 0, "rect": {"left": 0, "top": 0, "width": 1}, "factor": 0.1}, "controls[0].rect"),
    ({"image": 0, "rect": {"left": 0, "top": 0, "width": 1, "height": 1}, "factor": -1}, "controls[0].factor"),
])
def test_bad_image_controls_name_the_field(vlm_engine, control, words):
    with pytest.raises(InvalidRequestError) as exc:
        vlm_engine.next_token_logprobs(PROMPT, images=[scene(43)], controls=[control])
    assert exc.value.field == "controls" and words in exc.value.message


def test_image_control_without_images_is_rejected(vlm_engine):
    with pytest.raises(InvalidRequestError) as exc:
        vlm_engine.next_token_logprobs("Question: hi? Answer:", controls=[ImageControl(0, WHOLE, 0.1)])
    assert exc.value.field == "controls" and "0 image(s)" in exc.value.message
