"""Media in chat messages (OpenAI content parts): checked at the edge, and turned into prompt parts.

vLLM's chat route takes ``image_url`` content parts and loads whatever the
URL names: an ``http(s)`` URL is fetched from the server's own network (any
host the server can reach, this server's own routes included) and a
``file://`` URL fails inside vLLM with a 500. The server therefore takes
media inline only: ``check_chat_media`` runs on every body of every route
(chat completions, /tokenize, /v1/responses, ...) before vLLM sees it, and
refuses with 400 naming the part

- an image that is not a base64 data URL (``data:image/<type>;base64,...``),
  or whose bytes or pixels exceed the limits of ``atman_vllm.imaging`` (each
  is decoded here, off the event loop, so vLLM only ever gets readable ones);
- more images than the server takes per prompt (counted before decoding);
- any other media part (audio, video, embeddings, files) and a ``uuid``
  (which names a cached item instead of sending it): nothing here serves
  them, and a ``uuid`` without the data would read another request's media.

Text parts pass unchanged. ``prompt_parts`` turns one message's content parts
into the ordered text (str) / image (bytes) parts that gRPC's prompt parts
are too, so explain and steering treat a chat's images like a prompt's.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from .errors import invalid
from .http_bodies import decode_image_string

# Content-part types vLLM reads as text (renderers/chat_utils.py: TEXT_PART_TYPES and "refusal").
TEXT_PART_TYPES = ("text", "input_text", "output_text", "refusal", "thinking")
# Image parts: chat completions' {"image_url": {"url": ...}}, the Responses API's {"image_url": "..."}.
IMAGE_PART_TYPES = ("image_url", "input_image")
# Top-level body fields whose items may carry content parts: chat messages, Responses input items.
CONTENT_FIELDS = ("messages", "input")


@dataclass(frozen=True)
class ImagePart:
    field: str  # where the URL is, as the error names it: messages[0].content[1].image_url.url
    url: str


def _image_url(part: dict, where: str) -> ImagePart:
    value = part.get("image_url")
    if part.get("type") == "image_url":
        if not isinstance(value, dict) or not isinstance(value.get("url"), str):
            raise invalid(f"{where}.image_url.url", "is required: an image part is "
                                                    "{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/...\"}}")
        return ImagePart(f"{where}.image_url.url", value["url"])
    if not isinstance(value, str):
        raise invalid(f"{where}.image_url", "must be a data URL string")
    return ImagePart(f"{where}.image_url", value)


def _content_parts(data: dict):
    """(field name, part) of every content part in the body's messages / input items."""
    for name in CONTENT_FIELDS:
        items = data.get(name)
        if not isinstance(items, list):
            continue
        for i, item in enumerate(items):
            content = item.get("content") if isinstance(item, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                yield f"{name}[{i}].content[{j}]", part


def image_parts(data) -> list[ImagePart]:
    """The body's image parts, in order; 400 for a media part that is not an inline image."""
    if not isinstance(data, dict):
        return []
    images = []
    for where, part in _content_parts(data):
        if isinstance(part, str):
            continue  # vLLM reads a bare string part as text
        if not isinstance(part, dict):
            raise invalid(where, f"must be a content part object, got {type(part).__name__}")
        if "uuid" in part:
            raise invalid(f"{where}.uuid", "is not taken here: send the media itself, inline")
        kind = part.get("type")
        if kind in TEXT_PART_TYPES:
            continue
        if kind not in IMAGE_PART_TYPES:
            raise invalid(f"{where}.type", f"{kind!r} is not taken here: content parts are text, or images as "
                                           "image_url parts with data URLs")
        image = _image_url(part, where)
        if not image.url.startswith("data:"):
            raise invalid(image.field, "must be a data URL (data:image/<type>;base64,...): this server does not "
                                       "fetch images from URLs")
        images.append(image)
    return images


def _check_readable(image: ImagePart) -> None:
    from atman_vllm.imaging import prompt_image

    # Bytes, header pixels, then a full decode: vLLM gets only readable images within the limits.
    prompt_image(decode_image_string(image.url, image.field), image.field)


async def check_chat_media(data, max_images: int) -> None:
    """400 unless every media part of the body is an inline image within the limits (see the module doc)."""
    images = image_parts(data)
    if len(images) > max_images:
        raise invalid(images[max_images].field, f"the request has {len(images)} images; at most {max_images} "
                                                "are taken per prompt here")
    for image in images:
        await asyncio.to_thread(_check_readable, image)  # decoding a large image must not stall the event loop


def prompt_parts(message_index: int, content: list) -> list:
    """One message's OpenAI content parts as ordered prompt parts: text (str), images (encoded bytes),
    for explaining and steering: ``text`` parts and ``image_url`` parts with data URLs (what else vLLM
    takes is not rendered as plain text)."""
    parts = []
    for j, part in enumerate(content):
        where = f"messages[{message_index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}.text", "is required: a text part is {\"type\": \"text\", \"text\": \"...\"}")
            parts.append(text)
        elif kind == "image_url":
            image = _image_url(part, where)
            parts.append(decode_image_string(image.url, image.field))
        else:
            raise invalid(where, "must be a text part or an image_url part with a data URL to be explained "
                                 "or steered")
    return parts
