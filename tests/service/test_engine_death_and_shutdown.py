"""When the engine dies the process says so and exits for its supervisor; SIGTERM always ends it.

Two servers of their own (each test ends its server), launched together when
the first test here needs either:

- ``doomed``: its engine-core process is killed in the middle of an explain.
  Health must turn NOT_SERVING, the running call must end with UNAVAILABLE,
  no call may hang, and the process must exit non-zero within 10 s.
- ``long_context``: a tiny model with a 16k context and limits large enough
  that planning one token-level explanation with correlated suppression
  takes minutes. SIGTERM during that plan must end the process within the
  grace period + 5 s, by cancelling the plan (exit status 0), not by waiting.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atman_vllm.client import AtmanClient, AtmanError

from .conftest import START_TIMEOUT_S, Server, _launch, kill_tree

ENGINE_DIED_EXIT_STATUS = 3  # server/runner.py
SELF_TEST_FAILED_EXIT_STATUS = 4
GRACE_S = 2.0
REPEATED_TEXT = "Otto lives in Lisbon. Mira works as a pilot. " * 40


@pytest.fixture(scope="module")
def _own_servers(service_model, tmp_path_factory):
    from atman_vllm.models.factory import build_tiny_model

    folder = tmp_path_factory.mktemp("own_servers")
    long_model = build_tiny_model("llama", folder / "llama16k", seed=0, max_position=16384)
    servers = {
        "doomed": _launch(service_model, folder / "doomed.log"),
        "long_context": _launch(long_model, folder / "long.log", "--max-model-len", "16384",
                                "--max-explain-tokens", "16000", "--max-units", "16000",
                                "--grace-period", str(GRACE_S)),
    }
    yield servers
    for server in servers.values():
        if server.process.poll() is None:
            kill_tree(server.process)


def _health(address: str) -> str:
    """SERVING / NOT_SERVING, or GONE when nothing answers."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "GONE"


def assert_no_survivors(processes: list[psutil.Process]) -> None:
    """vLLM's engine and worker processes must end with the server, not outlive it."""
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert not alive, f"outlived the server: {[(p.pid, p.name()) for p in alive]}"


def _engine_core(server: Server) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError("no engine-core process under the server")


def test_engine_death_turns_health_off_ends_calls_and_exits_nonzero(_own_servers):
    server = _own_servers["doomed"].wait_ready()
    core = _engine_core(server)
    descendants = psutil.Process(server.process.pid).children(recursive=True)
    prompt = REPEATED_TEXT[:420]  # about 200 tokens: 200 forks (token units), seconds of work
    events, outcome = [], {}

    def explain() -> None:
        try:
            with AtmanClient(server.grpc, timeout=120) as caller:
                for event in caller.explain_stream(prompt, " pilot", granularity="token"):
                    events.append(event)
            outcome["ok"] = True
        except AtmanError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=explain, daemon=True)
    caller.start()
    deadline = time.monotonic() + 120
    while len(events) < 3 and time.monotonic() < deadline:  # forks are running
        time.sleep(0.02)
    assert len(events) >= 3, f"the explain never got going: {outcome}"
    core.kill()
    killed = time.monotonic()

    seen, http_statuses = set(), set()
    while server.process.poll() is None and time.monotonic() < killed + 15:
        seen.add(_health(server.grpc))
        try:
            http_statuses.add(httpx.get(f"http://{server.http}/health", timeout=2).status_code)
        except httpx.TransportError:
            http_statuses.add("GONE")
        time.sleep(0.05)
    exited_after = time.monotonic() - killed
    assert server.process.poll() == ENGINE_DIED_EXIT_STATUS, server.log_tail()
    assert exited_after <= 10.0, f"exited {exited_after:.1f} s after the engine died"
    assert "NOT_SERVING" in seen, f"health never said NOT_SERVING ({seen})"
    assert not {s for s in http_statuses if isinstance(s, int) and (s == 500 or s > 503)}, http_statuses
    caller.join(10)
    assert not caller.is_alive(), "the running explain hung after the engine died"
    assert "error" in outcome and outcome["error"].code == grpc.StatusCode.UNAVAILABLE, outcome
    assert "engine" in outcome["error"].message
    assert "the engine has stopped" in server.log_tail(80)
    assert_no_survivors(descendants)
    print(f"engine killed after {len(events)} progress events; exit status {server.process.returncode} "
          f"{exited_after:.2f} s later; gRPC health seen: {sorted(seen)}; HTTP /health: {sorted(map(str, http_statuses))}")


def test_sigterm_during_a_long_plan_exits_within_the_grace_period(_own_servers):
    server = _own_servers["long_context"].wait_ready()
    descendants = psutil.Process(server.process.pid).children(recursive=True)
    with AtmanClient(server.grpc, timeout=60) as client:
        tokens = client.tokenize(REPEATED_TEXT * 30)
        prompt = (REPEATED_TEXT * 30)[:tokens[12_000].start]
    outcome = {}

    def explain() -> None:
        try:
            with AtmanClient(server.grpc, timeout=600) as caller:
                caller.explain(prompt, " pilot", granularity="token", kappa=0.5)
            outcome["ok"] = True
        except AtmanError as exc:
            outcome["error"] = exc

    caller = threading.Thread(target=explain, daemon=True)
    caller.start()
    time.sleep(4.0)  # tokenized and segmented in well under a second; now in correlated suppression
    assert caller.is_alive() and not outcome, f"the plan was not running: {outcome}"
    server.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    status = server.process.wait(GRACE_S + 5.0 + 30)  # measured below, not trusted to the timeout
    elapsed = time.monotonic() - sent
    assert elapsed <= GRACE_S + 5.0, f"exited {elapsed:.1f} s after SIGTERM (grace {GRACE_S} s)"
    assert status == 0, f"exit status {status}: the plan was not cancelled, the process was ended; " \
                        f"{server.log_tail()}"
    assert_no_survivors(descendants)
    tail = server.log_tail(60)
    # The exit timer may end vLLM's own teardown, never a wait for calls or plans.
    assert "still waiting for running calls" not in tail and "still waiting for plans" not in tail, tail
    caller.join(10)
    assert not caller.is_alive() and "error" in outcome, outcome
    assert outcome["error"].code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), outcome
    log = server.request_log()
    assert log and '"status": "CANCELLED"' in log[-1], log[-3:]
    print(f"SIGTERM during planning: exit status {status} after {elapsed:.2f} s (grace {GRACE_S} s)")


@pytest.mark.parametrize("seam", ["backend", "block_hash"])
def test_the_server_refuses_to_start_when_a_seam_is_missing(service_model, tmp_path, seam, monkeypatch):
    """As after a vLLM upgrade that moved something the plugin patches: the self-test catches it."""
    monkeypatch.setenv("ATMAN_VLLM_DISABLE_SEAMS", seam)
    server = _launch(service_model, tmp_path / "refused.log")
    try:
        status = server.process.wait(START_TIMEOUT_S)
    finally:
        if server.process.poll() is None:
            kill_tree(server.process)
    log = server.log_tail(80)
    assert status == SELF_TEST_FAILED_EXIT_STATUS, log
    assert "refusing to serve" in log and "self-test:" in log
    assert '{"event": "ready"' not in log  # no port was ever announced


def test_a_server_with_every_seam_logs_a_passing_self_test(plain_server):
    assert "self-test passed" in plain_server.log_tail(400) or \
        "self-test passed" in plain_server.log_path.read_text(errors="replace")
