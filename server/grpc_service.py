"""The gRPC transport: atman.v1.Atman on grpc.aio, plus health and reflection.

Handlers receive raw request bytes (see request_decoding: a request that does
not parse must be INVALID_ARGUMENT, not UNKNOWN) and hand everything else to
``AtmanService``; errors leave through ``_abort`` with the field name in the
trailing metadata.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from atman_vllm.client.convert import messages_from_proto, options_from_proto, result_to_proto
from atman_vllm.core.controls import Control, ImageControl
from atman_vllm.core.results import ExplainResult
from atman_vllm.proto_gen import atman_pb2 as pb

from .errors import FIELD_METADATA_KEY, ErrorCode, ServiceError, invalid, service_error_from
from .request_decoding import parse_request
from atman_vllm.core.events import ExplainProgress

from .service import AtmanService, GenerateParams, ServerStatus

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Atman"].full_name
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    error = service_error_from(exc)
    if error.field:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, error.field),))
    await context.abort(error.code.grpc_code, error.message)


def _progress_to_proto(p: ExplainProgress) -> pb.ExplainProgress:
    return pb.ExplainProgress(done_forks=p.done_forks, total_forks=p.total_forks)


def _info_to_proto(info: ServerStatus) -> pb.ServerInfoResponse:
    limits = info.limits
    return pb.ServerInfoResponse(
        model=info.model,
        limits=pb.Limits(
            max_model_len=info.max_model_len,
            max_explain_tokens=limits.max_explain_tokens,
            max_units=limits.max_units,
            max_concurrent_explains=limits.max_concurrent_explains,
            max_generate_tokens=limits.max_generate_tokens,
            max_message_bytes=limits.max_message_bytes,
        ),
        versions=pb.Versions(**info.versions),
        explains_in_flight=info.explains_in_flight,
        free_kv_blocks=info.free_kv_blocks,
        kv_block_size=info.kv_block_size,
    )


def _control_from_proto(c: pb.Control) -> Control | ImageControl:
    """A text span, or with ``image`` set an image control (a missing ``rect`` is refused by name)."""
    if not c.HasField("image"):
        return Control(c.start, c.length, c.factor)
    rect = ({"left": c.rect.left, "top": c.rect.top, "width": c.rect.width, "height": c.rect.height}
            if c.HasField("rect") else None)
    return ImageControl(c.image, rect, c.factor)


class AtmanServicer:
    def __init__(self, service: AtmanService):
        self.service = service

    def _prompt_and_images(self, msg) -> tuple[str, tuple]:
        """A request's ``prompt``, or its ``parts`` joined into the prompt text and its images."""
        if not msg.parts:
            return msg.prompt, ()
        if msg.prompt:
            raise invalid("parts", "give either prompt or parts, not both")
        kinds = [p.WhichOneof("part") for p in msg.parts]
        if None in kinds:
            raise invalid("parts", f"parts[{kinds.index(None)}] has neither text nor image")
        return self.service.prompt_from_parts([p.text if kind == "text" else p.image
                                               for p, kind in zip(msg.parts, kinds)])

    def _explain_parser(self, raw: bytes):
        def parse():
            msg = parse_request(pb.ExplainRequest, raw)
            messages = messages_from_proto(msg.messages) or None  # an empty repeated field is no field
            prompt, images = self._prompt_and_images(msg)
            return self.service.explain_request(prompt, msg.target, options_from_proto(msg.options), msg.model,
                                                messages, images=images)

        return parse

    async def Explain(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ExplainResult:
        try:
            result = await self.service.explain(self._explain_parser(raw), transport="grpc",
                                                deadline_s=context.time_remaining())
            return result_to_proto(result)
        except Exception as exc:
            await _abort(context, exc)

    async def ExplainStream(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ExplainEvent]:
        try:
            async for event in self.service.explain_events(self._explain_parser(raw), transport="grpc-stream",
                                                           deadline_s=context.time_remaining()):
                if isinstance(event, ExplainProgress):
                    yield pb.ExplainEvent(progress=_progress_to_proto(event))
                else:
                    yield pb.ExplainEvent(result=result_to_proto(event))
        except Exception as exc:
            await _abort(context, exc)

    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateEvent]:
        try:
            msg = parse_request(pb.GenerateRequest, raw)
            self.service.check_model(msg.model)
            prompt, images = self._prompt_and_images(msg)
            params = GenerateParams(
                prompt=prompt,
                images=images,
                max_tokens=msg.max_tokens or GenerateParams.max_tokens,
                temperature=msg.temperature if msg.HasField("temperature") else 0.0,
                seed=msg.seed if msg.HasField("seed") else None,
                controls=tuple(_control_from_proto(c) for c in msg.controls),
                control_mode=msg.control_mode or GenerateParams.control_mode,
                control_kappa=msg.control_kappa if msg.HasField("control_kappa") else None,
                control_overlap=msg.control_overlap or GenerateParams.control_overlap,
                explain_options=options_from_proto(msg.explain_options) if msg.explain else None,
            )
            async for event in self.service.generate(params, transport="grpc-generate",
                                                     deadline_s=context.time_remaining()):
                if isinstance(event, ExplainProgress):
                    yield pb.GenerateEvent(explain_progress=_progress_to_proto(event))
                elif isinstance(event, ExplainResult):
                    yield pb.GenerateEvent(explanation=result_to_proto(event))
                else:
                    yield pb.GenerateEvent(delta=pb.GenerationDelta(
                        text=event.text, token_ids=event.token_ids, finished=event.finished,
                        finish_reason=event.finish_reason or "",
                        completion_text=event.completion_text if event.finished else "",
                    ))
        except Exception as exc:
            await _abort(context, exc)

    async def Tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            msg = parse_request(pb.TokenizeRequest, raw)
            self.service.check_model(msg.model)
            tokens = self.service.tokenize(msg.text)
            return pb.TokenizeResponse(tokens=[pb.Token(id=t.id, start=t.start, length=t.length, text=t.text)
                                               for t in tokens])
        except Exception as exc:
            await _abort(context, exc)

    async def ServerInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ServerInfoResponse:
        try:
            parse_request(pb.ServerInfoRequest, raw)
            return _info_to_proto(await self.service.server_info())
        except Exception as exc:
            await _abort(context, exc)


