"""TLS and the bearer token on both transports; then SIGTERM: running calls
finish within the grace period, new ones are refused, the process exits 0.

The shutdown test stops the shared ``secure`` server, so it stays the last
test of this module and no other module uses that server."""

from __future__ import annotations

import signal
import ssl
import threading
import time

import grpc
import httpx
import pytest

from atman_vllm.client import AtmanClient, AtmanError, ExplainProgress
from atman_vllm.core import ExplainResult

from .conftest import TOKEN

PROMPT = "Mira works as a pilot. Q: What is the job of Mira? A:"
TARGET = " pilot"


def test_grpc_needs_the_token_and_tls(secure_server):
    cert = secure_server.tls_cert
    with AtmanClient(secure_server.grpc, root_certificates=cert, token=TOKEN, timeout=60) as client:
        assert client.explain(PROMPT, TARGET).explanations
        assert client.health() == "SERVING"
    for token in (None, "wrong-token"):
        with AtmanClient(secure_server.grpc, root_certificates=cert, token=token, timeout=60) as client:
            assert client.health() == "SERVING"  # health checks stay open for probes
            with pytest.raises(AtmanError) as err:
                client.explain(PROMPT, TARGET)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(AtmanError) as err:
                list(client.generate(PROMPT, max_tokens=2))
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    with AtmanClient(secure_server.grpc, token=TOKEN, timeout=10) as plaintext:
        with pytest.raises(AtmanError) as err:
            plaintext.server_info()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE  # no TLS handshake, no service


def test_http_needs_the_token_and_tls(secure_server):
    base = f"https://{secure_server.http}"
    body = {"prompt": PROMPT, "target": TARGET}
    with httpx.Client(verify=ssl.create_default_context(cafile=secure_server.tls_cert), timeout=60) as http:
        assert http.post(f"{base}/v1/explain", json=body).status_code == 401
        assert http.post(f"{base}/v1/explain", json=body,
                         headers={"Authorization": "Bearer wrong-token"}).status_code == 401
        assert http.get(f"{base}/v1/models").status_code == 401
        reply = http.post(f"{base}/v1/explain", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert reply.status_code == 200 and reply.json()["target"] == TARGET
        assert http.get(f"{base}/health").status_code == 200
    with pytest.raises(httpx.ConnectError):  # a certificate the client does not trust
        httpx.post(f"{base}/v1/explain", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)


def test_metrics_port_serves_the_service_metrics_over_tls(secure_server):
    context = ssl.create_default_context(cafile=secure_server.tls_cert)
    with AtmanClient(secure_server.grpc, root_certificates=secure_server.tls_cert, token=TOKEN, timeout=60) as client:
        client.explain(PROMPT, TARGET)
    text = httpx.get(f"https://{secure_server.metrics}/metrics", verify=context, timeout=30).text
    ok = [line for line in text.splitlines()
          if line.startswith("atman_explain_requests_total") and 'status="OK"' in line]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1
    assert "atman_explains_in_flight 0.0" in text


def test_sigterm_lets_running_calls_finish_then_exits_0(secure_server):
    client = AtmanClient(secure_server.grpc, root_certificates=secure_server.tls_cert, token=TOKEN, timeout=120)
    repeated = "Otto lives in Lisbon. Mira works as a pilot. " * 40
    slow_prompt = repeated[:client.tokenize(repeated)[250].start]  # within the default --max-units (256)
    stream = client.explain_stream(slow_prompt, TARGET, granularity="token")
    assert isinstance(next(stream), ExplainProgress)  # the call is running on the server

    events: list = []
    reader = threading.Thread(target=lambda: events.extend(stream))
    reader.start()
    secure_server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(AtmanError) as err:  # no new calls once shutting down
        AtmanClient(secure_server.grpc, root_certificates=secure_server.tls_cert, token=TOKEN,
                    timeout=10).explain(PROMPT, TARGET)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE

    reader.join(120)
    assert events and isinstance(events[-1], ExplainResult)  # the running call finished in the grace period
    assert events[-1].stats.perturbations == len(events[-1].explanations[0].prompt_scores)
    assert secure_server.process.wait(120) == 0
    client.close()
