"""gRPC Explain, ExplainStream, Generate(explain), Tokenize, ServerInfo, health and
reflection on a real server; every transport gives the same scores, and those
match the Hugging Face reference implementation of AtMan."""

from __future__ import annotations

import grpc
import httpx
import numpy as np
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from atman_vllm.client import ExplainProgress, GenerationDelta
from atman_vllm.core import ExplainOptions, ExplainResult

from .conftest import MAX_CONCURRENT_EXPLAINS, MAX_EXPLAIN_TOKENS, MAX_UNITS

PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Otto owns a cat. Q: What is the job of Mira? A:"
TARGET = " pilot"


def scored_spans(result: ExplainResult) -> list[tuple]:
    return [(i, where, s.start, s.length, s.text) for i, e in enumerate(result.explanations)
            for where, scores in (("prompt", e.prompt_scores), ("target", e.target_scores)) for s in scores]


def scores(result: ExplainResult) -> np.ndarray:
    return np.array([s.score for e in result.explanations for s in (*e.prompt_scores, *e.target_scores)])


def assert_same_explanation(a: ExplainResult, b: ExplainResult, atol: float = 1e-5) -> None:
    assert (a.prompt, a.target, a.options) == (b.prompt, b.target, b.options)
    assert scored_spans(a) == scored_spans(b)
    np.testing.assert_allclose(scores(a), scores(b), atol=atol, rtol=0)
    np.testing.assert_allclose([t.logprob for t in a.target_tokens], [t.logprob for t in b.target_tokens],
                               atol=atol, rtol=0)


def test_health_server_info_tokenize_and_reflection(client, plain_server):
    assert client.health() == "SERVING"
    assert client.health("atman.v1.Atman") == "SERVING"

    info = client.server_info()
    assert info.model == plain_server.model
    assert info.limits["max_model_len"] == 512
    assert info.limits["max_explain_tokens"] == MAX_EXPLAIN_TOKENS
    assert info.limits["max_units"] == MAX_UNITS
    assert info.limits["max_concurrent_explains"] == MAX_CONCURRENT_EXPLAINS
    assert info.versions["api"] == "atman.v1" and info.versions["vllm"] == "0.32.0"
    assert info.kv_block_size == 32 and info.free_kv_blocks > 0

    tokens = client.tokenize(PROMPT)
    assert len(tokens) > 10
    assert all(t.text == PROMPT[t.start:t.start + t.length] for t in tokens)
    assert all(a.start + a.length <= b.start for a, b in zip(tokens, tokens[1:]))

    with grpc.insecure_channel(plain_server.grpc) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"atman.v1.Atman", "grpc.health.v1.Health"} <= names


def test_explain_stream_and_http_give_the_same_scores(client, plain_server):
    unary = client.explain(PROMPT, TARGET, granularity="word")
    assert [s.text for s in unary.explanations[0].prompt_scores][:4] == ["Otto", "lives", "in", "Lisbon."]
    assert unary.stats.forward_passes == len(unary.explanations[0].prompt_scores) + 1

    events = list(client.explain_stream(PROMPT, TARGET, granularity="word"))
    *progress, streamed = events
    assert isinstance(streamed, ExplainResult)
    assert all(isinstance(p, ExplainProgress) for p in progress)
    assert [p.done_forks for p in progress] == list(range(1, unary.stats.forward_passes + 1))
    assert {p.total_forks for p in progress} == {unary.stats.forward_passes}

    reply = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=120,
                       json={"prompt": PROMPT, "target": TARGET, "options": {"granularity": "word"}})
    assert reply.status_code == 200, reply.text
    over_http = ExplainResult.from_dict(reply.json())

    assert_same_explanation(unary, streamed)
    assert_same_explanation(unary, over_http)


def test_hierarchical_search_over_grpc_and_http(client, plain_server):
    doc = PROMPT.replace(" Mira works", "\n\nMira works").replace(" Q:", "\n\nQ:")
    options = {"granularity": "token", "search": "hierarchical", "budget": 12}
    over_grpc = client.explain(doc, TARGET, **options)
    events = list(client.explain_stream(doc, TARGET, **options))
    reply = httpx.post(f"http://{plain_server.http}/v1/explain", timeout=120,
                       json={"prompt": doc, "target": TARGET, "options": options})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["options"]["search"] == "hierarchical" and body["options"]["budget"] == 12
    over_http = ExplainResult.from_dict(body)
    scored = over_grpc.explanations[0].prompt_scores
    assert over_grpc.stats.forward_passes <= 12 and len(scored) > 12  # fewer passes than units
    assert {s.refined for s in scored} == {True, False}
    assert {s.inherited_from for s in scored if not s.refined} <= {"sentence", "paragraph"}
    assert [(s.refined, s.inherited_from) for s in scored] == \
        [(s.refined, s.inherited_from) for s in over_http.explanations[0].prompt_scores]
    assert_same_explanation(over_grpc, over_http)
    *progress, streamed = events
    assert_same_explanation(over_grpc, streamed)
    # Progress counts every pass of every round, once each.
    assert [p.done_forks for p in progress] == list(range(1, over_grpc.stats.forward_passes + 1))
    assert progress[-1].total_forks == over_grpc.stats.forward_passes


def test_generate_explains_its_own_completion(client):
    events = list(client.generate(PROMPT, max_tokens=4, explain=True,
                                  explain_options={"granularity": "word", "target_granularity": "token"}))
    deltas = [e for e in events if isinstance(e, GenerationDelta)]
    progress = [e for e in events if isinstance(e, ExplainProgress)]
    explained = events[-1]
    assert isinstance(explained, ExplainResult)
    assert events[:len(deltas)] == deltas  # tokens first, then the explanation
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"
    assert not any(d.finished for d in deltas[:-1])
    completion = deltas[-1].completion_text
    assert completion == "".join(d.text for d in deltas) and sum(len(d.token_ids) for d in deltas) == 4
    assert progress and progress[-1].done_forks == progress[-1].total_forks == explained.stats.forward_passes

    assert explained.target == completion
    assert len(explained.explanations) == len(explained.target_tokens)  # one per target token
    plain_generation = [e for e in client.generate(PROMPT, max_tokens=4) if isinstance(e, GenerationDelta)]
    assert plain_generation[-1].completion_text == completion  # greedy: the same text without explain
    # The generated ids themselves are scored, one target token per generated token, not a
    # re-tokenization of the completion's text (which can merge or split them differently).
    # (A delta may carry several tokens when the stream falls behind the engine.)
    generated = [tid for d in deltas for tid in d.token_ids]
    assert len(explained.target_tokens) == len(generated) == 4
    # Each target token is a span of the completion, in order.
    assert all(completion[t.start:t.start + t.length] == t.text for t in explained.target_tokens)
    assert [t.start for t in explained.target_tokens] == sorted(t.start for t in explained.target_tokens)
    retokenized = [t.id for t in client.tokenize(PROMPT + completion)][-len(generated):]
    if retokenized == generated:  # the same ids: explaining the text gives the same scores
        assert_same_explanation(explained,
                                client.explain(PROMPT, completion, granularity="word", target_granularity="token"))


def test_scores_match_the_reference_implementation(client, service_model):
    from atman_vllm.reference.explainer import ReferenceExplainer

    options = ExplainOptions(granularity="word", kappa=0.7, postprocessing="absolute")
    served = client.explain(PROMPT, TARGET, options=options)
    reference = ReferenceExplainer(service_model).explain(PROMPT, TARGET, options)
    assert scored_spans(served) == scored_spans(reference)
    np.testing.assert_allclose(scores(served), scores(reference), atol=1e-4, rtol=0)
