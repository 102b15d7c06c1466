"""Python clients of the atman.v1 gRPC service (``atman-vllm serve``).

    from atman_vllm.client import AtmanClient
    with AtmanClient("127.0.0.1:50051") as client:
        result = client.explain("Ben likes to eat burgers and", " fries", granularity="word")
        print(result.to_dict())

Results are the core's ``ExplainResult`` (``to_dict()`` is the JSON
contract). Every failure raises ``AtmanError`` with the gRPC status code, the
server's message and, for bad input, the name of the offending field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atman_vllm.core.options import ExplainOptions
from atman_vllm.core.results import ExplainResult
from atman_vllm.proto_gen import atman_pb2 as pb
from atman_vllm.proto_gen import atman_pb2_grpc as pb_grpc

from .convert import result_from_proto
from .messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    AtmanError,
    ExplainProgress,
    GenerationDelta,
    ServerInfo,
    Token,
    auth_metadata,
    channel_credentials,
    channel_options,
    explain_event,
    explain_request,
    generate_events,
    generate_request,
    server_info_from_proto,
    tokenize_request,
    tokens_from_proto,
)

__all__ = ["AsyncAtmanClient", "AtmanClient", "AtmanError", "ExplainProgress", "GenerationDelta", "ServerInfo",
           "Token"]

DEFAULT_TARGET = "127.0.0.1:50051"


class _ClientConfig:
    """What both clients share: target, credentials, token, default timeout."""

    def __init__(self, target: str, *, token: str | None, tls: bool,
                 root_certificates: bytes | str | Path | None, timeout: float | None, max_message_bytes: int,
                 model: str):
        self.target = target
        self.credentials = channel_credentials(tls, root_certificates)
        self.metadata = auth_metadata(token)
        self.timeout = timeout
        self.options = channel_options(max_message_bytes)
        self.model = model

    def call_kwargs(self, timeout: float | None) -> dict:
        return {"metadata": self.metadata, "timeout": self.timeout if timeout is None else timeout}


class AtmanClient:
    """Blocking client. ``tls=True`` (or ``root_certificates``) for TLS; ``token`` for a bearer token;
    ``timeout`` (seconds) is the default deadline of every call."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, model: str = ""):
        self._config = _ClientConfig(target, token=token, tls=tls, root_certificates=root_certificates,
                                     timeout=timeout, max_message_bytes=max_message_bytes, model=model)
        c = self._config
        self._channel = (grpc.secure_channel(target, c.credentials, options=c.options) if c.credentials
                         else grpc.insecure_channel(target, options=c.options))
        self._stub = pb_grpc.AtmanStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def explain(self, prompt: str | None = None, target: str = "", *, messages=None, parts=None,
                options: ExplainOptions | dict | None = None,
                timeout: float | None = None, **option_kwargs) -> ExplainResult:
        """Explain ``target`` after ``prompt`` (or after the chat ``messages``: a list of {role, content},
        the last from the user, ``target`` being the assistant's answer; or after ``parts``: text and
        images in order, an image as encoded bytes, a PIL image or a uint8 array); options as
        keywords (factor=, granularity=, image_granularity=, ...) or options=."""
        request = explain_request(prompt, target, options, option_kwargs, self._config.model, messages, parts)
        try:
            return result_from_proto(self._stub.Explain(request, **self._config.call_kwargs(timeout)))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None

    def explain_stream(self, prompt: str | None = None, target: str = "", *, messages=None, parts=None,
                       options: ExplainOptions | dict | None = None,
                       timeout: float | None = None, **option_kwargs) -> Iterator[ExplainProgress | ExplainResult]:
        """ExplainProgress events, then the ExplainResult. Closing the iterator cancels the call."""
        request = explain_request(prompt, target, options, option_kwargs, self._config.model, messages, parts)
        return self._events(self._stub.ExplainStream(request, **self._config.call_kwargs(timeout)), explain_event)

    def generate(self, prompt: str, *, max_tokens: int = 64, temperature: float | None = None,
                 seed: int | None = None, controls: Sequence = (), control_mode: str = "",
                 control_kappa: float | None = None, control_overlap: str = "", explain: bool = False,
                 explain_options: ExplainOptions | dict | None = None, timeout: float | None = None,
                 ) -> Iterator[GenerationDelta | ExplainProgress | ExplainResult]:
        """GenerationDelta events; with ``explain=True`` then progress and the completion's ExplainResult."""
        request = generate_request(
            prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, controls=controls,
            control_mode=control_mode, control_kappa=control_kappa, control_overlap=control_overlap,
            explain=explain, explain_options=explain_options, model=self._config.model)
        return self._events(self._stub.Generate(request, **self._config.call_kwargs(timeout)), generate_events())

    def tokenize(self, text: str, *, timeout: float | None = None) -> list[Token]:
        try:
            reply = self._stub.Tokenize(tokenize_request(text, self._config.model),
                                        **self._config.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None
        return tokens_from_proto(reply)

    def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        try:
            return server_info_from_proto(self._stub.ServerInfo(pb.ServerInfoRequest(),
                                                                **self._config.call_kwargs(timeout)))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", ..."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                       **self._config.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    @staticmethod
    def _events(call, convert) -> Iterator:
        try:
            for msg in call:
                yield convert(msg)
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op once finished; cancels the call when the caller stops early

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "AtmanClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncAtmanClient:
    """The same calls on grpc.aio, for asyncio programs. Cancelling a call's task cancels it on the server."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | Path | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, model: str = ""):
        self._config = _ClientConfig(target, token=token, tls=tls, root_certificates=root_certificates,
                                     timeout=timeout, max_message_bytes=max_message_bytes, model=model)
        c = self._config
        self._channel = (grpc.aio.secure_channel(target, c.credentials, options=c.options) if c.credentials
                         else grpc.aio.insecure_channel(target, options=c.options))
        self._stub = pb_grpc.AtmanStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def explain(self, prompt: str | None = None, target: str = "", *, messages=None, parts=None,
                      options: ExplainOptions | dict | None = None,
                      timeout: float | None = None, **option_kwargs) -> ExplainResult:
        request = explain_request(prompt, target, options, option_kwargs, self._config.model, messages, parts)
        try:
            return result_from_proto(await self._stub.Explain(request, **self._config.call_kwargs(timeout)))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None

    def explain_stream(self, prompt: str | None = None, target: str = "", *, messages=None, parts=None,
                       options: ExplainOptions | dict | None = None, timeout: float | None = None, **option_kwargs
                       ) -> AsyncIterator[ExplainProgress | ExplainResult]:
        request = explain_request(prompt, target, options, option_kwargs, self._config.model, messages, parts)
        return self._events(self._stub.ExplainStream(request, **self._config.call_kwargs(timeout)), explain_event)

    def generate(self, prompt: str, *, max_tokens: int = 64, temperature: float | None = None,
                 seed: int | None = None, controls: Sequence = (), control_mode: str = "",
                 control_kappa: float | None = None, control_overlap: str = "", explain: bool = False,
                 explain_options: ExplainOptions | dict | None = None, timeout: float | None = None,
                 ) -> AsyncIterator[GenerationDelta | ExplainProgress | ExplainResult]:
        request = generate_request(
            prompt, max_tokens=max_tokens, temperature=temperature, seed=seed, controls=controls,
            control_mode=control_mode, control_kappa=control_kappa, control_overlap=control_overlap,
            explain=explain, explain_options=explain_options, model=self._config.model)
        return self._events(self._stub.Generate(request, **self._config.call_kwargs(timeout)), generate_events())

    async def tokenize(self, text: str, *, timeout: float | None = None) -> list[Token]:
        try:
            reply = await self._stub.Tokenize(tokenize_request(text, self._config.model),
                                              **self._config.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None
        return tokens_from_proto(reply)

    async def server_info(self, *, timeout: float | None = None) -> ServerInfo:
        try:
            reply = await self._stub.ServerInfo(pb.ServerInfoRequest(), **self._config.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None
        return server_info_from_proto(reply)

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                             **self._config.call_kwargs(timeout))
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    @staticmethod
    async def _events(call, convert) -> AsyncIterator:
        try:
            async for msg in call:
                yield convert(msg)
        except grpc.RpcError as exc:
            raise AtmanError.from_rpc_error(exc) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncAtmanClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
