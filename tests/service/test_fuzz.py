"""Property-based fuzzing of the live server: no body or message can hurt the service.

Thousands of generated requests (wrong types, extremes, NaN/inf, deep nesting,
unicode edge cases, huge strings, hostile ``vllm_xargs``) go to ``/v1/explain``,
``/v1/completions``, ``/v1/chat/completions`` and every gRPC method of the plain
server. Every answer must be a success or a client error whose message names
what is wrong (never a 5xx, INTERNAL or UNKNOWN, never a hang); a client-sent
``vllm_xargs.atman`` is always refused naming that field. Afterwards a known
explain returns the scores it returned before, and the engine's free KV blocks
are back at their idle count.

Cases are derandomized (the same every run, so CI is reproducible); set
``ATMAN_FUZZ_EXAMPLES`` for more per endpoint and ``ATMAN_FUZZ_RANDOM=1`` to
draw new ones.
"""

from __future__ import annotations

import json
import os
import time

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atman_vllm.proto_gen import atman_pb2 as pb
from tolerances import assert_close


EXAMPLES = int(os.environ.get("ATMAN_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("ATMAN_FUZZ_RANDOM"),
                database=None, suppress_health_check=list(HealthCheck), print_blob=True)
CALL_TIMEOUT_S = 60
KNOWN = ("Otto lives in Lisbon. Mira works as a pilot. Q: What is the job of Mira? A:", " pilot")
COUNTS: dict[str, int] = {}

# --- strategies -------------------------------------------------------------------

EDGE_TEXT = ["", " ", "\x00", "\ud800", "\udfff", "\u202e\u2066", "e\u0301", "🙂" * 20, "\n\n\n", "\t",
             "a" * 70_000, "Ben likes to eat burgers and", "Otto.\n\nMira!", "<s>", "</s><|endoftext|>"]
text = st.one_of(st.text(max_size=40), st.sampled_from(EDGE_TEXT))
number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, 1, -1, 0.1, 1e-6, 100.0, 1e300, -0.0, 2**63, 2**64, True, False, None, "0.5", "nan"]))
json_value = st.recursive(st.one_of(number, text), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
choice = lambda *names: st.one_of(st.sampled_from(names), json_value)  # noqa: E731
span = st.one_of(st.lists(st.one_of(st.integers(-3, 80), number), max_size=3), json_value)
explain_options = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "factor": number, "mode": choice("log-additive", "multiplicative"), "kappa": number,
    "granularity": choice("token", "word", "sentence", "paragraph", "custom", "auto", "spans"),
    "delimiter": st.one_of(text, json_value), "spans": st.one_of(st.lists(span, max_size=4), json_value),
    "target_granularity": choice("complete", "token"), "postprocessing": choice("none", "absolute", "square"),
    "normalize": st.one_of(st.booleans(), json_value), "factr": json_value}))
# vllm_xargs carrying an AtMan payload of the client's own: always refused.
hostile_xargs = st.fixed_dictionaries({"atman": json_value}, optional={"other": json_value})
xargs = st.one_of(hostile_xargs, json_value, st.just({"atman": json.dumps({"bias": {"positions": [1], "factors": [1e300],
                                                                                    "mode": "multiplicative"}})}))
control = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "start": st.one_of(st.integers(-2, 60), number), "length": st.one_of(st.integers(-2, 60), number),
    "factor": number, "message": st.one_of(st.integers(-2, 3), json_value)}))
control_fields = {"controls": st.one_of(st.lists(control, max_size=3), json_value),
                  "control_mode": choice("log-additive", "multiplicative"), "control_kappa": number,
                  "control_overlap": choice("partial", "complete"), "vllm_xargs": xargs}
small_tokens = st.one_of(st.integers(-1, 4), st.sampled_from([2**31, 10**6, 0]), json_value)


def _model(server):
    return st.one_of(st.just(server.model), json_value)


