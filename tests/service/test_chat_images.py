"""Images in chat messages over HTTP, with real requests on loopback and the unmodified openai client:
``image_url`` parts (data URLs) on vLLM's chat completions route for generation, steering
(``{image, rect, factor}`` controls) and the ``explain`` field, and on ``POST /v1/explain``;
every other way to send media is refused at the edge, naming the part.

vLLM 0.32.0's chat route on CPU answers about one identical image request in ten from other image
features (stock ``vllm serve`` does it too, without this project's plugin: docs/design.md), so an
answer of that route is taken as the most common of ``REPEATS`` identical requests; the explain
forks run on this project's own path, which does not show it.
"""

from __future__ import annotations

import base64
import collections
import io

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from atman_vllm.core import EXPLAIN_RESULT_SCHEMA
from atman_vllm.quality.scenes import generate_scenes

REPEATS = 5
WHOLE = {"left": 0, "top": 0, "width": 1, "height": 1}


@pytest.fixture(scope="module")
def scene():
    return generate_scenes(3, 7)[0]  # "What colour is the cross?" -> white; the cross lies in tiles 2 and 6


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def chat(scene) -> list[dict]:
    # As the model was trained: the question, then the image (atman_vllm/quality/scenes.py CHAT_PROMPT).
    return [{"role": "user", "content": [text_part(scene.question), image_part(data_url(scene.image()))]}]


@pytest.fixture(scope="module")
def oai(vlm_server):
    return openai.OpenAI(base_url=f"http://{vlm_server.http}/v1", api_key="unused", max_retries=0, timeout=300)


def answer(oai, messages, **extra) -> str:
    """The most common first word of REPEATS identical greedy completions."""
    words = [oai.chat.completions.create(model=oai.models.list().data[0].id, messages=messages, max_tokens=1,
                                         temperature=0.0, extra_body=extra or None).choices[0].message.content
             for _ in range(REPEATS)]
    return collections.Counter(words).most_common(1)[0][0]


def test_chat_completions_take_image_parts_and_steer_an_image_rect(oai, scene):
    messages = chat(scene)
    assert answer(oai, messages) == " " + scene.answer
    mult = {"control_mode": "multiplicative"}
    assert answer(oai, messages, controls=[{"image": 0, "rect": WHOLE, "factor": 1.0}], **mult) == " " + scene.answer
    steered = answer(oai, messages, controls=[{"image": 0, "rect": WHOLE, "factor": 0.01}], **mult)
    assert steered != " " + scene.answer, "suppressing the whole image did not change the answer"
    # A span control on a string message beside an image part: placed on this server's rendering,
    # which must be exactly the token ids vLLM runs.
    with_system = [{"role": "system", "content": "Answer with one colour."}, *messages]
    assert answer(oai, with_system, controls=[{"message": 0, "start": 0, "length": 6, "factor": 1.0}]) == \
        answer(oai, with_system)


def tiles_of(result: dict) -> list[dict]:
    return [s for s in result["explanations"][0]["prompt_scores"] if "image" in s]


def test_chat_completion_explains_image_tiles_as_v1_explain_does(oai, vlm_server, scene):
    messages = chat(scene)
    options = {"granularity": "word", "image_granularity": "token", "mode": "multiplicative", "factor": 0.01}
    reply = oai.chat.completions.create(model=oai.models.list().data[0].id, messages=messages, max_tokens=3,
                                        extra_body={"explain": options})
    explanation = reply.model_extra["explanation"]
    jsonschema.validate(explanation, EXPLAIN_RESULT_SCHEMA)
    completion = reply.choices[0].message.content
    assert explanation["target"] == completion.strip()  # the generated ids, decoded
    question = scene.question
    tiles = tiles_of(explanation)
    assert len(tiles) == 16 and {(t["message"], t["image"], t["start"]) for t in tiles} == {(0, 0, len(question))}
    assert tiles[6]["rect"] == {"left": 0.5, "top": 0.25, "width": 0.25, "height": 0.25}
    words = [s for s in explanation["explanations"][0]["prompt_scores"] if "image" not in s]
    assert [s["text"] for s in words] == question.split()
    assert all(question[s["start"]:s["start"] + s["length"]] == s["text"] and s["message"] == 0 for s in words)

    # The same chat on /v1/explain: parts, or the placeholder in a string content with images beside.
    body = {"messages": messages, "target": completion, "options": options}
    for variant in (body, {**body, "images": [messages[0]["content"][1]["image_url"]["url"]],
                           "messages": [{"role": "user", "content": question + "<image>"}]}):
        same = httpx.post(f"http://{vlm_server.http}/v1/explain", json=variant, timeout=300)
        assert same.status_code == 200, same.text
        got, want = same.json()["explanations"][0]["prompt_scores"], explanation["explanations"][0]["prompt_scores"]
        assert [(s["start"], s.get("image"), s.get("rect")) for s in got] == \
            [(s["start"], s.get("image"), s.get("rect")) for s in want]
        np.testing.assert_allclose([s["score"] for s in got], [s["score"] for s in want], atol=1e-4)


