"""One trust boundary: no client can hand the engine an AtMan payload, on any route, and
vLLM's own verdicts on a bad request are client errors on both transports."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

from atman_vllm.client import AtmanError

PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Q: Where does Otto live? A:"
PAYLOAD = {"bias": {"positions": [1], "factors": [1e300], "mode": "multiplicative"}}  # stopped the engine once
HOSTILE_XARGS = [{"atman": PAYLOAD}, {"atman": '{"bias": {"positions": [1], "factors": [1e300], "mode": "x"}}'},
                 {"atman": "garbage"}, {"atman": None}, {"other": 1, "atman": []}]


def _bodies(model: str) -> dict[str, dict]:
    """A valid body for each JSON route of vLLM's app that takes vllm_xargs, and others."""
    return {
        "/v1/completions": {"model": model, "prompt": PROMPT, "max_tokens": 2},
        "/v1/chat/completions": {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
        "/v1/responses": {"model": model, "input": "Hi", "max_output_tokens": 2},
        "/v1/messages": {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
        "/tokenize": {"model": model, "prompt": PROMPT},
        "/v1/explain": {"model": model, "prompt": PROMPT, "target": " Lisbon"},
    }


@pytest.mark.parametrize("xargs", HOSTILE_XARGS, ids=lambda x: str(x)[:30])
@pytest.mark.parametrize("stream", [False, True])
def test_every_route_refuses_a_client_atman_payload(plain_server, xargs, stream):
    with httpx.Client(base_url=f"http://{plain_server.http}", timeout=60) as http:
        for path, body in _bodies(plain_server.model).items():
            body = {**body, "vllm_xargs": xargs}
            if stream and path not in ("/tokenize", "/v1/explain"):
                body["stream"] = True
            reply = http.post(path, json=body)
            assert reply.status_code == 400, f"{path}: {reply.status_code} {reply.text[:300]}"
            error = reply.json()["error"]
            assert error["param"] == "vllm_xargs.atman" and error["message"].startswith("vllm_xargs.atman: "), error
        # Another vllm_xargs key is not ours to police: vLLM serves the request.
        reply = http.post("/v1/completions", json={**_bodies(plain_server.model)["/v1/completions"],
                                                   "vllm_xargs": {"my_key": 1}})
        assert reply.status_code == 200, reply.text[:300]


def test_the_openai_client_cannot_smuggle_a_payload_but_controls_still_steer(plain_server):
    api = openai.OpenAI(base_url=f"http://{plain_server.http}/v1", api_key="unused", timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model=plain_server.model, prompt=PROMPT, max_tokens=2,
                               extra_body={"vllm_xargs": {"atman": PAYLOAD}})
    assert "vllm_xargs.atman" in str(err.value)
    steered = api.completions.create(model=plain_server.model, prompt=PROMPT, max_tokens=2,
                                     extra_body={"controls": [{"start": 0, "length": 4, "factor": 0.5}]})
    assert steered.choices[0].text


def test_out_of_range_factors_are_refused_on_every_transport(plain_server, client):
    for options in ({"mode": "multiplicative", "factor": 1e6}, {"factor": 1e-9}, {"factor": True}):
        reply = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=60,
                           json={"prompt": PROMPT, "target": " Lisbon", "options": options})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "factor", reply.text[:300]
    for factor in (1e6, 1e-9):
        with pytest.raises(AtmanError) as err:
            client.explain(PROMPT, " Lisbon", mode="multiplicative", factor=factor)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "factor"
    reply = httpx.post(f"http://{plain_server.http}/v1/completions", timeout=60, json={
        "model": plain_server.model, "prompt": PROMPT, "max_tokens": 2,
        "controls": [{"start": 0, "length": 4, "factor": 1e4}], "control_mode": "multiplicative"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "controls", reply.text[:300]
    assert client.explain(PROMPT, " Lisbon", mode="multiplicative", factor=100.0).explanations


def test_a_prompt_longer_than_the_context_is_a_client_error_on_both_transports(plain_server, client):
    long_prompt = "Otto lives in Lisbon. " * 200  # well over the 512-token context
    with pytest.raises(AtmanError) as err:
        list(client.generate(long_prompt, max_tokens=2))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "prompt", err.value
    assert "maximum" in err.value.message and "512" in err.value.message
    reply = httpx.post(f"http://{plain_server.http}/v1/completions", timeout=60,
                       json={"model": plain_server.model, "prompt": long_prompt, "max_tokens": 2})
    assert reply.status_code == 400, reply.text[:300]
    huge = "x" * 2_000_000  # refused before anything tokenizes it
    with pytest.raises(AtmanError) as err:
        list(client.generate(huge, max_tokens=2))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "characters" in err.value.message
    with pytest.raises(AtmanError) as err:
        client.explain(huge, " Lisbon", granularity="token", kappa=0.5)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field == "prompt"
    assert "characters" in err.value.message
    assert [e for e in client.generate(PROMPT, max_tokens=2)][-1].finished  # still serving


def test_a_body_vllm_would_fail_on_is_a_client_error(plain_server):
    """Found by the fuzz test: vLLM 0.32.0 answers 500 to echo with an empty prompt."""
    for prompt in ("", [""]):
        reply = httpx.post(f"http://{plain_server.http}/v1/completions", timeout=60,
                           json={"model": plain_server.model, "prompt": prompt, "echo": True, "max_tokens": 2})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt", reply.text[:300]
    reply = httpx.post(f"http://{plain_server.http}/v1/completions", timeout=60,
                       json={"model": plain_server.model, "prompt": "Otto", "echo": True, "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"].startswith("Otto")