def explain_bodies(server):
    return st.one_of(json_value, st.fixed_dictionaries({}, optional={
        "prompt": st.one_of(text, json_value), "target": st.one_of(text, json_value), "options": explain_options,
        "model": _model(server), "vllm_xargs": xargs, "temperature": json_value}))


def completion_bodies(server):
    return st.fixed_dictionaries({"model": _model(server)}, optional={
        "prompt": st.one_of(text, st.lists(text, max_size=2), json_value), "max_tokens": small_tokens,
        "temperature": number, "stream": st.one_of(st.booleans(), json_value), "logprobs": small_tokens,
        "echo": st.booleans(), **control_fields})


def chat_bodies(server):
    message = st.fixed_dictionaries({"role": choice("user", "assistant", "system"),
                                     "content": st.one_of(text, json_value)})
    return st.fixed_dictionaries({"model": _model(server)}, optional={
        "messages": st.one_of(st.lists(message, max_size=3), json_value), "max_tokens": small_tokens,
        "stream": st.booleans(), "temperature": number, **control_fields})


# --- checking one answer ---------------------------------------------------------------


def _has_reserved_payload(body) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("vllm_xargs"), dict):
        return False
    return "atman" in body["vllm_xargs"]


def _post(http: httpx.Client, path: str, body, raw: bytes | None = None) -> None:
    content = raw if raw is not None else json.dumps(body).encode("utf-8", errors="surrogatepass")
    reply = http.post(path, content=content, headers={"content-type": "application/json"})
    COUNTS[path] = COUNTS.get(path, 0) + 1
    assert reply.status_code < 500, f"{path}: {reply.status_code} {reply.text[:500]} for {content[:300]!r}"
    if reply.status_code >= 400:
        data = reply.json()
        error = data.get("error", data)  # vLLM's and ours: {"error": {...}}; FastAPI's own: {"detail": ...}
        message = (error.get("message") or error.get("detail")) if isinstance(error, dict) else None
        assert message, f"{path}: {reply.status_code} without a message: {reply.text[:300]}"
        if path == "/v1/explain":
            assert error.get("param") and message.startswith(f"{error['param']}: "), reply.text[:300]
    if _has_reserved_payload(body):
        assert reply.status_code == 400, f"{path} accepted a client vllm_xargs.atman: {reply.text[:300]}"
        assert reply.json()["error"]["param"] == "vllm_xargs.atman"


CLIENT_ERRORS = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.RESOURCE_EXHAUSTED)


def _call(channel: grpc.Channel, method: str, request: bytes, streaming: bool) -> None:
    path = f"/atman.v1.Atman/{method}"
    COUNTS[path] = COUNTS.get(path, 0) + 1
    try:
        if streaming:
            for _ in channel.unary_stream(path)(request, timeout=CALL_TIMEOUT_S):
                pass
        else:
            channel.unary_unary(path)(request, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, f"{method}: {exc.code()} {exc.details()} for {request[:200]!r}"
        assert exc.details(), f"{method}: {exc.code()} without a message"


# --- the test ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idle_baseline(plain_server, client):
    """The known explain's scores and the free KV blocks at idle, before any fuzzing."""
    result = client.explain(*KNOWN, granularity="word")
    return result, client.server_info().free_kv_blocks


@pytest.fixture(scope="module")
def http(plain_server):
    with httpx.Client(base_url=f"http://{plain_server.http}", timeout=CALL_TIMEOUT_S) as c:
        yield c


@pytest.fixture(scope="module")
def channel(plain_server):
    with grpc.insecure_channel(plain_server.grpc) as c:
        yield c


ROUTES = {"/v1/explain": explain_bodies, "/v1/completions": completion_bodies, "/v1/chat/completions": chat_bodies}
# Bodies no strategy draws: deep nesting, truncation, bytes that are not UTF-8, a NaN token, 3 MB.
RAW_BODIES = (b"[" * 200_000, b'{"prompt":' * 50_000, b"\xff" * 100, b'{"options": {"factor": NaN}}',
              json.dumps({"prompt": "x" * 3_000_000, "target": " y"}).encode())


@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzz_http_route(plain_server, idle_baseline, http, path):
    @FUZZ
    @given(ROUTES[path](plain_server))
    def run(body):
        _post(http, path, body)

    run()
    for raw in RAW_BODIES:
        _post(http, path, None, raw=raw)


proto_text = st.text(max_size=40) | st.sampled_from([e for e in EDGE_TEXT if "\ud800" not in e and "\udfff" not in e])
proto_double = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1e-6, 100.0, 1e300, -1.0])
u32 = st.integers(0, 2**32 - 1) | st.integers(0, 80)
grpc_options = st.builds(
    pb.ExplainOptions, factor=proto_double, mode=proto_text | st.sampled_from(["log-additive", "multiplicative"]),
    kappa=proto_double, granularity=proto_text | st.sampled_from(["token", "word", "sentence", "spans", "custom"]),
    delimiter=proto_text, spans=st.lists(st.builds(pb.Span, start=u32, length=u32), max_size=3),
    target_granularity=proto_text | st.just("token"), postprocessing=proto_text | st.just("square"),
    normalize=st.booleans())


