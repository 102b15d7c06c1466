"""One process, one event loop, one engine: gRPC and (optionally) HTTP on it.

Start-up prints one JSON line ``{"event": "ready", ...}`` on stdout with the
bound addresses (ports may be 0 = any free port), which the demo and the
tests wait for. SIGTERM or SIGINT: health goes NOT_SERVING, both servers stop
accepting, running calls get the grace period to finish, the rest are
cancelled (their forks aborted), the engine shuts down, exit status 0.

Before serving, a self-test (``atman_vllm/vllm/self_test.py``) checks that
the plugin's seams are in effect in this engine; if not, the process exits
with status SELF_TEST_FAILED_EXIT_STATUS without opening a port.

The engine dying (its core process killed, or a fatal error inside it) is
watched for: health goes NOT_SERVING at once, running calls end with
UNAVAILABLE / 503, and the process exits with status ENGINE_DIED_EXIT_STATUS
within a few seconds so that a supervisor restarts it. Both exits are backed
by a timer that ends the process (and vLLM's processes with it) even if something refuses to stop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from atman_vllm.api import DEFAULT_EXPLAIN_PRIORITY

from .grpc_service import GrpcServer
from .limits import (
    DEFAULT_FORK_TOKENS_IN_FLIGHT,
    DEFAULT_MAX_CONCURRENT_EXPLAINS,
    DEFAULT_MAX_GENERATE_TOKENS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_UNITS,
    ServiceLimits,
)
from .metrics import ServiceMetrics
from .service import AtmanService, request_log

log = logging.getLogger("atman_server")

ENGINE_CHECK_INTERVAL_S = 0.25
ENGINE_DIED_EXIT_STATUS = 3
ENGINE_DIED_NOT_SERVING_S = 1.0
SELF_TEST_FAILED_EXIT_STATUS = 4
# How long a stopping process may take beyond what it was given (the grace period on
# SIGTERM, nothing when the engine died) before it is ended regardless.
STOP_MARGIN_S = 4.5


@dataclass
class _Stopping:
    """What a stopping process is waiting for, so the timer can tell a clean stop from a stuck one."""

    status: int  # exit status if the timer has to end the process now
    waiting_for: str = "running calls"

    def engine_teardown(self) -> None:
        # Every call has ended and planning has stopped: the service stopped cleanly. If vLLM's
        # own teardown outlasts the budget, the timer ends its processes and exits with 0.
        if self.status == 1:
            self.status = 0
        self.waiting_for = "vLLM's engine teardown"


def _kill_child_processes() -> None:
    """SIGKILL the engine core and its workers: they outlive a parent that exits without them."""
    import psutil  # a vLLM dependency

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=1.0)


def _exit_regardless_after(seconds: float, stopping: _Stopping, why: str) -> None:
    """A daemon timer that ends the process if a clean stop takes longer than ``seconds``.

    A clean stop waits for running calls, for plans to notice they were
    cancelled, and for the engine to shut down; none may keep a supervisor
    waiting.
    """
    def end() -> None:
        log.error("%s: still waiting for %s after %.1f s; ending vLLM's processes and exiting with status %d",
                  why, stopping.waiting_for, seconds, stopping.status)
        _kill_child_processes()
        logging.shutdown()
        os._exit(stopping.status)

    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()


class SelfTestFailed(SystemExit):
    """The plugin's seams are not all in effect in this engine: refuse to serve."""


async def _self_test(llm) -> None:
    started = time.monotonic()
    failures = await llm.self_test()
    if failures:
        for failure in failures:
            log.error("self-test: %s", failure)
        log.error("refusing to serve: explanations or steering would be wrong (docs/vllm_touchpoints.md)")
        raise SelfTestFailed(SELF_TEST_FAILED_EXIT_STATUS)
    log.info("self-test passed in %.2f s: target scoring, biased attention, prefix-cache keys and steered "
             "decoding are in effect", time.monotonic() - started)


async def _watch_engine(llm, engine_died: asyncio.Event, stop: asyncio.Event) -> None:
    while not llm.engine.errored:
        await asyncio.sleep(ENGINE_CHECK_INTERVAL_S)
    engine_died.set()
    stop.set()


@dataclass(frozen=True)
class ServeConfig:
    model: str
    engine_args: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    openai: bool = False
    http_port: int = 8000
    metrics_port: int | None = None
    max_explain_tokens: int | None = None  # None: the engine's max_model_len
    max_units: int = DEFAULT_MAX_UNITS
    max_concurrent_explains: int = DEFAULT_MAX_CONCURRENT_EXPLAINS
    max_generate_tokens: int = DEFAULT_MAX_GENERATE_TOKENS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_prompt_chars: int | None = None  # None: limits.PROMPT_CHARS_PER_TOKEN × max explain tokens
    explain_priority: int = DEFAULT_EXPLAIN_PRIORITY
    fork_tokens_in_flight: int | None = DEFAULT_FORK_TOKENS_IN_FLIGHT
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    grace_s: float = 30.0
    log_prompts: bool = False
    chat_template: str | None = None


def _limits(config: ServeConfig, max_model_len: int) -> ServiceLimits:
    max_tokens = min(config.max_explain_tokens or max_model_len, max_model_len)
    return ServiceLimits(max_explain_tokens=max_tokens, max_units=config.max_units,
                         max_concurrent_explains=config.max_concurrent_explains,
                         max_generate_tokens=config.max_generate_tokens,
                         max_message_bytes=config.max_message_bytes, max_prompt_chars=config.max_prompt_chars)


