"""Attention controls in ``--openai`` mode: extra body fields on /v1/completions and
/v1/chat/completions, steering the same engine as the gRPC ``Generate``."""

from __future__ import annotations

import json
import ssl

import httpx
import openai
import pytest

from .conftest import TOKEN

PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Q: Where does Otto live? A:"
LISBON = PROMPT.index("Lisbon")
SUPPRESS_LISBON = [{"start": LISBON, "length": len("Lisbon"), "factor": 0.05}]
SYSTEM = "Otto lives in Lisbon. Mira works as a pilot."
QUESTION = "Where does Otto live? Answer in one word."
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
TOP = 5


@pytest.fixture(scope="module")
def api(plain_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{plain_server.http}/v1", api_key="unused", timeout=120)


@pytest.fixture(scope="module")
def hf_tokenizer(service_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(service_model))


def complete(api, server, prompt=PROMPT, max_tokens=6, **extra_body):
    reply = api.completions.create(model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                   logprobs=TOP, extra_body={"return_token_ids": True, **extra_body})
    return reply.choices[0]


def chat(api, server, messages=MESSAGES, max_tokens=5, **extra_body):
    reply = api.chat.completions.create(model=server.model, messages=messages, max_tokens=max_tokens,
                                        temperature=0, logprobs=True, top_logprobs=TOP,
                                        extra_body={"return_token_ids": True, **extra_body})
    return reply


def first_top_logprobs(choice) -> dict[str, float]:
    """The next-token distribution (top entries) after the prompt."""
    content = getattr(choice.logprobs, "content", None)  # chat: per-token objects; completions: dicts
    if content is not None:
        return {t.token: t.logprob for t in content[0].top_logprobs}
    return dict(choice.logprobs.top_logprobs[0])


def rendered_chat(messages) -> str:
    """conftest.CHAT_TEMPLATE written out by hand."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def test_completion_control_of_factor_one_changes_nothing(api, plain_server):
    plain = complete(api, plain_server)
    neutral = complete(api, plain_server, controls=[{"start": 0, "length": 20, "factor": 1.0}],
                       control_mode="multiplicative", control_overlap="complete")
    assert neutral.text == plain.text and neutral.token_ids == plain.token_ids
    assert neutral.logprobs.token_logprobs == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    assert first_top_logprobs(neutral) == pytest.approx(first_top_logprobs(plain), abs=1e-4)


@pytest.mark.parametrize("controls, extra", [
    (SUPPRESS_LISBON, {}),
    ([{"start": 0, "length": 4, "factor": 8.0}, {"start": LISBON, "length": 6, "factor": 0.2}],
     {"control_mode": "multiplicative", "control_overlap": "complete"}),
])
def test_completion_controls_steer_like_grpc_generate(api, plain_server, client, controls, extra):
    plain = complete(api, plain_server)
    steered = complete(api, plain_server, controls=controls, **extra)
    before, after = first_top_logprobs(plain), first_top_logprobs(steered)
    shared = set(before) & set(after)
    assert set(before) != set(after) or max(abs(before[t] - after[t]) for t in shared) > 1e-3

    grpc_events = list(client.generate(
        PROMPT, max_tokens=6, controls=[(c["start"], c["length"], c["factor"]) for c in controls],
        control_mode=extra.get("control_mode", ""), control_overlap=extra.get("control_overlap", "")))
    grpc_ids = [i for e in grpc_events for i in e.token_ids]
    assert steered.token_ids == grpc_ids  # one engine, one steered greedy answer on both transports
    assert steered.text == grpc_events[-1].completion_text

    # The same request streamed gives the same steered answer.
    stream = api.completions.create(model=plain_server.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                    stream=True, extra_body={"controls": controls, **extra})
    assert "".join(chunk.choices[0].text for chunk in stream) == steered.text


def test_chat_controls_steer_the_last_message_and_factor_one_does_not(api, plain_server, hf_tokenizer):
    plain = chat(api, plain_server)
    # The engine ran vLLM's rendering of the chat, tokenized without special tokens.
    expected_ids = hf_tokenizer(rendered_chat(MESSAGES), add_special_tokens=False)["input_ids"]
    assert plain.prompt_token_ids == expected_ids

    neutral = chat(api, plain_server, controls=[{"start": 0, "length": len(QUESTION), "factor": 1.0}])
    assert neutral.prompt_token_ids == expected_ids
    assert neutral.choices[0].message.content == plain.choices[0].message.content
    assert first_top_logprobs(neutral.choices[0]) == pytest.approx(first_top_logprobs(plain.choices[0]), abs=1e-4)

    steered = chat(api, plain_server, controls=[{"start": 0, "length": len("Where does Otto live?"), "factor": 0.05}])
    assert steered.prompt_token_ids == expected_ids  # same tokens, different attention
    before, after = first_top_logprobs(plain.choices[0]), first_top_logprobs(steered.choices[0])
    shared = set(before) & set(after)
    assert set(before) != set(after) or max(abs(before[t] - after[t]) for t in shared) > 1e-3


@pytest.mark.parametrize("options", [{}, {"control_kappa": 0.2, "control_overlap": "complete"}])
def test_chat_control_positions_are_those_of_the_engine_tokens(api, plain_server, hf_tokenizer, options):
    """A steered chat equals a completion of its rendered text with the spans moved into it.

    With add_special_tokens the chat's tokens are BOS + the rendered text's,
    exactly what /v1/completions runs for that text; so the two must agree
    token for token and logprob for logprob when the spans are placed right
    (with kappa too: both exclude only the BOS from the similar tokens).
    """
    text = rendered_chat(MESSAGES)
    system_at, question_at = text.index(SYSTEM), text.index(QUESTION)
    otto = QUESTION.index("Otto")
    chat_controls = [{"message": 0, "start": SYSTEM.index("Lisbon"), "length": 6, "factor": 0.1},
                     {"start": otto, "length": 4, "factor": 4.0}]
    text_controls = [{"start": system_at + SYSTEM.index("Lisbon"), "length": 6, "factor": 0.1},
                     {"start": question_at + otto, "length": 4, "factor": 4.0}]

    steered_chat = chat(api, plain_server, max_tokens=6, controls=chat_controls, add_special_tokens=True, **options)
    steered_text = complete(api, plain_server, prompt=text, controls=text_controls, **options)
    assert steered_chat.prompt_token_ids == hf_tokenizer(text)["input_ids"]
    assert steered_chat.prompt_token_ids[0] == hf_tokenizer.bos_token_id
    assert steered_chat.choices[0].token_ids == steered_text.token_ids
    chat_logprobs = [t.logprob for t in steered_chat.choices[0].logprobs.content]
    assert chat_logprobs == pytest.approx(steered_text.logprobs.token_logprobs, abs=1e-4)
    assert first_top_logprobs(steered_chat.choices[0]) == pytest.approx(first_top_logprobs(steered_text), abs=1e-4)

    # And the spans do something: unsteered, the first token's distribution differs.
    plain_text = complete(api, plain_server, prompt=text)
    before, after = first_top_logprobs(plain_text), first_top_logprobs(steered_text)
    shared = set(before) & set(after)
    assert set(before) != set(after) or max(abs(before[t] - after[t]) for t in shared) > 1e-3


def _raw_post(server, path: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"http://{server.http}{path}", content=content, timeout=120,
                      headers={"content-type": "application/json"})


def _completion_body(server, **fields) -> dict:
    return {"model": server.model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, **fields}


def _chat_body(server, **fields) -> dict:
    return {"model": server.model, "messages": MESSAGES, "max_tokens": 2, "temperature": 0, **fields}


BAD_CASES = {
    # name: (path, body fields, field, words the message must contain)
    "outside the prompt": ("/v1/completions", {"controls": [{"start": 10, "length": 5000, "factor": 0.5}]},
                           "controls", "outside"),
    "factor 0": ("/v1/completions", {"controls": [{"start": 0, "length": 4, "factor": 0}]}, "controls", "> 0"),
    "negative factor": ("/v1/completions", {"controls": [{"start": 0, "length": 4, "factor": -2}]},
                        "controls", "> 0"),
    "overlapping": ("/v1/completions", {"controls": [{"start": 0, "length": 10, "factor": 0.5},
                                                     {"start": 5, "length": 10, "factor": 2.0}]},
                    "controls", "overlap"),
    "several prompts": ("/v1/completions", {"prompt": [PROMPT, PROMPT],
                                            "controls": [{"start": 0, "length": 4, "factor": 0.5}]},
                        "controls", "2 prompts"),
    "token-id prompt": ("/v1/completions", {"prompt": [1, 2, 3], "controls": [{"start": 0, "length": 1,
                                                                               "factor": 0.5}]},
                        "controls", "one string"),
    "not a list": ("/v1/completions", {"controls": {"start": 0, "length": 4, "factor": 0.5}},
                   "controls", "list"),
    "message on a completion": ("/v1/completions", {"controls": [{"start": 0, "length": 4, "factor": 0.5,
                                                                  "message": 0}]},
                                "controls", "message"),
    "beam search": ("/v1/completions", {"use_beam_search": True, "n": 2,
                                        "controls": [{"start": 0, "length": 4, "factor": 0.5}]},
                    "controls", "use_beam_search"),
    "unknown mode": ("/v1/completions", {"controls": [{"start": 0, "length": 4, "factor": 0.5}],
                                         "control_mode": "additive"}, "control_mode", "log-additive"),
    "kappa above 1": ("/v1/completions", {"controls": [{"start": 0, "length": 4, "factor": 0.5}],
                                          "control_kappa": 2}, "control_kappa", "[0, 1]"),
    "unknown overlap": ("/v1/completions", {"controls": [{"start": 0, "length": 4, "factor": 0.5}],
                                            "control_overlap": "half"}, "control_overlap", "half"),
    "chat: message index out of range": ("/v1/chat/completions",
                                         {"controls": [{"message": 2, "start": 0, "length": 4, "factor": 0.5}]},
                                         "controls", "index of a message"),
    "chat: outside the message": ("/v1/chat/completions",
                                  {"controls": [{"start": 0, "length": len(QUESTION) + 1, "factor": 0.5}]},
                                  "controls", "messages[1].content"),
    "chat: overlapping in one message": ("/v1/chat/completions",
                                         {"controls": [{"message": 0, "start": 0, "length": 6, "factor": 0.5},
                                                       {"message": 0, "start": 3, "length": 6, "factor": 2.0}]},
                                         "controls", "overlap"),
    "chat: factor 0": ("/v1/chat/completions", {"controls": [{"start": 0, "length": 4, "factor": 0.0}]},
                       "controls", "> 0"),
    "chat: content not a string": ("/v1/chat/completions",
                                   {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                    "controls": [{"start": 0, "length": 2, "factor": 0.5}]},
                                   "controls", "not a string"),
}


def _assert_refused(reply: httpx.Response, field: str, words: str) -> None:
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["code"] == 400
    assert error["message"].startswith(f"{field}: ") and words in error["message"], error["message"]


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_controls_get_400_naming_the_field(api, plain_server, case):
    path, fields, field, words = BAD_CASES[case]
    make_body = _completion_body if path == "/v1/completions" else _chat_body
    _assert_refused(_raw_post(plain_server, path, make_body(plain_server, **fields)), field, words)
    assert complete(api, plain_server, max_tokens=2, controls=SUPPRESS_LISBON).text  # still serving


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_nan_factor_gets_400(api, plain_server, path):
    # JSON has no NaN, but Python's parser (and so the server's) reads the literal.
    make_body = _completion_body if path == "/v1/completions" else _chat_body
    body = json.dumps(make_body(plain_server, controls=[{"start": 0, "length": 4, "factor": "NAN_HERE"}]))
    _assert_refused(_raw_post(plain_server, path, body.replace('"NAN_HERE"', "NaN").encode()), "controls", "nan")
    assert chat(api, plain_server, max_tokens=2, controls=[{"start": 0, "length": 5, "factor": 0.5}]).choices


def test_openai_client_sees_the_400(api, plain_server):
    with pytest.raises(openai.BadRequestError) as err:
        complete(api, plain_server, controls=[{"start": 0, "length": 5000, "factor": 0.5}])
    assert err.value.status_code == 400 and err.value.body["param"] == "controls"
    assert err.value.body["message"].startswith("controls: ")


def test_controls_need_the_token_first(secure_server):
    """vLLM's bearer-token check runs before any control is looked at."""
    url = f"https://{secure_server.http}/v1/completions"
    body = {"model": secure_server.model, "prompt": PROMPT, "max_tokens": 2,
            "controls": [{"start": 0, "length": 5000, "factor": 0.5}]}
    with httpx.Client(verify=ssl.create_default_context(cafile=secure_server.tls_cert), timeout=120) as http:
        assert http.post(url, json=body).status_code == 401
        reply = http.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "controls"
        body["controls"] = SUPPRESS_LISBON
        reply = http.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