def grpc_requests(server):
    model = st.just("") | st.just(server.model) | proto_text
    explain = st.builds(pb.ExplainRequest, prompt=proto_text, target=proto_text, options=grpc_options, model=model)
    generate = st.builds(
        pb.GenerateRequest, prompt=proto_text, max_tokens=st.integers(0, 4) | st.sampled_from([2**32 - 1, 5000]),
        temperature=proto_double, seed=st.integers(0, 2**64 - 1),
        controls=st.lists(st.builds(pb.Control, start=u32, length=u32, factor=proto_double), max_size=3),
        control_mode=proto_text, control_kappa=proto_double, control_overlap=proto_text, explain=st.booleans(),
        explain_options=grpc_options, model=model)
    tokenize = st.builds(pb.TokenizeRequest, text=proto_text, model=model)
    garbage = st.binary(max_size=200)
    return st.one_of(
        st.tuples(st.just("Explain"), explain.map(pb.ExplainRequest.SerializeToString) | garbage, st.just(False)),
        st.tuples(st.just("ExplainStream"), explain.map(pb.ExplainRequest.SerializeToString) | garbage,
                  st.just(True)),
        st.tuples(st.just("Generate"), generate.map(pb.GenerateRequest.SerializeToString) | garbage, st.just(True)),
        st.tuples(st.just("Tokenize"), tokenize.map(pb.TokenizeRequest.SerializeToString) | garbage, st.just(False)),
        st.tuples(st.just("ServerInfo"), garbage, st.just(False)),
    )


def test_fuzz_grpc_methods(plain_server, idle_baseline, channel):
    @settings(FUZZ, max_examples=2 * EXAMPLES)
    @given(grpc_requests(plain_server))
    def run(case):
        _call(channel, *case)

    run()


def test_after_fuzzing_results_and_kv_blocks_are_as_before(client, idle_baseline):
    before, idle_free = idle_baseline
    after = client.explain(*KNOWN, granularity="word")
    scale = abs(before.target_tokens[0].logprob) + max(abs(s.score) for s in before.explanations[0].prompt_scores)
    assert_close([s.score for s in after.explanations[0].prompt_scores],
                 [s.score for s in before.explanations[0].prompt_scores], "float32", scale=scale)
    deadline = time.monotonic() + 30  # aborted streams give their blocks back within a step or two
    while client.server_info().free_kv_blocks != idle_free and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.server_info().free_kv_blocks == idle_free
    total = sum(COUNTS.values())
    print(f"fuzz cases: {total} ({', '.join(f'{k} {v}' for k, v in sorted(COUNTS.items()))})")
    assert total >= 5 * EXAMPLES
