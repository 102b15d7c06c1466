"""Every failure a caller can see, and how each transport spells it.

Handlers on both transports catch whatever an explain or generate call
raises and pass it through ``service_error_from``: that is the only place
where core's ``InvalidRequestError``, a timeout or a dead engine become a
status, so gRPC and HTTP can never disagree on what an error is.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum

import grpc

from atman_vllm.core.options import InvalidRequestError

log = logging.getLogger("atman_server")

# Trailing metadata key carrying the offending field, so clients can point at it.
FIELD_METADATA_KEY = "atman-error-field"


class ErrorCode(Enum):
    """A status with its gRPC code and HTTP status."""

    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400)
    UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, 401)
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404)
    RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429)
    CANCELLED = (grpc.StatusCode.CANCELLED, 499)  # nginx's "client closed request"
    INTERNAL = (grpc.StatusCode.INTERNAL, 500)
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503)
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, 504)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http_status(self) -> int:
        return self.value[1]


@dataclass
class ServiceError(Exception):
    code: ErrorCode
    message: str
    field: str | None = None

    def __str__(self) -> str:
        return self.message

    def to_http_body(self) -> dict:
        """OpenAI-style error object, like vLLM's own routes return."""
        return {"error": {"message": self.message, "type": self.code.name, "param": self.field,
                          "code": self.code.http_status}}


def invalid(field: str, message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def _is_engine_dead(exc: BaseException) -> bool:
    # Imported lazily: vllm is heavy and only present where an engine runs.
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)


# vLLM's names for what our API calls otherwise.
VLLM_PARAMETER_FIELDS = {"input_tokens": "prompt", "prompt_token_ids": "prompt"}


def _vllm_client_error(exc: BaseException) -> ServiceError | None:
    """vLLM's own verdict on a bad request (prompt longer than the context, a bad
    sampling parameter, ...): the caller's fault, so INVALID_ARGUMENT naming the field."""
    from vllm.exceptions import VLLMClientError, VLLMNotFoundError

    if not isinstance(exc, VLLMClientError):
        return None
    message = str(exc)
    parameter = getattr(exc, "parameter", None)
    field = VLLM_PARAMETER_FIELDS.get(parameter, parameter) or ("prompt" if "prompt" in message else "request")
    code = ErrorCode.NOT_FOUND if isinstance(exc, VLLMNotFoundError) else ErrorCode.INVALID_ARGUMENT
    return ServiceError(code, f"{field}: {message}", field)


def service_error_from(exc: BaseException, *, request_id: str = "") -> ServiceError:
    """The status a caller gets for ``exc`` (CancelledError is never passed here)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return ServiceError(ErrorCode.INVALID_ARGUMENT, f"{exc.field}: {exc.message}", exc.field)
    client_error = _vllm_client_error(exc)
    if client_error is not None:
        return client_error
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return ServiceError(ErrorCode.DEADLINE_EXCEEDED, "deadline exceeded; every fork of the call was aborted")
    if _is_engine_dead(exc):
        return ServiceError(ErrorCode.UNAVAILABLE, "the engine has stopped; the server must be restarted")
    log.error("internal error in request %s", request_id, exc_info=exc)
    return ServiceError(ErrorCode.INTERNAL, f"internal error (request {request_id}); see the server log")
