"""Prompts with images in the pure core: encoding, image tiles, rectangles, κ across modalities, the contract."""

from __future__ import annotations

import re

import jsonschema
import numpy as np
import pytest

from atman_vllm.core import EXPLAIN_RESULT_SCHEMA, ExplainOptions, ExplainRequest, ForkResult, InvalidRequestError
from atman_vllm.core.images import FULL, ImageLayout, PromptImage, Rect, cell_rect, image_tiles, join_parts
from atman_vllm.core.options import Granularity
from atman_vllm.core.planning import PlanLimits, Limit, plan_explanation
from atman_vllm.core.results import ExplainResult

from fake_tokenizer import FakeTokenizer

SPECIALS = ("<fake>", "<global>", "<image>")


class SpecialTokenizer(FakeTokenizer):
    """FakeTokenizer that keeps added special tokens whole, as Hugging Face tokenizers do."""

    def encode(self, text):
        ids, offsets, pos = [], [], 0
        for m in re.finditer("|".join(map(re.escape, SPECIALS)), text):
            sub_ids, sub_off = super().encode(text[pos:m.start()])
            ids += sub_ids
            offsets += [(s + pos, e + pos) for s, e in sub_off]
            ids.append(self._id(m.group()))
            offsets.append(m.span())
            pos = m.end()
        sub_ids, sub_off = super().encode(text[pos:])
        return ids + sub_ids, offsets + [(s + pos, e + pos) for s, e in sub_off]


class FakeVision:
    """A 4x4 grid between markers, like Idefics3 without splitting; cell embeddings chosen per test."""

    placeholder = "<image>"

    def __init__(self, tokenizer, rows=4, cols=4, content=FULL, cells=None):
        self.rows, self.cols, self.content, self.cells = rows, cols, content, cells
        self.cell_id = tokenizer._id("<image>")

    def image_layout(self, image):
        return ImageLayout("<fake><global>" + "<image>" * (self.rows * self.cols) + "<fake>", self.cell_id,
                           self.rows, self.cols, self.content)

    def cell_embeddings(self, image):
        return None if self.cells is None else self.cells[image.digest]


def image(name="a", w=64, h=32):
    return PromptImage(name, w, h, data=object())


def test_encoding_places_the_image_tokens_and_maps_text_offsets_back_to_the_prompt():
    tok = SpecialTokenizer()
    vision = FakeVision(tok)
    prompt = "Look:<image> What colour is the triangle?"
    plan = plan_explanation(ExplainRequest(prompt, " red", ExplainOptions(granularity="word"), images=(image(),)),
                            tok, vision=vision)
    enc = plan.encoded
    (im,) = enc.images
    # BOS, "Look", ":", then fake, global, 16 cells, fake
    assert (im.token_start, im.token_end) == (3, 3 + 19)
    assert im.cell_positions == tuple(range(5, 21))
    assert all(enc.token_ids[p] == vision.cell_id for p in im.cell_positions)
    assert enc.prompt_offsets[2:2 + 19] == ((5, 12),) * 19  # the image's tokens: its placeholder's span
    assert enc.prompt_offsets[-1] == (len(prompt) - 1, len(prompt))  # "?" in prompt coordinates
    words = [u.text for u in plan.units if u.image is None]
    assert words == ["Look:", "What", "colour", "is", "the", "triangle?"]
    for u in plan.units:
        if u.image is None:
            assert prompt[u.start:u.start + u.length] == u.text
    tiles = [u for u in plan.units if u.image is not None]
    assert len(tiles) == 4  # word = 2x2 cells of a 4x4 grid
    assert [u.positions[0] for u in plan.units] == sorted(u.positions[0] for u in plan.units)  # sequence order
    assert tiles[0].text == "<image>" and (tiles[0].start, tiles[0].length) == (5, 7)
    assert tiles[0].positions == (5, 6, 9, 10) and tiles[0].rect == Rect(0.0, 0.0, 0.5, 0.5)
    assert tiles[3].rect == Rect(0.5, 0.5, 0.5, 0.5)
    assert all(job.images == enc.images for job in plan.jobs)
    markers = {3, 4, 21}  # <fake>, <global>, <fake>: never suppressed
    assert not any(markers & set(job.bias.positions) for job in plan.jobs[1:])


