"""Parse request bytes ourselves, so a bad request is INVALID_ARGUMENT.

grpcio turns a request deserializer's exception into status UNKNOWN with a
Python exception text. proto3 ``string`` fields reject invalid UTF-8 at parse
time, and a client in another language can send such bytes; the caller must
learn which field is wrong. The handlers therefore get the raw bytes, parse
them here, and on failure walk the wire format to name the field.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from .errors import ErrorCode, ServiceError, invalid

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def find_invalid_utf8(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """Dotted path of the first string field whose bytes are not UTF-8, or None."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, pos = _read_varint(data, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        elif wire_type == _LENGTH_DELIMITED:
            size, pos = _read_varint(data, pos)
            chunk, pos = data[pos:pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    chunk.decode("utf-8")
                except UnicodeDecodeError:
                    return prefix + field.name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                found = find_invalid_utf8(field.message_type, chunk, f"{prefix}{field.name}.")
                if found:
                    return found
        else:  # groups: not used by this API
            return None
    return None


def parse_request(message_type: type[Message], data: bytes) -> Message:
    """The parsed request, or a ServiceError that says what is wrong with it."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        try:
            field = find_invalid_utf8(message_type.DESCRIPTOR, data)
        except DecodeError:
            field = None
        if field is not None:
            raise invalid(field, "is not valid UTF-8 text") from None
        raise ServiceError(
            ErrorCode.INVALID_ARGUMENT, f"request is not a valid {message_type.DESCRIPTOR.full_name}: {exc}"
        ) from None
