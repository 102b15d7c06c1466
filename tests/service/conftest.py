"""Two real servers (``atman-vllm serve`` subprocesses on loopback), started once.

Engine start costs tens of seconds on a 2-core machine, so both servers are
launched together as soon as the first service test needs either, and every
test shares them:

- ``plain``: gRPC + ``--openai`` HTTP, no TLS, no token; small limits so the
  limit and back-pressure tests can hit them.
- ``secure``: TLS (a self-signed certificate made here) + bearer token on both
  transports, and a separate --metrics-port; the last test of test_security_and_shutdown.py stops it with
  SIGTERM.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from atman_server.demo import ReadyLine

ENGINE_ARGS = ["--max-model-len", "512", "--enforce-eager", "--dtype", "float32", "--kv-cache-space-gib", "1",
               "--block-size", "32"]
# Small enough that tests reach them, large enough for a slow (seconds) explain.
MAX_EXPLAIN_TOKENS = 480
MAX_UNITS = 400
MAX_CONCURRENT_EXPLAINS = 2
TOKEN = "s3cret-test-token"
START_TIMEOUT_S = 420
# A minimal chat template: the tiny test tokenizer has none, and vLLM refuses chat without one.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a server and vLLM's processes under it (they would outlive a killed parent)."""
    import psutil

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for proc in [*children]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    process.kill()
    process.wait()
    psutil.wait_procs(children, timeout=10)


@dataclass
class Server:
    process: subprocess.Popen
    log_path: Path
    ready_line: ReadyLine
    grpc: str = ""
    http: str = ""
    metrics: str = ""
    model: str = ""
    tls_cert: Path | None = None

    def wait_ready(self) -> "Server":
        if not self.grpc:
            try:
                ready = self.ready_line.wait(START_TIMEOUT_S)
            except RuntimeError:
                raise RuntimeError(f"server did not start; log tail:\n{self.log_tail()}") from None
            self.grpc, self.model = ready["grpc"], ready["model"]
            self.http, self.metrics = ready.get("http", ""), ready.get("metrics", "")
        return self

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def request_log(self) -> list[str]:
        """The server's per-explain JSON log lines so far."""
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith('{"event": "explain"')]

    def stop(self, timeout_s: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(self.process)
            raise


def _launch(model_dir: Path, log_path: Path, *extra: str) -> Server:
    command = [sys.executable, "-m", "atman_server.cli", "--model", str(model_dir), *ENGINE_ARGS,
               "--grpc-port", "0", "--openai", "--http-port", "0", *extra]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return Server(process, log_path, ReadyLine(process, sink=log))


def make_self_signed_cert(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def service_model(tmp_path_factory) -> Path:
    from atman_vllm.models.factory import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("service_model") / "llama", seed=0)


@pytest.fixture(scope="session")
def _servers(service_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("servers")
    cert, key = make_self_signed_cert(folder)
    plain = _launch(service_model, folder / "plain.log",
                    "--max-explain-tokens", str(MAX_EXPLAIN_TOKENS), "--max-units", str(MAX_UNITS),
                    "--max-concurrent-explains", str(MAX_CONCURRENT_EXPLAINS), "--chat-template", CHAT_TEMPLATE)
    secure = _launch(service_model, folder / "secure.log", "--tls-cert", str(cert), "--tls-key", str(key),
                     "--auth-token", TOKEN, "--grace-period", "60", "--metrics-port", "0")
    secure.tls_cert = cert
    servers = {"plain": plain, "secure": secure}
    yield servers
    for server in servers.values():
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 120
    for server in servers.values():
        try:
            server.process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            kill_tree(server.process)


@pytest.fixture(scope="session")
def plain_server(_servers) -> Server:
    return _servers["plain"].wait_ready()


@pytest.fixture(scope="session")
def secure_server(_servers) -> Server:
    return _servers["secure"].wait_ready()


@pytest.fixture(scope="session")
def client(plain_server):
    from atman_vllm.client import AtmanClient

    with AtmanClient(plain_server.grpc, timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def vlm_server(tmp_path_factory):
    """A server (gRPC + --openai HTTP) on the shipped shapes VLM, for image requests; started on first use."""
    from atman_vllm.models import resolve_model

    folder = tmp_path_factory.mktemp("vlm_server")
    server = _launch(resolve_model("tiny-shapes-vlm"), folder / "vlm.log").wait_ready()
    yield server
    if server.process.poll() is None:
        server.stop()