def test_tile_granularities_follow_the_text_granularity_or_image_granularity():
    tok = SpecialTokenizer()
    vision = FakeVision(tok)

    def tiles(**opts):
        plan = plan_explanation(ExplainRequest("<image> Q?", " A", ExplainOptions(**opts), images=(image(),)),
                                tok, vision=vision)
        return [u for u in plan.units if u.image is not None]

    assert len(tiles(granularity="token")) == 16
    assert len(tiles(granularity="word")) == 4
    assert len(tiles(granularity="sentence")) == 1  # 4x4 cells: the whole 4x4 grid
    assert len(tiles(granularity="paragraph")) == 1
    assert len(tiles(granularity="custom", delimiter=",")) == 1
    assert len(tiles(granularity="paragraph", image_granularity="token")) == 16
    auto = plan_explanation(ExplainRequest("<image> Q?", " A", images=(image(),)), tok, vision=vision)
    assert auto.options.granularity == Granularity.TOKEN and len(auto.units) == 16 + 2  # 18 <= 30
    with pytest.raises(InvalidRequestError) as e:
        ExplainOptions(image_granularity="custom").validated()
    assert e.value.field == "image_granularity"


def test_tiles_cover_a_grid_that_does_not_divide():
    assert image_tiles(3, 5, Granularity.WORD) == [(0, 0, 2, 2), (0, 2, 2, 4), (0, 4, 2, 5),
                                                    (2, 0, 3, 2), (2, 2, 3, 4), (2, 4, 3, 5)]
    cells = sum((r1 - r0) * (c1 - c0) for r0, c0, r1, c1 in image_tiles(3, 5, Granularity.WORD))
    assert cells == 15


def test_rectangles_through_stretch_pad_and_crop():
    # Stretch (Idefics3 without splitting): normalised coordinates are the original image's.
    assert cell_rect(1, 2, 2, 3, 4, 4) == Rect(0.5, 0.25, 0.25, 0.25)
    # Pad: the original occupies the top half of the processed square (a 2:1 landscape image padded below).
    top_half = Rect(0.0, 0.0, 1.0, 0.5)
    assert cell_rect(0, 0, 1, 1, 4, 4, top_half) == Rect(0.0, 0.0, 0.25, 0.5)
    assert cell_rect(1, 0, 2, 1, 4, 4, top_half) == Rect(0.0, 0.5, 0.25, 0.5)
    assert cell_rect(2, 0, 3, 1, 4, 4, top_half) is None  # padding only
    # Crop: the processed square shows the middle half of the original's width.
    crop = Rect(-0.5, 0.0, 2.0, 1.0)
    assert cell_rect(0, 0, 4, 2, 4, 4, crop) == Rect(0.25, 0.0, 0.25, 1.0)


def test_padding_tiles_are_no_units():
    tok = SpecialTokenizer()
    vision = FakeVision(tok, content=Rect(0.0, 0.0, 1.0, 0.5))
    plan = plan_explanation(ExplainRequest("<image> Q?", " A", ExplainOptions(granularity="token"), images=(image(),)),
                            tok, vision=vision)
    tiles = [u for u in plan.units if u.image is not None]
    assert len(tiles) == 8 and max(t.rect.bottom for t in tiles) == 1.0