def _announce(**addresses) -> None:
    print(json.dumps({"event": "ready", **addresses}), flush=True)


async def serve(config: ServeConfig) -> int:
    from atman_vllm.api import AsyncAtmanLLM

    loop = asyncio.get_running_loop()
    stop, engine_died = asyncio.Event(), asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    tls_files = (str(config.tls_cert), str(config.tls_key)) if config.tls_cert else None
    tls_bytes = (config.tls_cert.read_bytes(), config.tls_key.read_bytes()) if config.tls_cert else None

    llm = AsyncAtmanLLM.from_engine_args(config.model, explain_priority=config.explain_priority,
                                         planning_threads=config.max_concurrent_explains,
                                         fork_tokens_in_flight=config.fork_tokens_in_flight or None,
                                         **config.engine_args)
    llm.set_chat_template(config.chat_template)  # explain's messages render as vLLM's chat route does
    grpc_server = http_server = metrics_server = None
    try:
        await _self_test(llm)
    except BaseException:
        llm.shutdown()
        raise
    watchdog = asyncio.create_task(_watch_engine(llm, engine_died, stop))
    stopping: _Stopping | None = None
    try:
        limits = _limits(config, llm.vllm_config.model_config.max_model_len)
        service = AtmanService(llm, limits, metrics=ServiceMetrics(), log_prompts=config.log_prompts)
        grpc_server = GrpcServer(service, host=config.host, port=config.grpc_port,
                                 max_message_bytes=limits.max_message_bytes,
                                 auth_token=config.auth_token, tls=tls_bytes)
        await grpc_server.start()
        addresses = {"grpc": f"{config.host}:{grpc_server.port}", "tls": tls_files is not None,
                     "model": llm.model_name}
        if config.openai:
            from .http_app import build_openai_app
            from .http_server import HttpServer

            app = await build_openai_app(llm, service, auth_token=config.auth_token,
                                         chat_template=config.chat_template)
            http_server = HttpServer(app, config.host, config.http_port, tls=tls_files)
            await http_server.start()
            addresses["http"] = f"{config.host}:{http_server.port}"
        if config.metrics_port is not None:
            from prometheus_client import start_http_server

            cert, key = tls_files or (None, None)
            metrics_server, _ = start_http_server(config.metrics_port, addr=config.host, certfile=cert, keyfile=key)
            addresses["metrics"] = f"{config.host}:{metrics_server.server_port}"
        _announce(**addresses)
        log.info("serving %s", json.dumps(addresses))

        await stop.wait()
        if engine_died.is_set():
            log.error("the engine has stopped (its core process died or failed); running calls end with "
                      "UNAVAILABLE, and the process exits with status %d so that a supervisor restarts it",
                      ENGINE_DIED_EXIT_STATUS)
            stopping = _Stopping(ENGINE_DIED_EXIT_STATUS)
            _exit_regardless_after(STOP_MARGIN_S + ENGINE_DIED_NOT_SERVING_S, stopping, "engine died")
            # Probes see NOT_SERVING (HTTP /health: 503) for a moment before the ports close.
            await grpc_server.health.enter_graceful_shutdown()
            await asyncio.sleep(ENGINE_DIED_NOT_SERVING_S)
            grace_s = 0.0  # nothing can finish without the engine
        else:
            stopping = _Stopping(1)
            _exit_regardless_after(config.grace_s + STOP_MARGIN_S, stopping, "shutdown")
            grace_s = config.grace_s
        log.info("shutting down: %.1f s grace for running calls", grace_s)
        stops = [grpc_server.stop(grace_s)]
        if http_server is not None:
            stops.append(http_server.stop(grace_s))
        await asyncio.gather(*stops)
    finally:
        watchdog.cancel()
        if metrics_server is not None:
            metrics_server.shutdown()
        if stopping is not None:
            stopping.waiting_for = "plans to stop"
        llm.stop_planning()  # their calls were cancelled: each stops at its next check
        if stopping is not None:
            stopping.engine_teardown()
        try:
            llm.shutdown()
        except Exception:  # a dead engine may fail to shut down cleanly; the exit must still happen
            log.exception("engine shutdown failed")
    if engine_died.is_set():
        log.error("stopped: the engine died")
        return ENGINE_DIED_EXIT_STATUS
    log.info("stopped")
    return 0


def _configure_logging() -> None:
    """Our own handlers: vLLM configures the root logger its way before we run."""
    service_handler = logging.StreamHandler(sys.stderr)
    service_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    log.addHandler(service_handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # One bare JSON object per line, so log shippers can parse the request log as is.
    json_handler = logging.StreamHandler(sys.stderr)
    json_handler.setFormatter(logging.Formatter("%(message)s"))
    request_log.addHandler(json_handler)
    request_log.propagate = False


def run(config: ServeConfig) -> int:
    from atman_vllm.vllm.engine_config import UnsupportedEngineSetting
    from atman_vllm.vllm.seams import SeamMismatch

    _configure_logging()
    try:
        return asyncio.run(serve(config))
    except SelfTestFailed as refused:
        return int(refused.code)
    except (UnsupportedEngineSetting, SeamMismatch) as refused:  # before any engine started
        log.error("refusing to start: %s", refused)
        return 2
