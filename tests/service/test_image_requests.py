"""Images through the service: HTTP /v1/explain (base64 and data URLs, heatmap on request) and gRPC
(a prompt in text and image parts), real requests on loopback; bad images fail alone, naming the field."""

from __future__ import annotations

import base64
import io

import grpc
import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image

from atman_vllm.client.convert import result_from_proto
from atman_vllm.core import EXPLAIN_RESULT_SCHEMA
from atman_vllm.proto_gen import atman_pb2 as pb
from atman_vllm.proto_gen import atman_pb2_grpc as pb_grpc

QUESTION = "Question: What colour is the square? Answer:"
TARGET = " red"


def png(seed: int, size=(48, 64)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def stub(vlm_server):
    with grpc.insecure_channel(vlm_server.grpc) as channel:
        yield pb_grpc.AtmanStub(channel)


def post(server, body):
    return httpx.post(f"http://{server.http}/v1/explain", json=body, timeout=300)


def test_http_and_grpc_explain_the_same_image_alike(vlm_server, stub):
    image = png(1)
    body = {"prompt": "<image>" + QUESTION, "target": TARGET, "images": ["data:image/png;base64," + b64(image)],
            "options": {"granularity": "word", "image_granularity": "token"}, "heatmap": True}
    reply = post(vlm_server, body)
    assert reply.status_code == 200, reply.text
    http = reply.json()
    jsonschema.validate(http, EXPLAIN_RESULT_SCHEMA)
    tiles = [s for s in http["explanations"][0]["prompt_scores"] if "image" in s]
    assert len(tiles) == 16 and tiles[5]["rect"] == {"left": 0.25, "top": 0.25, "width": 0.25, "height": 0.25}
    assert http["images"][0]["width"] == 64 and http["images"][0]["height"] == 48
    heatmap = Image.open(io.BytesIO(base64.b64decode(http["heatmap"].split(",", 1)[1])))
    assert heatmap.format == "PNG" and heatmap.size == (64 * 6, 48 * 6)  # enlarged by a whole factor to >= 256

    plain = post(vlm_server, {**body, "images": [b64(image)], "heatmap": False}).json()  # plain base64 too
    assert "heatmap" not in plain
    np.testing.assert_allclose([s["score"] for s in plain["explanations"][0]["prompt_scores"]],
                               [s["score"] for s in http["explanations"][0]["prompt_scores"]], atol=1e-4)

    request = pb.ExplainRequest(target=TARGET, parts=[pb.PromptPart(image=image), pb.PromptPart(text=QUESTION)],
                                options=pb.ExplainOptions(granularity="word", image_granularity="token"))
    result = result_from_proto(stub.Explain(request, timeout=300)).to_dict()
    assert result["prompt"] == http["prompt"]
    got = [(s.get("image"), s["start"], s["score"]) for s in result["explanations"][0]["prompt_scores"]]
    want = [(s.get("image"), s["start"], s["score"]) for s in http["explanations"][0]["prompt_scores"]]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], atol=1e-4)
    assert result["images"] == http["images"]


def huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buf, format="PNG")  # 20 M pixels, a small file
    return buf.getvalue()