def test_several_images_mixed_with_text_and_results_in_the_contract():
    tok = SpecialTokenizer()
    vision = FakeVision(tok, rows=2, cols=2)
    prompt = "First <image> then <image>. Which is red?"
    req = ExplainRequest(prompt, " left", ExplainOptions(granularity="token"), images=(image("a"), image("b", 10, 20)))
    plan = plan_explanation(req, tok, vision=vision)
    assert [im.index for im in plan.encoded.images] == [0, 1]
    tiles = [u for u in plan.units if u.image is not None]
    assert [u.image for u in tiles] == [0] * 4 + [1] * 4
    assert tiles[0].start == prompt.index("<image>") and tiles[4].start == prompt.rindex("<image>")
    texts = [u.text for u in plan.units if u.image is None]
    assert texts == ["First", " ", " then", " ", ".", " Which", " is", " red", "?"]  # each token's own characters
    rng = np.random.default_rng(0)
    results = [ForkResult(rng.normal(size=plan.encoded.num_targets), 10) for _ in plan.jobs]
    result = plan.finish(results, 0.1)
    d = result.to_dict()
    jsonschema.validate(d, EXPLAIN_RESULT_SCHEMA)
    scores = d["explanations"][0]["prompt_scores"]
    image_scores = [s for s in scores if "image" in s]
    assert len(image_scores) == 8 and image_scores[5]["rect"] == {"left": 0.5, "top": 0.0, "width": 0.5, "height": 0.5}
    assert d["images"] == [{"width": 64, "height": 32, "digest": "a"}, {"width": 10, "height": 20, "digest": "b"}]
    assert ExplainResult.from_dict(d).to_dict() == d
    bad = dict(image_scores[0])
    del bad["rect"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**d, "explanations": [{**d["explanations"][0], "prompt_scores": [bad]}]},
                            EXPLAIN_RESULT_SCHEMA)


def test_a_chat_with_images_has_tiles_and_text_units_per_message():
    """Images inside chat messages: each message's content is cut at its images, text units index their
    message's content, tiles name the message and the placeholder's offset in it; template tokens and
    image markers are never units."""
    from atman_vllm.core.chat import ChatMessage, ChatPrompt

    tok = SpecialTokenizer()
    vision = FakeVision(tok, rows=2, cols=2)
    contents = ["Look at <image> and say.", "Then <image>: which is red?"]
    rendered = "S: be brief\nU: " + contents[0] + "\nU: " + contents[1] + "\nA:"
    starts = (rendered.index(contents[0]), rendered.index(contents[1]))
    chat = ChatPrompt((ChatMessage("user", contents[0]), ChatMessage("user", contents[1])), starts)
    req = ExplainRequest(rendered, " left", ExplainOptions(granularity="word"), chat=chat,
                         images=(image("a"), image("b")))
    plan = plan_explanation(req, tok, vision=vision)
    words = [(u.message, u.text) for u in plan.units if u.image is None]
    assert words == [(0, "Look"), (0, "at"), (0, "and"), (0, "say."), (1, "Then"), (1, ":"), (1, "which"),
                     (1, "is"), (1, "red?")]
    for u in plan.units:
        content = contents[u.message]
        assert content[u.start:u.start + u.length] == u.text
    tiles = [u for u in plan.units if u.image is not None]
    assert [(u.message, u.image, u.start) for u in tiles] == \
        [(0, 0, contents[0].index("<image>")), (1, 1, contents[1].index("<image>"))]  # word: 2x2 cells
    cells = {p for im in plan.encoded.images for p in im.cell_positions}
    assert {p for u in tiles for p in u.positions} == cells
    markers = {p for im in plan.encoded.images for p in range(im.token_start, im.token_end)} - cells
    assert not markers & {p for u in plan.units for p in u.positions}
    d = plan.finish([ForkResult(np.zeros(plan.encoded.num_targets), 10) for _ in plan.jobs], 0.1).to_dict()
    jsonschema.validate(d, EXPLAIN_RESULT_SCHEMA)
    assert {(s["message"], s.get("image")) for s in d["explanations"][0]["prompt_scores"]} == \
        {(0, None), (1, None), (0, 0), (1, 1)}


