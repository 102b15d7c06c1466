"""Every bad input gets INVALID_ARGUMENT / HTTP 400 (NOT_FOUND / 404 for an unknown
model) with a message naming the field, and the server keeps serving."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from atman_vllm.client import AtmanClient, AtmanError
from atman_vllm.proto_gen import atman_pb2 as pb

from .conftest import MAX_EXPLAIN_TOKENS, MAX_UNITS

PROMPT = "Mira works as a pilot. Q: What is the job of Mira? A:"
TARGET = " pilot"
REPEATED = "Otto lives in Lisbon. Mira works as a pilot. " * 40


def prompt_of_tokens(client, n: int) -> str:
    tokens = client.tokenize(REPEATED)
    return REPEATED[:tokens[n].start]


EXPLAIN_CASES = {
    # name: (keyword arguments of client.explain, field, words the message must contain)
    "empty prompt": (dict(prompt="", target=TARGET), "prompt", "empty"),
    "empty target": (dict(prompt=PROMPT, target=""), "target", "empty"),
    "zero factor": (dict(factor=0.0), "factor", "> 0"),
    "negative factor": (dict(factor=-0.5), "factor", "> 0"),
    "nan factor": (dict(factor=float("nan")), "factor", "nan"),
    "inf factor": (dict(factor=float("inf")), "factor", "inf"),
    "kappa above 1": (dict(kappa=1.5), "kappa", "[0, 1]"),
    "negative kappa": (dict(kappa=-0.1), "kappa", "[0, 1]"),
    "unknown mode": (dict(mode="additive"), "mode", "log-additive"),
    "unknown granularity": (dict(granularity="letter"), "granularity", "letter"),
    "unknown target granularity": (dict(target_granularity="each"), "target_granularity", "each"),
    "unknown postprocessing": (dict(postprocessing="cube"), "postprocessing", "cube"),
    "custom without delimiter": (dict(granularity="custom"), "delimiter", "non-empty"),
    "empty delimiter": (dict(granularity="custom", delimiter=""), "delimiter", "non-empty"),
    "span out of range": (dict(spans=[(10, 500)]), "spans", "outside"),
    "overlapping spans": (dict(spans=[(0, 10), (5, 10)]), "spans", "overlap"),
    "unknown search": (dict(search="greedy"), "search", "greedy"),
    "budget without hierarchical search": (dict(budget=8), "budget", "hierarchical"),
    "budget below two passes": (dict(search="hierarchical", budget=1), "budget", "at least 2"),
    "unknown model": (dict(model="gpt-17"), "model", "gpt-17"),
}


@pytest.mark.parametrize("case", list(EXPLAIN_CASES))
def test_bad_explain_input_names_the_field(client, plain_server, case):
    kwargs, field, words = EXPLAIN_CASES[case]
    kwargs = {"prompt": PROMPT, "target": TARGET, **kwargs}
    expected = grpc.StatusCode.NOT_FOUND if field == "model" else grpc.StatusCode.INVALID_ARGUMENT
    with AtmanClient(plain_server.grpc, model=kwargs.pop("model", ""), timeout=60) as caller:
        with pytest.raises(AtmanError) as err:
            caller.explain(**kwargs)
    assert err.value.code == expected
    assert err.value.field == field
    assert err.value.message.startswith(f"{field}: ") and words in err.value.message
    assert client.explain(PROMPT, TARGET, granularity="word").explanations  # still serving


def _raw_explain(address: str, body: bytes) -> None:
    """An Explain call with hand-made request bytes (what a non-Python client could send)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/atman.v1.Atman/Explain")
        try:
            call(body, timeout=60)
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None


def test_invalid_utf8_on_the_wire_is_invalid_argument(client, plain_server):
    good = pb.ExplainRequest(prompt="Mira ~~ pilot", target=TARGET).SerializeToString()
    bad = good.replace(b"~~", b"\xff\xfe")  # same length, so the framing stays valid
    with pytest.raises(AtmanError) as err:
        _raw_explain(plain_server.grpc, bad)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == "prompt" and "UTF-8" in err.value.message

    nested = pb.ExplainRequest(prompt=PROMPT, target=TARGET,
                               options=pb.ExplainOptions(granularity="custom", delimiter="~~")).SerializeToString()
    with pytest.raises(AtmanError) as err:
        _raw_explain(plain_server.grpc, nested.replace(b"~~", b"\xc3\x28"))
    assert err.value.field == "options.delimiter"

    with pytest.raises(AtmanError) as err:
        _raw_explain(plain_server.grpc, b"\x0a\xff")  # truncated: not a message at all
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "atman.v1.ExplainRequest" in err.value.message

    # A Python str that cannot be UTF-8 never leaves the client, with the same status.
    with pytest.raises(AtmanError) as err:
        client.explain("Mira \udcff pilot", TARGET)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "prompt"
    assert client.explain(PROMPT, TARGET).explanations


