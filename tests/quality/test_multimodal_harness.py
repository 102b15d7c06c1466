"""The image-tile quality harness: units, positives, every baseline's scores and costs, AtMan's tile matching."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from atman_vllm.models.vlm import build_tiny_vlm
from atman_vllm.quality.multimodal import (
    BASELINE_METHODS, VLMModel, atman_tile_scores, markdown_table, run_baseline, score_tiles,
)
from atman_vllm.quality.scenes import generate_scenes


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return VLMModel(build_tiny_vlm(tmp_path_factory.mktemp("mm") / "vlm", seed=0), threads=2, ig_steps=4)


@pytest.fixture(scope="module")
def prepared(vlm):
    return vlm.prepare(generate_scenes(3, seed=9))


def test_prepared_scenes_locate_the_image_tokens_and_the_object(vlm, prepared):
    for ex in prepared:
        assert len(ex.image_positions) == 16 and np.all(np.diff(ex.image_positions) == 1)
        assert ex.input_ids[ex.target_start] == vlm.tokenizer.convert_tokens_to_ids(ex.scene.answer)
        assert ex.positives.shape == (16,) and 1 <= ex.positives.sum() < 16
        assert (ex.positives == ex.scene.tile_mask(4).reshape(-1)).all()


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_every_baseline_scores_every_tile_and_counts_its_passes(vlm, prepared, method):
    scores, cost = run_baseline(method, vlm, prepared)
    assert len(scores) == len(prepared) and all(s.shape == (16,) and np.isfinite(s).all() for s in scores)
    assert all(np.ptp(s) > 0 for s in scores)  # the tiles are told apart
    expected_forward = {"grad-x-input": 1, "integrated-gradients": 4, "attention-rollout": 1, "ablation": 17,
                        "random": 0}[method]
    assert cost.forward_passes == expected_forward * len(prepared)
    assert cost.backward_passes == (expected_forward * len(prepared) if method in
                                    ("grad-x-input", "integrated-gradients") else 0)


def test_ablation_is_the_drop_when_a_tile_is_painted_over(vlm, prepared):
    import torch

    ex = prepared[0]
    scores, _ = run_baseline("ablation", vlm, [ex])
    f = vlm.target_logprob_fn(ex)
    pixels, background = vlm.pixels(ex.scene), vlm.pixels(ex.scene, background_only=True)
    k = int(np.argmax(ex.positives))
    painted = pixels.clone()
    r, c = divmod(k, 4)
    painted[..., 16 * r:16 * r + 16, 16 * c:16 * c + 16] = background[..., 16 * r:16 * r + 16, 16 * c:16 * c + 16]
    with torch.no_grad():
        want = float(f(pixels) - f(painted))
    assert scores[0][k] == pytest.approx(want, abs=1e-5)


def test_perfect_and_reversed_rankings_bound_the_metrics(prepared):
    perfect = score_tiles(prepared, [ex.positives.astype(float) for ex in prepared])
    worst = score_tiles(prepared, [-ex.positives.astype(float) for ex in prepared])
    assert perfect.mAP == pytest.approx(1.0) and perfect.mAR == pytest.approx(1.0)
    assert worst.mAP < 0.5 and worst.mAR == pytest.approx(0.0)


def _span(score, left, top, size=0.25, image=0):
    rect = SimpleNamespace(left=left, top=top, width=size, height=size, to_dict=lambda: {})
    return SimpleNamespace(image=image, rect=rect, score=score)


def test_atman_tile_scores_follow_the_rectangles():
    spans = [_span(float(r * 4 + c), c / 4, r / 4) for r in range(4) for c in range(4)]
    spans.append(SimpleNamespace(image=None, rect=None, score=99.0))  # a text unit: ignored
    result = SimpleNamespace(explanations=[SimpleNamespace(prompt_scores=spans[::-1])])
    np.testing.assert_array_equal(atman_tile_scores(result, 4), np.arange(16.0))
    with pytest.raises(ValueError, match="of the image's 16 cells"):
        atman_tile_scores(SimpleNamespace(explanations=[SimpleNamespace(prompt_scores=spans[:5])]), 4)
    with pytest.raises(ValueError, match="larger than one cell"):
        atman_tile_scores(SimpleNamespace(explanations=[SimpleNamespace(prompt_scores=[_span(1.0, 0, 0, 0.5)])]), 4)


def test_markdown_table_has_a_row_per_method(vlm, prepared):
    from atman_vllm.quality.multimodal import ImageReport, ImageRow

    scores, cost = run_baseline("random", vlm, prepared)
    report = ImageReport("m", len(prepared), 0, 0.0, [ImageRow("random", "transformers", score_tiles(prepared, scores),
                                                                 cost.per_example())])
    table = markdown_table(report)
    assert table.count("\n") == 2 and "| random | transformers |" in table