def test_bad_image_requests_name_the_field():
    tok = SpecialTokenizer()
    vision = FakeVision(tok)
    cases = [
        (ExplainRequest("no placeholder", " A", images=(image(),)), dict(vision=vision), "images"),
        (ExplainRequest("<image><image>", " A", images=(image(),)), dict(vision=vision), "images"),
        (ExplainRequest("<image> Q", " A", images=(image(),)), {}, "images"),  # a text-only backend
        (ExplainRequest("<image> Q", " A", images=(image(),)),
         dict(vision=vision, limits=PlanLimits(images=Limit(0, "the server's --max-images"))), "images"),
        (ExplainRequest("<image> Q", " A", ExplainOptions(spans=((8, 1),)), images=(image(),)), dict(vision=vision), "spans"),
        (ExplainRequest("<image> Q", " A", ExplainOptions(search="hierarchical"), images=(image(),)),
         dict(vision=vision), "search"),
        (ExplainRequest("<image> Q", " A", ExplainOptions(kappa=0.5), images=(image(),)),
         dict(vision=vision, embedding_rows=lambda ids: np.ones((len(ids), 3))), "kappa"),  # no cell embeddings
    ]
    for req, kw, field in cases:
        with pytest.raises(InvalidRequestError) as e:
            plan_explanation(req, tok, **kw)
        assert e.value.field == field, (req, e.value)


def test_kappa_spreads_across_image_cells_and_modalities_by_their_embeddings():
    tok = SpecialTokenizer()
    d = 4
    cells = np.zeros((4, d))
    cells[0] = [1, 0, 0, 0]
    cells[1] = [1, 0.1, 0, 0]  # nearly the same as cell 0
    cells[2] = [0, 0, 1, 0]  # orthogonal
    cells[3] = [0, 0, 0, 1]  # like the word "red" below
    vision = FakeVision(tok, rows=2, cols=2, cells={"a": cells})
    red = tok._id(" red")
    table = {}

    def rows(ids):
        out = []
        for i in ids:
            if i == red:
                out.append([0, 0, 0.2, 1.0])
            else:
                out.append(table.setdefault(i, np.eye(d)[i % d] * 0 + np.array([0, 1, 0, 0.0]) * (1 + i)))
        return np.array(out)

    req = ExplainRequest("<image> is it red?", " yes", ExplainOptions(granularity="token", kappa=0.9), images=(image(),))
    plan = plan_explanation(req, tok, rows, vision=vision)
    im = plan.encoded.images[0]
    first_cell_job = next(j for u, j in zip(plan.units, plan.jobs[1:]) if u.image is not None)
    factors = dict(zip(first_cell_job.bias.positions, first_cell_job.bias.factors))
    s01 = 1 / np.sqrt(1.01)
    assert factors[im.cell_positions[0]] == pytest.approx(0.1)
    assert factors[im.cell_positions[1]] == pytest.approx(0.9 * (1 - s01) + 0.1)
    assert im.cell_positions[2] not in factors and im.cell_positions[3] not in factors
    # The last cell and the word " red" are similar across modalities (cosine 0.98 >= 0.9).
    last_cell_job = [j for u, j in zip(plan.units, plan.jobs[1:]) if u.image is not None][3]
    red_position = plan.encoded.token_ids.index(red)
    factors = dict(zip(last_cell_job.bias.positions, last_cell_job.bias.factors))
    s = 1 / np.sqrt(1.04)
    assert factors[red_position] == pytest.approx(0.9 * (1 - s) + 0.1)
    assert not ({im.token_start, im.token_start + 1, im.token_end - 1} & set(factors))  # markers never


def test_join_parts_is_the_one_way_to_the_representation():
    a, b = image("a"), image("b")
    assert join_parts(["Look ", a, " and ", b, "."], "<image>") == ("Look <image> and <image>.", (a, b))
    with pytest.raises(InvalidRequestError) as e:
        join_parts(["a <image> b"], "<image>")
    assert e.value.field == "prompt"


def test_text_only_results_are_unchanged():
    tok = SpecialTokenizer()
    plan = plan_explanation(ExplainRequest("Ben likes burgers", " and", ExplainOptions(granularity="word")), tok)
    result = plan.finish([ForkResult(np.array([1.0]), 3)] * len(plan.jobs), 0.0).to_dict()
    assert "images" not in result and "image_granularity" not in result["options"]
    assert all("image" not in s and "rect" not in s for s in result["explanations"][0]["prompt_scores"])
