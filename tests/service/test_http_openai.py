"""``--openai`` mode: vLLM's OpenAI-compatible API on the same engine, our
``POST /v1/explain`` (the JSON contract) and Prometheus metrics beside vLLM's."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai

from atman_vllm.core import EXPLAIN_RESULT_SCHEMA

PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Q: Where does Otto live? A:"
TARGET = " Lisbon"


def test_openai_completions_chat_and_models(plain_server, client):
    api = openai.OpenAI(base_url=f"http://{plain_server.http}/v1", api_key="unused", timeout=120)
    assert [m.id for m in api.models.list().data] == [plain_server.model]

    completion = api.completions.create(model=plain_server.model, prompt=PROMPT, max_tokens=6, temperature=0)
    text = completion.choices[0].text
    assert completion.usage.completion_tokens == 6 and text
    grpc_text = [e for e in client.generate(PROMPT, max_tokens=6)][-1].completion_text
    assert text == grpc_text  # one engine, one greedy answer on both transports

    chat = api.chat.completions.create(model=plain_server.model, max_tokens=5, temperature=0,
                                       messages=[{"role": "user", "content": "Where does Otto live?"}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 5 and chat.choices[0].message.content

    try:
        api.completions.create(model="gpt-17", prompt=PROMPT, max_tokens=2)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as exc:
        assert "gpt-17" in str(exc)


def test_http_explain_matches_the_json_schema(plain_server):
    reply = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=120, json={
        "model": plain_server.model, "prompt": PROMPT, "target": TARGET,
        "options": {"granularity": "sentence", "kappa": 0.6, "normalize": True}})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    jsonschema.validate(body, EXPLAIN_RESULT_SCHEMA)
    assert [s["text"] for s in body["explanations"][0]["prompt_scores"]] == [
        "Otto lives in Lisbon.", "Mira works as a pilot.", "Q: Where does Otto live?", "A:"]
    assert body["options"]["kappa"] == 0.6 and body["options"]["granularity"] == "sentence"
    normalized = [s["score"] for s in body["explanations"][0]["prompt_scores"]]
    assert min(normalized) == 0.0 and max(normalized) == 1.0


def _metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_count_explains_by_status(plain_server, client):
    url = f"http://{plain_server.http}/metrics"
    before = httpx.get(url, timeout=30).text
    client.explain(PROMPT, TARGET, granularity="word")
    httpx.post(f"http://{plain_server.http}/v1/explain", json={"prompt": "", "target": TARGET}, timeout=30)
    after = httpx.get(url, timeout=30).text

    assert "vllm:" in after  # vLLM's own metrics are on the same page
    ok = ("atman_explain_requests_total", dict(transport="grpc", status="OK"))
    bad = ("atman_explain_requests_total", dict(transport="http", status="INVALID_ARGUMENT"))
    assert _metric(after, ok[0], **ok[1]) == _metric(before, ok[0], **ok[1]) + 1
    assert _metric(after, bad[0], **bad[1]) == _metric(before, bad[0], **bad[1]) + 1
    for grown in ("atman_explain_forks_total", "atman_explain_computed_tokens_total"):
        assert _metric(after, grown) > _metric(before, grown)
    assert "atman_explain_cached_tokens_total" in after
    latencies = "atman_explain_latency_seconds_count"
    assert _metric(after, latencies) == _metric(before, latencies) + 1  # successful explains only
    assert _metric(after, "atman_explains_in_flight") == 0

    log = plain_server.request_log()
    assert log and all('"prompt"' not in line for line in log)  # prompts are never logged by default


def test_http_explain_stream_reports_progress_then_the_same_result(plain_server):
    body = {"prompt": PROMPT, "target": TARGET, "options": {"granularity": "word"}}
    with httpx.Client(base_url=f"http://{plain_server.http}", timeout=120) as http:
        plain = http.post("/v1/explain", json=body).json()
        with http.stream("POST", "/v1/explain/stream", json=body) as reply:
            assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/x-ndjson")
            lines = [json.loads(line) for line in reply.iter_lines() if line]
        progress = [line["progress"] for line in lines[:-1]]
        assert progress and all(p["total_forks"] == plain["stats"]["forward_passes"] for p in progress)
        assert [p["done_forks"] for p in progress] == sorted(p["done_forks"] for p in progress)
        result = lines[-1]["result"]
        jsonschema.validate(result, EXPLAIN_RESULT_SCHEMA)
        assert [s["text"] for s in result["explanations"][0]["prompt_scores"]] == \
            [s["text"] for s in plain["explanations"][0]["prompt_scores"]]
        bad = http.post("/v1/explain/stream", json={**body, "options": {"factor": True}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "factor"
