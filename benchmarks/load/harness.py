"""What the load benchmarks share: the server they start, the calls they time, the loop that drives them.

Used by ``run.py`` (the load test) and ``soak.py`` (the soak benchmark). Not a test; not run in CI.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from atman_vllm.client import AsyncAtmanClient, AtmanError, GenerationDelta

PROMPT = "Otto lives in Lisbon. Mira works as a pilot. Otto owns a cat. Q: What is the job of Mira? A:"
TARGET = " pilot"
GENERATE_TOKENS = 32
SERVER_ARGS = ["--max-model-len", "512", "--enforce-eager", "--dtype", "float32", "--kv-cache-space-gib", "1"]
LOOPBACK_HOSTS = ("127.", "localhost", "[::1]", "::1")
START_TIMEOUT_S = 600
STOP_TIMEOUT_S = 120


@dataclass
class Call:
    kind: str  # what was called: "explain", "generate", "grpc.generate", "http.explain", ...
    status: str  # "OK" or the gRPC status name (HTTP statuses are mapped onto them where they have one)
    latency_s: float  # the whole call
    tokens: int = 0  # generated tokens (generation calls)
    ttft_s: float | None = None  # time to the first generated token (generation calls)
    started_s: float = 0.0  # time.monotonic() at the start
    detail: str = ""  # the error message, or what a cancelled call was doing


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 95, 99)) -> dict[str, float] | None:
    if not values:
        return None
    return {f"p{q:g}_s": round(float(v), 4) for q, v in zip(qs, np.percentile(values, list(qs)))}


def is_loopback(host_port: str) -> bool:
    return host_port.startswith(LOOPBACK_HOSTS)


def is_loopback_url(url: str) -> bool:
    host = urlparse(url).hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


# -- calls -------------------------------------------------------------------------------------------------------

async def explain_call(client: AsyncAtmanClient, prompt: str = PROMPT, target: str = TARGET,
                       kind: str = "explain", **options) -> Call:
    options.setdefault("granularity", "word")
    started_s = time.monotonic()
    started = time.perf_counter()
    status, detail = "OK", ""
    try:
        await client.explain(prompt, target, **options)
    except AtmanError as exc:
        status, detail = exc.code.name, exc.message
    return Call(kind, status, time.perf_counter() - started, started_s=started_s, detail=detail)


async def generate_call(client: AsyncAtmanClient, prompt: str = PROMPT, max_tokens: int = GENERATE_TOKENS,
                        kind: str = "generate", **kwargs) -> Call:
    """A streaming Generate; TTFT is the first delta that carries tokens, latency the whole stream."""
    started_s = time.monotonic()
    started = time.perf_counter()
    tokens, ttft = 0, None
    status, detail = "OK", ""
    try:
        async for event in client.generate(prompt, max_tokens=max_tokens, **kwargs):
            if isinstance(event, GenerationDelta) and event.token_ids:
                if ttft is None:
                    ttft = time.perf_counter() - started
                tokens += len(event.token_ids)
    except AtmanError as exc:
        status, detail = exc.code.name, exc.message
    return Call(kind, status, time.perf_counter() - started, tokens, ttft, started_s, detail)


# -- the loop ----------------------------------------------------------------------------------------------------

async def drive(loops: Sequence[Callable[[int], Awaitable[Call]]], seconds: float, max_requests: int, *,
                drain_s: float = 120.0, backoff_s: float = 0.05,
                calls: list[Call] | None = None) -> tuple[list[Call], float]:
    """Run one worker per entry of ``loops``, each awaiting ``loop(turn)`` (turn = 0, 1, ...) again and again,
    until ``seconds`` have passed or ``max_requests`` calls (all workers together) were started.

    A worker backs off ``backoff_s`` after RESOURCE_EXHAUSTED (what a polite client does on back-pressure).
    Calls still running ``drain_s`` after the end are cancelled, so the phase always ends.
    Returns the calls (appended to ``calls`` as they end, if given) and the phase's wall time.
    """
    calls = [] if calls is None else calls
    stop_at = time.monotonic() + seconds
    budget = [max_requests]

    async def worker(loop: Callable[[int], Awaitable[Call]]) -> None:
        turn = 0
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            call = await loop(turn)
            turn += 1
            calls.append(call)
            if call.status == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(backoff_s)

    started = time.monotonic()
    tasks = [asyncio.create_task(worker(loop)) for loop in loops]
    _, pending = await asyncio.wait(tasks, timeout=seconds + drain_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:  # a worker that raised: surface it rather than hide it in the numbers
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return calls, time.monotonic() - started


# -- the server --------------------------------------------------------------------------------------------------

def tiny_model() -> str:
    from atman_vllm.models.factory import build_tiny_model

    return str(build_tiny_model("llama", Path(tempfile.gettempdir()) / "atman-load-tiny-llama", seed=0))


def start_server(model: str | None, log_path: Path, *, openai: bool = False,
                 extra_args: Sequence[str] = ()) -> tuple[subprocess.Popen, dict]:
    """Start ``atman_server.cli`` on free loopback ports; return the process and its ready line
    (``ready["grpc"]``, with ``openai`` also ``ready["http"]``). vLLM's log goes to ``log_path``."""
    from atman_server.demo import ReadyLine

    if model is None:
        model = tiny_model()
    command = [sys.executable, "-m", "atman_server.cli", "--model", model, "--host", "127.0.0.1",
               "--grpc-port", "0", *SERVER_ARGS]
    if openai:
        command += ["--openai", "--http-port", "0"]
    command += list(extra_args)
    log = open(log_path, "w")
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = ReadyLine(server, sink=log).wait(START_TIMEOUT_S)
    except RuntimeError:
        stop_server(server)
        raise RuntimeError(f"the server did not become ready; its log: {log_path}") from None
    return server, ready


def stop_server(server: subprocess.Popen) -> int | None:
    """SIGTERM, then wait; SIGKILL if it does not exit in time. Returns the exit status (None: had to kill it)."""
    if server.poll() is not None:
        return server.returncode
    server.send_signal(signal.SIGTERM)
    try:
        return server.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(30)
        return None