def _atman_handler(servicer: AtmanServicer) -> grpc.GenericRpcHandler:
    """The generated add_AtmanServicer_to_server, minus the request deserializers."""
    unary = grpc.unary_unary_rpc_method_handler
    stream = grpc.unary_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Explain": unary(servicer.Explain, response_serializer=pb.ExplainResult.SerializeToString),
        "ExplainStream": stream(servicer.ExplainStream, response_serializer=pb.ExplainEvent.SerializeToString),
        "Generate": stream(servicer.Generate, response_serializer=pb.GenerateEvent.SerializeToString),
        "Tokenize": unary(servicer.Tokenize, response_serializer=pb.TokenizeResponse.SerializeToString),
        "ServerInfo": unary(servicer.ServerInfo, response_serializer=pb.ServerInfoResponse.SerializeToString),
    })


def token_matches(header_value: str | None, token_digest: bytes) -> bool:
    """``Bearer <token>`` compared in constant time (digests hide the length)."""
    if not header_value:
        return False
    scheme, _, presented = header_value.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return secrets.compare_digest(hashlib.sha256(presented.encode()).digest(), token_digest)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks exempt)."""

    def __init__(self, token: str):
        self._digest = hashlib.sha256(token.encode()).digest()

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if token_matches(metadata.get("authorization"), self._digest):
            return handler
        return _denial_like(handler)


def _denial_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED."""
    message = "missing or wrong bearer token (metadata 'authorization: Bearer <token>')"

    async def deny(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream, response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(deny, response_serializer=handler.response_serializer)


class GrpcServer:
    """The grpc.aio server with the Atman, health and reflection services."""

    def __init__(self, service: AtmanService, *, host: str, port: int, max_message_bytes: int,
                 auth_token: str | None = None, tls: tuple[bytes, bytes] | None = None):
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        interceptors = [BearerTokenInterceptor(auth_token)] if auth_token else []
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.server.add_generic_rpc_handlers((_atman_handler(AtmanServicer(service)),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        address = f"{host}:{port}"
        if tls is not None:
            cert_chain, private_key = tls
            credentials = grpc.ssl_server_credentials(((private_key, cert_chain),))
            self.port = self.server.add_secure_port(address, credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise ServiceError(ErrorCode.UNAVAILABLE, f"cannot bind gRPC to {address}")

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):  # "" is the whole server
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls now; let running ones finish for ``grace_s``; cancel the rest."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