HTTP_CASES = {
    # name: (body changes, field)
    "invalid base64": (dict(images=["not base64 !!"]), "images[0]"),
    "bad data URL": (dict(images=["data:text/plain,hello"]), "images[0]"),
    "not an image": (dict(images=[b64(b"hello, not a picture")]), "images"),
    "too many images": (dict(prompt="<image>" * 5 + QUESTION, images=[b64(png(2))] * 5), "images"),
    "huge image": (dict(images=[b64(huge_png())]), "images"),
    "placeholders and images disagree": (dict(prompt="<image><image>" + QUESTION), "images"),
    "images not a list": (dict(images="abc"), "images"),
    "heatmap without images": (dict(images=None, prompt=QUESTION, heatmap=True), "heatmap"),
    "image granularity": (dict(options={"image_granularity": "letter"}), "image_granularity"),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_bad_http_images_name_the_field(vlm_server, case):
    changes, field = HTTP_CASES[case]
    body = {"prompt": "<image>" + QUESTION, "target": TARGET, "images": [b64(png(3))], **changes}
    reply = post(vlm_server, {k: v for k, v in body.items() if v is not None})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: "), error
    assert post(vlm_server, {"prompt": "<image>" + QUESTION, "target": TARGET, "images": [b64(png(3))]}).status_code == 200


GRPC_CASES = {
    "not an image": ([pb.PromptPart(image=b"GIF89a? no"), pb.PromptPart(text=QUESTION)], "images"),
    "too many images": ([pb.PromptPart(image=png(2))] * 5 + [pb.PromptPart(text=QUESTION)], "images"),
    "huge image": ([pb.PromptPart(image=huge_png()), pb.PromptPart(text=QUESTION)], "images"),
    "empty part": ([pb.PromptPart(), pb.PromptPart(text=QUESTION)], "parts"),
    "placeholder in text": ([pb.PromptPart(text="<image>" + QUESTION)], "parts"),
}


@pytest.mark.parametrize("case", list(GRPC_CASES))
def test_bad_grpc_images_are_invalid_argument_naming_the_field(stub, case):
    parts, field = GRPC_CASES[case]
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(pb.ExplainRequest(target=TARGET, parts=parts), timeout=120)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert dict(e.value.trailing_metadata())["atman-error-field"] == field, e.value.details()


def test_grpc_prompt_and_parts_together_is_refused(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Explain(pb.ExplainRequest(prompt=QUESTION, target=TARGET, parts=[pb.PromptPart(text="x")]), timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["atman-error-field"] == "parts"


def test_image_parts_on_a_text_model_are_refused(client, plain_server):
    with grpc.insecure_channel(plain_server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.AtmanStub(channel).Explain(pb.ExplainRequest(
                target=" pilot", parts=[pb.PromptPart(image=png(4)), pb.PromptPart(text="Mira is a pilot")]),
                timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["atman-error-field"] == "parts"
    reply = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=60,
                       json={"prompt": "<image> Mira", "target": " pilot", "images": [b64(png(4))]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "images"


def test_the_grpc_client_takes_a_prompt_in_parts(vlm_server, stub):
    """AtmanClient(parts=[...]): images as encoded bytes, PIL images or arrays, sent as the raw stub would."""
    from atman_vllm.client import AtmanClient, AtmanError

    image = png(2)
    raw = result_from_proto(stub.Explain(pb.ExplainRequest(
        target=TARGET, parts=[pb.PromptPart(image=image), pb.PromptPart(text=QUESTION)],
        options=pb.ExplainOptions(granularity="word", image_granularity="token")), timeout=300)).to_dict()
    pixels = np.asarray(Image.open(io.BytesIO(image)))
    with AtmanClient(vlm_server.grpc, timeout=300) as client:
        for as_given in (image, Image.open(io.BytesIO(image)), pixels):
            got = client.explain(target=TARGET, parts=[as_given, QUESTION], granularity="word",
                                 image_granularity="token").to_dict()
            assert got["prompt"] == raw["prompt"] and got["images"] == raw["images"]  # same pixels: same digest
            np.testing.assert_allclose([s["score"] for s in got["explanations"][0]["prompt_scores"]],
                                       [s["score"] for s in raw["explanations"][0]["prompt_scores"]], atol=1e-4)
        for parts, text in (([], "non-empty"), ([QUESTION, object()], "parts[1]")):
            with pytest.raises(AtmanError) as err:
                client.explain(target=TARGET, parts=parts)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and text in str(err.value)
        with pytest.raises(AtmanError) as err:
            client.explain(QUESTION, TARGET, parts=[image])
        assert err.value.field == "parts"


def _generate(stub, controls, max_tokens=8, explain=False):
    request = pb.GenerateRequest(parts=[pb.PromptPart(image=png(60)), pb.PromptPart(text=QUESTION)],
                                 max_tokens=max_tokens, controls=controls, explain=explain)
    return list(stub.Generate(request, timeout=300))


def test_grpc_generate_steers_an_image_rect(stub):
    plain = [i for e in _generate(stub, []) if e.HasField("delta") for i in e.delta.token_ids]
    whole = pb.Rect(left=0, top=0, width=1, height=1)
    steered = [i for e in _generate(stub, [pb.Control(image=0, rect=whole, factor=0.01)])
               if e.HasField("delta") for i in e.delta.token_ids]
    neutral = [i for e in _generate(stub, [pb.Control(image=0, rect=whole, factor=1.0)])
               if e.HasField("delta") for i in e.delta.token_ids]
    assert plain and steered and neutral == plain  # the shapes VLM answers one word, then EOS
    assert steered != plain, "suppressing the whole image changed nothing"


@pytest.mark.parametrize("control,words", [
    (pb.Control(image=1, rect=pb.Rect(left=0, top=0, width=1, height=1), factor=0.1), "controls[0].image"),
    (pb.Control(image=0, rect=pb.Rect(left=0.5, top=0, width=0.8, height=1), factor=0.1), "controls[0].rect"),
    (pb.Control(image=0, factor=0.1), "controls[0].rect"),
])
def test_bad_grpc_image_controls_name_the_field(stub, control, words):
    with pytest.raises(grpc.RpcError) as e:
        _generate(stub, [control])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert dict(e.value.trailing_metadata())["atman-error-field"] == "controls" and words in e.value.details()
