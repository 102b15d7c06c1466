"""Chat explanations on the real server: ``messages`` on ``POST /v1/explain`` and gRPC ``Explain``,
and the ``explain`` extra field of vLLM's ``/v1/chat/completions`` through the unmodified openai client.

The plain server's model has the conftest's minimal chat template (``role: content`` lines, then
``assistant:``); SmolLM2's real template is covered by tests/unit/test_core_real_tokenizers.py and
tests/engine/test_engine_smollm2.py.
"""

from __future__ import annotations

import httpx
import jsonschema
import openai
import pytest

from atman_vllm.client import AtmanError
from atman_vllm.core import EXPLAIN_RESULT_SCHEMA

MESSAGES = [{"role": "system", "content": "Otto lives in Lisbon. Mira works as a pilot."},
            {"role": "user", "content": "Where does Otto live?"}]
TARGET = " Lisbon"


def _check_message_spans(result: dict, messages: list[dict]) -> None:
    scores = result["explanations"][0]["prompt_scores"]
    assert {s["message"] for s in scores} == set(range(len(messages)))
    for s in scores:  # each span indexes its message's content; no template text is a unit
        assert messages[s["message"]]["content"][s["start"]:s["start"] + s["length"]] == s["text"]
    assert result["messages"] == messages


def test_explain_messages_over_http_and_grpc(plain_server, client):
    reply = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=120, json={
        "messages": MESSAGES, "target": TARGET, "options": {"granularity": "word"}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    jsonschema.validate(body, EXPLAIN_RESULT_SCHEMA)
    _check_message_spans(body, MESSAGES)
    assert body["prompt"] == "system: " + MESSAGES[0]["content"] + "\nuser: " + MESSAGES[1]["content"] + "\nassistant:"
    assert [s["text"] for s in body["explanations"][0]["prompt_scores"]] == [
        "Otto", "lives", "in", "Lisbon.", "Mira", "works", "as", "a", "pilot.", "Where", "does", "Otto", "live?"]

    over_grpc = client.explain(messages=MESSAGES, target=TARGET, granularity="word").to_dict()
    assert [(s["message"], s["start"], s["text"]) for s in over_grpc["explanations"][0]["prompt_scores"]] == \
        [(s["message"], s["start"], s["text"]) for s in body["explanations"][0]["prompt_scores"]]
    for a, b in zip(over_grpc["explanations"][0]["prompt_scores"], body["explanations"][0]["prompt_scores"]):
        assert a["score"] == pytest.approx(b["score"], rel=1e-6, abs=1e-9)


HTTP_CASES = {
    # name: (body fields, field, words)
    "empty messages": ({"messages": []}, "messages", "non-empty"),
    "wrong role": ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "role"),
    "last from the assistant": ({"messages": [*MESSAGES, {"role": "assistant", "content": "Lisbon"}]},
                                "messages", "last message must be from the user"),
    "prompt and messages": ({"prompt": "Where?", "messages": MESSAGES}, "messages", "not both"),
    "content neither a string nor parts": ({"messages": [{"role": "user", "content": 5}]}, "messages", "string"),
    "content part not an object": ({"messages": [{"role": "user", "content": ["hi"]}]}, "messages",
                                   "messages.0.content.0"),
    "neither": ({}, "prompt", "required"),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_bad_messages_name_the_field(plain_server, client, case):
    fields, field, words = HTTP_CASES[case]
    reply = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=60, json={"target": TARGET, **fields})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: ") and words in error["message"]
    if case in ("wrong role", "last from the assistant"):  # the same check on gRPC
        with pytest.raises(AtmanError) as err:
            client.explain(messages=fields["messages"], target=TARGET)
        assert err.value.field == "messages" and words in err.value.message


@pytest.fixture(scope="module")
def api(plain_server):
    return openai.OpenAI(base_url=f"http://{plain_server.http}/v1", api_key="unused", timeout=120)


def test_chat_completion_returns_its_explanation(api, plain_server):
    chat = api.chat.completions.create(model=plain_server.model, messages=MESSAGES, max_tokens=4, temperature=0,
                                       extra_body={"explain": {"granularity": "word"}})
    answer = chat.choices[0].message.content
    assert answer and chat.usage.completion_tokens == 4
    explanation = chat.model_extra["explanation"]
    jsonschema.validate(explanation, EXPLAIN_RESULT_SCHEMA)
    assert explanation["target"] == answer  # the completion's own tokens were explained
    _check_message_spans(explanation, MESSAGES)
    # Explained right after the generation: the prompt's blocks come from the prefix cache.
    assert explanation["stats"]["cached_tokens"] > 0
    assert "prompt_token_ids" not in chat.model_extra  # not asked for; only the explanation was
    plain = api.chat.completions.create(model=plain_server.model, messages=MESSAGES, max_tokens=4, temperature=0)
    assert plain.choices[0].message.content == answer and "explanation" not in (plain.model_extra or {})

    again = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=120, json={
        "messages": MESSAGES, "target": answer, "options": {"granularity": "word"}}).json()
    assert [s["text"] for s in again["explanations"][0]["prompt_scores"]] == \
        [s["text"] for s in explanation["explanations"][0]["prompt_scores"]]


@pytest.mark.parametrize("extra,field,words", [
    ({"explain": True, "stream": True}, "explain", "stream"),
    ({"explain": {"factor": 0}}, "explain.factor", "greater than"),
    ({"explain": {"granularity": "letter"}}, "explain.granularity", "letter"),
    ({"explain": "yes"}, "explain", "true or an options object"),
    ({"explain": True, "n": 2}, "explain", "n must be 1"),
])
def test_bad_chat_explain_names_the_field(api, plain_server, extra, field, words):
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=plain_server.model, messages=MESSAGES, max_tokens=2, extra_body=extra)
    error = err.value.body if isinstance(err.value.body, dict) else {}
    error = error.get("error", error)
    assert error["param"] == field and words in error["message"], error
