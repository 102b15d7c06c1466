"""Building atman.v1 requests and reading replies, shared by the sync and async clients."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from atman_vllm.core.events import ExplainProgress, GenerationDelta
from atman_vllm.core.options import ExplainOptions, InvalidRequestError
from atman_vllm.proto_gen import atman_pb2 as pb

from .convert import messages_to_proto, options_to_proto, result_from_proto

FIELD_METADATA_KEY = "atman-error-field"  # the server names the offending field here
DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20


class AtmanError(Exception):
    """A call failed. ``code`` is the gRPC status, ``field`` the request field at fault (if any)."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> "AtmanError":
        trailing = dict(error.trailing_metadata() or ())
        return cls(error.code(), error.details() or "", trailing.get(FIELD_METADATA_KEY))


@dataclass(frozen=True)
class Token:
    id: int
    start: int
    length: int
    text: str


@dataclass(frozen=True)
class ServerInfo:
    model: str
    limits: dict[str, int]
    versions: dict[str, str]
    explains_in_flight: int
    free_kv_blocks: int
    kv_block_size: int


def _text(field: str, value: str) -> str:
    """Strings the wire can carry; Python allows lone surrogates, UTF-8 does not."""
    if not isinstance(value, str):
        raise AtmanError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: must be a string", field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"{field}: is not valid UTF-8 text (character {exc.start} is a lone surrogate)"
        raise AtmanError(grpc.StatusCode.INVALID_ARGUMENT, message, field) from None
    return value


def _options(options: ExplainOptions | dict | None, extra: dict) -> pb.ExplainOptions:
    if options is not None and extra:
        raise TypeError("pass either options= or option keywords, not both")
    try:
        msg = options_to_proto(options if options is not None else extra)
    except InvalidRequestError as exc:
        raise _invalid(exc.field, exc.message) from None
    if msg.HasField("delimiter"):
        _text("delimiter", msg.delimiter)
    return msg


def _invalid(field: str, message: str) -> AtmanError:
    return AtmanError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def _image_bytes(name: str, image) -> bytes:
    """An image part as encoded bytes: bytes go as they are (the server decodes and checks them),
    PIL images and uint8 arrays as PNG."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    import numpy as np
    from PIL import Image

    try:
        picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
    except (TypeError, ValueError, OSError) as exc:
        raise _invalid(name, f"must be text, encoded image bytes, a PIL image or a uint8 array ({exc})") from None
    return buf.getvalue()


def prompt_parts(parts: Sequence) -> list[pb.PromptPart]:
    """A prompt given in order as text (str) and images (encoded bytes, PIL images, uint8 arrays)."""
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence) or not parts:
        raise _invalid("parts", "must be a non-empty list of text and image parts")
    return [pb.PromptPart(text=_text(f"parts[{i}]", part)) if isinstance(part, str)
            else pb.PromptPart(image=_image_bytes(f"parts[{i}]", part)) for i, part in enumerate(parts)]


def explain_request(prompt: str | None, target: str, options: ExplainOptions | dict | None, extra: dict,
                    model: str, messages=None, parts=None) -> pb.ExplainRequest:
    msg = pb.ExplainRequest(prompt=_text("prompt", prompt or ""), target=_text("target", target),
                            options=_options(options, extra), model=_text("model", model))
    if parts is not None:
        if prompt or messages is not None:
            raise _invalid("parts", "give the prompt as parts, as text or as messages, not two of them")
        msg.parts.extend(prompt_parts(parts))
    if messages is not None:
        try:
            if not messages:  # the wire cannot tell an empty list from none
                raise InvalidRequestError("messages", "must be a non-empty list of {role, content} messages")
            chat = messages_to_proto(messages)
        except InvalidRequestError as exc:
            raise _invalid(exc.field, exc.message) from None
        for m in chat:
            _text("messages", m.content)
        msg.messages.extend(chat)
    return msg


def generate_request(prompt: str, *, max_tokens: int, temperature: float | None, seed: int | None,
                     controls: Sequence, control_mode: str, control_kappa: float | None, control_overlap: str,
                     explain: bool, explain_options: ExplainOptions | dict | None, model: str) -> pb.GenerateRequest:
    msg = pb.GenerateRequest(prompt=_text("prompt", prompt), max_tokens=max_tokens, control_mode=control_mode,
                             control_overlap=control_overlap, explain=explain, model=_text("model", model))
    if temperature is not None:
        msg.temperature = temperature
    if seed is not None:
        msg.seed = seed
    if control_kappa is not None:
        msg.control_kappa = control_kappa
    for i, control in enumerate(controls):
        if isinstance(control, dict):
            start, length, factor = control["start"], control["length"], control["factor"]
        elif hasattr(control, "factor"):
            start, length, factor = control.start, control.length, control.factor
        else:
            start, length, factor = control
        try:
            msg.controls.add(start=start, length=length, factor=factor)
        except (TypeError, ValueError):
            raise AtmanError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"controls: controls[{i}] must be non-negative (start, length) and a number factor, "
                             f"got {control!r}", "controls") from None
    if explain:
        msg.explain_options.CopyFrom(_options(explain_options, {}))
    return msg


def tokenize_request(text: str, model: str) -> pb.TokenizeRequest:
    return pb.TokenizeRequest(text=_text("text", text), model=_text("model", model))


def progress_from_proto(msg: pb.ExplainProgress) -> ExplainProgress:
    return ExplainProgress(msg.done_forks, msg.total_forks)


def explain_event(msg: pb.ExplainEvent):
    if msg.WhichOneof("event") == "progress":
        return progress_from_proto(msg.progress)
    return result_from_proto(msg.result)


def generate_events():
    """A converter for one Generate stream's events: deltas carry the text so far (the
    wire sends the whole completion only on the last delta)."""
    so_far = ""

    def convert(msg: pb.GenerateEvent):
        nonlocal so_far
        kind = msg.WhichOneof("event")
        if kind == "explain_progress":
            return progress_from_proto(msg.explain_progress)
        if kind == "explanation":
            return result_from_proto(msg.explanation)
        d = msg.delta
        so_far = d.completion_text if d.finished else so_far + d.text
        return GenerationDelta(d.text, tuple(d.token_ids), d.finished, d.finish_reason or None, so_far)

    return convert


def tokens_from_proto(msg: pb.TokenizeResponse) -> list[Token]:
    return [Token(t.id, t.start, t.length, t.text) for t in msg.tokens]


def server_info_from_proto(msg: pb.ServerInfoResponse) -> ServerInfo:
    limits = {f.name: getattr(msg.limits, f.name) for f in msg.limits.DESCRIPTOR.fields}
    versions = {f.name: getattr(msg.versions, f.name) for f in msg.versions.DESCRIPTOR.fields}
    return ServerInfo(msg.model, limits, versions, msg.explains_in_flight, msg.free_kv_blocks, msg.kv_block_size)


def channel_credentials(tls: bool, root_certificates: bytes | str | Path | None) -> grpc.ChannelCredentials | None:
    """None for a plaintext channel; ``root_certificates`` (PEM bytes or a file) implies TLS."""
    if root_certificates is None and not tls:
        return None
    if isinstance(root_certificates, (str, Path)):
        root_certificates = Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()
