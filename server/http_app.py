"""The HTTP transport (``--openai``): vLLM's OpenAI-compatible app on our engine,
plus ``POST /v1/explain`` with the JSON contract.

vLLM builds the app (completions, chat completions, models, tokenize,
/metrics, /health) from its own serve arguments; we parse those with vLLM's
own parser so every default is vLLM's, and hand it the engine the gRPC side
uses. Its bearer-token middleware guards every ``/v1`` path, ours included.
``http_guard.RequestGuard`` sits in front of every route (body size, the
reserved ``vllm_xargs.atman``, inline images only, the controls of ``http_controls``);
``http_server`` runs it all on uvicorn inside our event loop.
"""

from __future__ import annotations

import base64
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.middleware import Middleware

from .http_chat_explain import ChatExplain
from .http_bodies import ExplainBody, decode_images, explain_request_schema, parse_explain_body
from .http_controls import CHAT_COMPLETIONS_PATH, COMPLETIONS_PATH, ControlPlanner
from .http_guard import RequestGuard, error_response
from .http_ui import add_ui_routes
from .errors import invalid, service_error_from
from atman_vllm.core.events import ExplainProgress

from .service import AtmanService

EXPLAIN_PATH = "/v1/explain"
EXPLAIN_STREAM_PATH = "/v1/explain/stream"


def add_explain_route(app: FastAPI, service: AtmanService) -> None:
    from vllm.entrypoints.serve.utils.api_utils import with_cancellation

    def parser(body: bytes, parsed: list | None = None):
        def parse():
            b = parse_explain_body(body)
            images = decode_images(b.images, service.limits.max_images)
            request = service.explain_request(b.prompt, b.target, b.options, b.model, b.messages, images=images)
            if b.heatmap and not request.images:
                raise invalid("heatmap", "draws the relevance of image tiles; give images")
            if parsed is not None:
                parsed.append((b, request))
            return request

        return parse

    @with_cancellation  # a client that disconnects cancels the explain, which aborts its forks
    async def explain_after_body(body: bytes, raw_request: Request) -> JSONResponse:
        parsed: list = []
        try:
            result = await service.explain(parser(body, parsed), transport="http")
            reply = result.to_dict()
            (b, request), = parsed
            if b.heatmap:  # drawn over the images as given (the result keeps only their size and digest)
                from atman_vllm.view import heatmap_png

                png = heatmap_png(result, [im.data for im in request.images])
                reply["heatmap"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        except Exception as exc:
            return error_response(exc)
        return JSONResponse(reply)

    async def explain(raw_request: Request) -> JSONResponse:
        # Read before listening for a disconnect (with_cancellation consumes the
        # request's messages); RequestGuard has bounded its size already.
        return await explain_after_body(await raw_request.body(), raw_request=raw_request)

    async def explain_stream(raw_request: Request):
        return await stream_after_body(await raw_request.body(), raw_request=raw_request)

    @with_cancellation  # a disconnect before the first event cancels the explain too
    async def stream_after_body(body: bytes, raw_request: Request):
        """NDJSON: ``{"progress": {...}}`` lines as forks finish, then ``{"result": ...}``.

        A request that fails before its first event gets the ordinary error
        reply (400, 429, ...); a failure later is an ``{"error": ...}`` line,
        the status being sent already. A client that disconnects cancels the
        stream, which aborts every fork (Starlette cancels the body iterator).
        """
        events = service.explain_events(parser(body), transport="http-stream")
        try:
            first = await anext(events)
        except StopAsyncIteration:  # pragma: no cover - a stream always ends with its result
            return error_response(RuntimeError("the explain stream ended without a result"))
        except Exception as exc:
            return error_response(exc)

        async def lines():
            try:
                event = first
                while True:
                    yield json.dumps(_stream_event(event)) + "\n"
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except Exception as exc:
                yield json.dumps(service_error_from(exc).to_http_body()) + "\n"
            finally:
                await events.aclose()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def schema() -> JSONResponse:
        return JSONResponse(explain_request_schema())

    app.add_api_route(EXPLAIN_PATH, explain, methods=["POST"],
                      summary="AtMan explanation of a target after a prompt (the JSON contract)",
                      openapi_extra={"requestBody": {"required": True, "content": {
                          "application/json": {"schema": ExplainBody.model_json_schema()}}}})
    app.add_api_route(EXPLAIN_STREAM_PATH, explain_stream, methods=["POST"],
                      summary="The same explanation as NDJSON: progress lines, then the result")
    app.add_api_route(f"{EXPLAIN_PATH}/schema", schema, methods=["GET"],
                      summary="JSON Schema of the POST /v1/explain body")


def _stream_event(event) -> dict:
    if isinstance(event, ExplainProgress):
        return {"progress": {"done_forks": event.done_forks, "total_forks": event.total_forks}}
    return {"result": event.to_dict()}


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
    add_ui_routes(app)  # GET /ui: the explanation page, calling the routes above
    planner = ControlPlanner(llm, app.state.online_renderer, service)
    chat = ChatExplain(llm, service, planner)  # the explain field, then the controls
    # Appended, not add_middleware: innermost, after vLLM's authentication. vLLM's
    # SageMaker bootstrap has already built the middleware stack: build it again.
    app.user_middleware.append(Middleware(
        RequestGuard, max_body_bytes=service.limits.max_message_bytes, max_images=service.limits.max_images,
        rewriters={COMPLETIONS_PATH: planner.rewrite, CHAT_COMPLETIONS_PATH: chat.rewrite}))
    app.middleware_stack = app.build_middleware_stack()
    return app