def test_too_many_tokens_or_units(client):
    with pytest.raises(AtmanError) as err:
        client.explain(prompt_of_tokens(client, MAX_EXPLAIN_TOKENS + 5), TARGET, granularity="sentence")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "prompt"
    assert str(MAX_EXPLAIN_TOKENS) in err.value.message

    with pytest.raises(AtmanError) as err:  # beyond the engine's context, not only the service limit
        client.explain(REPEATED * 2, TARGET, granularity="sentence")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "prompt"

    with pytest.raises(AtmanError) as err:
        client.explain(prompt_of_tokens(client, MAX_UNITS + 20), TARGET, granularity="token")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "granularity"
    assert str(MAX_UNITS) in err.value.message and "coarser" in err.value.message
    assert client.explain(prompt_of_tokens(client, MAX_UNITS + 20), TARGET, granularity="sentence").explanations


GENERATE_CASES = {
    "empty prompt": (dict(prompt=""), "prompt"),
    "too many tokens": (dict(max_tokens=100_000), "max_tokens"),
    "negative temperature": (dict(temperature=-1.0), "temperature"),
    "control out of range": (dict(controls=[(0, 500, 0.5)]), "controls"),
    "overlapping controls": (dict(controls=[(0, 6, 0.5), (3, 6, 2.0)]), "controls"),
    "zero control factor": (dict(controls=[(0, 4, 0.0)]), "controls"),
    "unknown control mode": (dict(controls=[(0, 4, 0.5)], control_mode="bogus"), "control_mode"),
    "kappa above 1": (dict(controls=[(0, 4, 0.5)], control_kappa=3.0), "control_kappa"),
    "unknown overlap": (dict(controls=[(0, 4, 0.5)], control_overlap="some"), "control_overlap"),
    "bad explain options": (dict(explain=True, explain_options={"factor": -1}), "factor"),
    "bad explain mode": (dict(explain=True, explain_options={"mode": "bogus"}), "mode"),
    "explain beyond the token limit": (dict(explain=True, max_tokens=MAX_EXPLAIN_TOKENS), "max_tokens"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_bad_generate_input_names_the_field(client, case):
    kwargs, field = GENERATE_CASES[case]
    kwargs = {"prompt": PROMPT, "max_tokens": 3, **kwargs}
    with pytest.raises(AtmanError) as err:
        list(client.generate(kwargs.pop("prompt"), **kwargs))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.field == field and err.value.message.startswith(f"{field}: ")
    deltas = list(client.generate(PROMPT, max_tokens=3, controls=[(0, 4, 0.5)]))
    assert deltas[-1].finished


HTTP_CASES = {
    # name: (request body, status, field)
    "empty prompt": ({"prompt": "", "target": TARGET}, 400, "prompt"),
    "missing target": ({"prompt": PROMPT}, 400, "target"),
    "prompt not a string": ({"prompt": 5, "target": TARGET}, 400, "prompt"),
    "unknown field": ({"prompt": PROMPT, "target": TARGET, "temperature": 1}, 400, "temperature"),
    "unknown option": ({"prompt": PROMPT, "target": TARGET, "options": {"factr": 0.1}}, 400, "factr"),
    "bad factor": ({"prompt": PROMPT, "target": TARGET, "options": {"factor": 0}}, 400, "factor"),
    "bad kappa": ({"prompt": PROMPT, "target": TARGET, "options": {"kappa": 7}}, 400, "kappa"),
    "bad granularity": ({"prompt": PROMPT, "target": TARGET, "options": {"granularity": "x"}}, 400, "granularity"),
    "bad search": ({"prompt": PROMPT, "target": TARGET, "options": {"search": "greedy"}}, 400, "search"),
    "budget below two": ({"prompt": PROMPT, "target": TARGET, "options": {"search": "hierarchical", "budget": 1}},
                         400, "budget"),
    "budget too small for the paragraphs": ({"prompt": "A b.\n\nC d.\n\nE f.", "target": TARGET, "options": {
        "search": "hierarchical", "budget": 3, "granularity": "token"}}, 400, "budget"),
    "lone surrogate": ({"prompt": "Mira \ud800 pilot", "target": TARGET}, 400, "prompt"),
    "unknown model": ({"model": "gpt-17", "prompt": PROMPT, "target": TARGET}, 404, "model"),
}


@pytest.mark.parametrize("case", list(HTTP_CASES))
def test_bad_http_explain_input_names_the_field(plain_server, case):
    body, status, field = HTTP_CASES[case]
    url = f"http://{plain_server.http}/v1/explain"
    # json.dumps escapes non-ASCII (a lone surrogate becomes "\ud800", as a JSON client may send it)
    reply = httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == field and error["message"].startswith(f"{field}: ")
    assert httpx.post(url, json={"prompt": PROMPT, "target": TARGET}, timeout=60).status_code == 200


def test_http_body_that_is_not_json_or_not_utf8(plain_server):
    url = f"http://{plain_server.http}/v1/explain"
    reply = httpx.post(url, content=b"prompt=Mira", timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "body"
    reply = httpx.post(url, content=b'{"prompt": "Mira \xff pilot", "target": " pilot"}', timeout=60)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    assert "UTF-8" in reply.json()["error"]["message"]
