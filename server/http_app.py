"""The HTTP transport (``--openai``): vLLM's OpenAI-compatible app on our engine,
plus ``POST /v1/explain`` with the JSON contract.

vLLM builds the app (completions, chat completions, models, tokenize,
/metrics, /health) from its own serve arguments; we parse those with vLLM's
own parser so every default is vLLM's, and hand it the engine the gRPC side
uses. Its bearer-token middleware guards every ``/v1`` path, ours included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from atman_vllm.core.options import ExplainOptions

from .errors import invalid, service_error_from
from .service import AtmanService

EXPLAIN_BODY_FIELDS = ("model", "prompt", "target", "options")


def parse_explain_body(body: bytes) -> tuple[str | None, str, str, ExplainOptions]:
    """(model, prompt, target, options) of a /v1/explain body; errors name the field.

    Bytes that are not UTF-8 become lone surrogates (``surrogateescape``), so
    the text check names the string field they are in, exactly as for a JSON
    ``"\\ud800"`` escape.
    """
    try:
        data = json.loads(body.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as exc:
        raise invalid("body", f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object with prompt, target and options")
    unknown = sorted(set(data) - set(EXPLAIN_BODY_FIELDS))
    if unknown:
        raise invalid(unknown[0], f"unknown field; expected some of {', '.join(EXPLAIN_BODY_FIELDS)}")
    for name in ("prompt", "target"):
        if name not in data:
            raise invalid(name, "is required")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise invalid("options", "must be a JSON object")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", "must be a string")
    return model, data["prompt"], data["target"], ExplainOptions.from_dict(options)


def _error_response(exc: Exception) -> JSONResponse:
    error = service_error_from(exc)
    return JSONResponse(error.to_http_body(), status_code=error.code.http_status)


def add_explain_route(app: FastAPI, service: AtmanService) -> None:
    from vllm.entrypoints.serve.utils.api_utils import with_cancellation

    @with_cancellation  # a client that disconnects cancels the explain, which aborts its forks
    async def explain_after_body(body: bytes, raw_request: Request) -> JSONResponse:
        def parse():
            model, prompt, target, options = parse_explain_body(body)
            return service.explain_request(prompt, target, options, model)

        try:
            result = await service.explain(parse, transport="http")
        except Exception as exc:
            return _error_response(exc)
        return JSONResponse(result.to_dict())

    async def explain(raw_request: Request) -> JSONResponse:
        # The body is read before listening for a disconnect (with_cancellation
        # consumes the request's messages), and never beyond the message limit.
        body = bytearray()
        async for chunk in raw_request.stream():
            body += chunk
            if len(body) > service.limits.max_message_bytes:
                return _error_response(invalid("body", f"is larger than {service.limits.max_message_bytes} bytes "
                                                       "(--max-message-bytes)"))
        return await explain_after_body(bytes(body), raw_request=raw_request)

    app.add_api_route("/v1/explain", explain, methods=["POST"],
                      summary="AtMan explanation of a target after a prompt (the JSON contract)")


async def build_openai_app(llm, service: AtmanService, *, auth_token: str | None,
                           chat_template: str | None) -> FastAPI:
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = ["--model", llm.vllm_config.model_config.model, "--served-model-name", llm.model_name]
    if chat_template:
        argv += ["--chat-template", chat_template]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    args.api_key = [auth_token] if auth_token else None
    supported_tasks = await llm.engine.get_supported_tasks()
    app = build_app(args, supported_tasks, llm.engine.model_config)
    await init_app_state(llm.engine, app.state, args, supported_tasks)
    add_explain_route(app, service)
    return app


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn inside our event loop: the process's signals are ours, not its."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class HttpServer:
    app: FastAPI
    host: str
    port: int
    tls: tuple[str, str] | None = None  # (cert file, key file)

    def __post_init__(self):
        # Bound here, not by uvicorn, so port 0 works and the real port is known at once.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((self.host, self.port))
        except OSError as exc:
            self.socket.close()
            raise OSError(exc.errno, f"cannot bind HTTP to {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = self.socket.getsockname()[1]
        cert, key = self.tls if self.tls else (None, None)
        self._config = uvicorn.Config(self.app, log_level="warning", ssl_certfile=cert, ssl_keyfile=key,
                                      lifespan="on")
        self._server = _EmbeddedUvicorn(self._config)
        self._task = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self.socket]))
        while not self._server.started:
            if self._task.done():  # failed at start-up: surface its exception
                self._task.result()
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.05)

    async def stop(self, grace_s: float) -> None:
        """Refuse new connections; give running requests ``grace_s``; cancel the rest."""
        self._config.timeout_graceful_shutdown = grace_s
        self._server.should_exit = True
        if self._task is not None:
            await self._task
