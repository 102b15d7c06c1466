"""The HTTP side of the trust boundary: one ASGI middleware in front of every route.

vLLM's OpenAI-compatible routes (completions, chat, responses, tokenize,
anything a later vLLM adds) and ours all sit behind ``RequestGuard``. It

- reads a request body at most ``max_body_bytes`` long (longer: 400, field
  ``body``), so no route reads an unbounded body;
- refuses a client-sent ``vllm_xargs.atman`` on every route with 400 naming
  the field: AtMan payloads are built by this server only. (The engine's
  admission check refuses unsealed payloads too, whatever route or encoding
  they come by; this layer gives the client the 400 before a stream starts);
- refuses the few bodies vLLM itself is known to fail on with a 500;
- takes media in chat messages inline only, within the image limits
  (``chat_media.check_chat_media``): vLLM would fetch an image URL from the
  server's network;
- lets a per-path rewriter change the parsed body before the route sees it
  (the attention controls of completions and chat completions) and, by
  returning ``Rewritten`` with a ``reply_hook``, change the route's JSON reply
  (the explanation beside a chat completion).

It is the innermost middleware, so vLLM's bearer-token check runs before any
of this work. After the body is replayed, the original ``receive`` delivers
the disconnect that cancels a generation or an explain.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from atman_vllm.vllm.wire import EXTRA_ARGS_KEY

from .chat_media import check_chat_media
from .errors import invalid, service_error_from

RESERVED_FIELD = f"vllm_xargs.{EXTRA_ARGS_KEY}"
# Changes a route's successful (200) JSON reply; what it raises becomes the error reply instead.
ReplyHook = Callable[[dict], Awaitable[dict]]


@dataclass(frozen=True)
class Rewritten:
    """What a rewriter returns to change the reply too, not only the body."""

    body: object
    reply_hook: ReplyHook | None = None


# Rewriter: (path, parsed JSON body) -> the body to pass on instead (None: unchanged), or Rewritten.
Rewriter = Callable[[str, object], Awaitable["object | Rewritten | None"]]
_BODYLESS_METHODS = ("GET", "HEAD", "OPTIONS", "DELETE")


class ReplyInstead(Exception):
    """Raised by a rewriter: send this reply (vLLM's own refusal, say) instead of calling the route."""

    def __init__(self, response: JSONResponse):
        super().__init__("reply instead")
        self.response = response


def error_response(exc: Exception) -> JSONResponse:
    error = service_error_from(exc)
    return JSONResponse(error.to_http_body(), status_code=error.code.http_status)


def _parsed_json(body: bytes):
    """The body as JSON, or None when it is not (the route reports that itself)."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def refuse_reserved_fields(data) -> None:
    """400 for a body that carries an AtMan payload of its own in ``vllm_xargs``."""
    if not isinstance(data, dict) or "vllm_xargs" not in data:
        return
    xargs = data["vllm_xargs"]
    if isinstance(xargs, str):  # form-style routes send vllm_xargs as JSON text
        xargs = _parsed_json(xargs.encode("utf-8", errors="surrogatepass"))
    if isinstance(xargs, dict) and EXTRA_ARGS_KEY in xargs:
        raise invalid(RESERVED_FIELD, "is reserved for the server's own requests; steer attention with the "
                                      "`controls` body fields and explain with POST /v1/explain")


COMPLETIONS_PATH = "/v1/completions"


def refuse_known_vllm_failures(path: str, data) -> None:
    """400 for bodies vLLM 0.32.0 accepts and then fails on with a 500 (found by tests/service/test_fuzz.py).

    - /v1/completions with ``echo`` and an empty text prompt: the engine generates after the
      BOS, then building the reply asserts that the prompt text is not None.
    """
    if path != COMPLETIONS_PATH or not isinstance(data, dict) or data.get("echo") is not True:
        return
    prompts = data.get("prompt")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, list) and any(p == "" for p in prompts):
        raise invalid("prompt", "must not be empty when echo is set")


class RequestGuard:
    def __init__(self, app, *, max_body_bytes: int, max_images: int, rewriters: dict[str, Rewriter]):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_images = max_images
        self.rewriters = rewriters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in _BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody left to answer
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await error_response(invalid("body", f"is larger than {self.max_body_bytes} bytes "
                                                     "(--max-message-bytes)"))(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        try:
            body, hook = await self._checked(scope["path"], bytes(body))
        except ReplyInstead as reply:
            await reply.response(scope, receive, send)
            return
        except Exception as exc:
            await error_response(exc)(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replay = _replaying(body, receive)
        await self.app(scope, replay, send if hook is None else _hooked(hook, scope, replay, send))

    async def _checked(self, path: str, body: bytes) -> tuple[bytes, ReplyHook | None]:
        data = _parsed_json(body)
        refuse_reserved_fields(data)
        refuse_known_vllm_failures(path, data)
        await check_chat_media(data, self.max_images)
        rewriter = self.rewriters.get(path)
        if rewriter is None or data is None:
            return body, None
        rewritten = await rewriter(path, data)
        hook = None
        if isinstance(rewritten, Rewritten):
            rewritten, hook = rewritten.body, rewritten.reply_hook
        return (body if rewritten is None else json.dumps(rewritten).encode()), hook


def _hooked(hook: ReplyHook, scope, receive, send):
    """An ASGI ``send`` that holds the route's reply, passes a 200 JSON reply through ``hook``,
    and sends what it returns (or the error reply of what it raised)."""
    start: dict = {}
    chunks: list[bytes] = []

    async def hooked_send(message):
        if message["type"] == "http.response.start":
            start.update(message)
            return
        if message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        if start.get("status") == 200:
            try:
                body = json.dumps(await hook(json.loads(body))).encode()
            except Exception as exc:
                await error_response(exc)(scope, receive, send)
                return
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return hooked_send


def _replaying(body: bytes, receive):
    """An ASGI ``receive`` that delivers ``body`` once, then what the client sends next."""
    delivered = False

    async def replay():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