def test_explained_chat_tiles_find_the_object(vlm_server, scene):
    reply = httpx.post(f"http://{vlm_server.http}/v1/explain", timeout=300, json={
        "messages": chat(scene), "target": " " + scene.answer, "heatmap": True,
        "options": {"granularity": "word", "image_granularity": "token", "mode": "multiplicative", "factor": 0.01}})
    assert reply.status_code == 200, reply.text
    tiles = tiles_of(reply.json())
    best = int(np.argmax([t["score"] for t in tiles]))
    assert scene.tile_mask().reshape(-1)[best], f"the strongest tile {best} is not on the {scene.asked.shape}"
    assert reply.json()["heatmap"].startswith("data:image/png;base64,")


def huge_url() -> str:
    from PIL import Image

    return data_url(Image.new("L", (5000, 4000)))  # 20 M pixels, a small file


def _chat_body(content: list) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 1}


BAD_CHAT_MEDIA = {
    # name: (path, body, field)
    "http URL (the server would fetch it)": (
        "/v1/chat/completions", lambda s: _chat_body([image_part("http://127.0.0.1:1/x.png"), text_part("hi")]),
        "messages[0].content[0].image_url.url"),
    "file URL": ("/v1/chat/completions", lambda s: _chat_body([text_part("hi"), image_part("file:///etc/hostname")]),
                 "messages[0].content[1].image_url.url"),
    "not an image data URL": ("/v1/chat/completions", lambda s: _chat_body([image_part("data:text/plain;base64,aGk=")]),
                              "messages[0].content[0].image_url.url"),
    "invalid base64": ("/v1/chat/completions", lambda s: _chat_body([image_part("data:image/png;base64,!!")]),
                       "messages[0].content[0].image_url.url"),
    "not a picture": ("/v1/chat/completions",
                      lambda s: _chat_body([image_part("data:image/png;base64," + base64.b64encode(b"no").decode())]),
                      "messages[0].content[0].image_url.url"),
    "huge image": ("/v1/chat/completions", lambda s: _chat_body([image_part(huge_url())]),
                   "messages[0].content[0].image_url.url"),
    "too many images": ("/v1/chat/completions",
                        lambda s: _chat_body([image_part(data_url(s.image()))] * 5 + [text_part("hi")]),
                        "messages[0].content[4].image_url.url"),
    "audio part": ("/v1/chat/completions",
                   lambda s: _chat_body([{"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:1/a.wav"}}]),
                   "messages[0].content[0].type"),
    "uuid of a cached image": ("/v1/chat/completions",
                               lambda s: _chat_body([{"type": "image_url", "image_url": None, "uuid": "abc"}]),
                               "messages[0].content[0].uuid"),
    "URL on /tokenize": ("/tokenize", lambda s: _chat_body([image_part("http://127.0.0.1:1/x.png")]),
                         "messages[0].content[0].image_url.url"),
    "URL on /v1/explain": ("/v1/explain", lambda s: {"messages": [{"role": "user", "content": [
        text_part("hi"), image_part("https://example.com/x.png")]}], "target": " red"},
        "messages[0].content[1].image_url.url"),
    "images twice on /v1/explain": ("/v1/explain", lambda s: {**{"messages": chat(s)}, "target": " red",
                                                              "images": [data_url(s.image())]}, "images"),
    "image control beyond the chat's images": (
        "/v1/chat/completions", lambda s: {**_chat_body(chat(s)[0]["content"]),
                                           "controls": [{"image": 1, "rect": WHOLE, "factor": 0.1}]}, "controls"),
    "span control on a message of parts": (
        "/v1/chat/completions", lambda s: {**_chat_body(chat(s)[0]["content"]),
                                           "controls": [{"message": 0, "start": 0, "length": 2, "factor": 0.1}]},
        "controls"),
    "correlated steering with images": (
        "/v1/chat/completions", lambda s: {**_chat_body(chat(s)[0]["content"]), "control_kappa": 0.5,
                                           "controls": [{"image": 0, "rect": WHOLE, "factor": 0.1}]}, "control_kappa"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT_MEDIA))
def test_bad_chat_media_is_refused_naming_the_part(vlm_server, scene, case):
    path, body, field = BAD_CHAT_MEDIA[case]
    reply = httpx.post(f"http://{vlm_server.http}{path}", json=body(scene), timeout=120)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: "), error
    fine = httpx.post(f"http://{vlm_server.http}/v1/chat/completions", json=_chat_body(chat(scene)[0]["content"]),
                      timeout=120)
    assert fine.status_code == 200, fine.text


def test_an_image_part_on_a_text_model_is_a_400(plain_server, scene):
    reply = httpx.post(f"http://{plain_server.http}/v1/chat/completions", timeout=120,
                       json=_chat_body([text_part("Mira is a"), image_part(data_url(scene.image()))]))
    assert reply.status_code == 400, reply.text
