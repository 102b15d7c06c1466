"""The typed body of ``POST /v1/explain``, and the JSON Schema published from it.

Parsed with pydantic (as vLLM's own routes are): numbers must be JSON
numbers (not booleans, not strings), lists lists, objects objects, unknown
fields are refused. Value rules that need more than a type (spans inside the
prompt, a delimiter for ``custom``) stay in the core's ``ExplainOptions``,
which gRPC and the Python API use too, so every transport applies the same
rules. Errors name the field as the core does: an option by its own name
(``factor``), a body field by its name (``prompt``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from atman_vllm.core.options import (
    MAX_FACTOR,
    MIN_FACTOR,
    ExplainOptions,
    Granularity,
    Mode,
    MIN_BUDGET,
    Postprocessing,
    Search,
    TargetGranularity,
)

from .errors import ServiceError, invalid

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "schema" / "explain_request.json"
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, use_enum_values=False)
# A character span of the prompt: [start, length], both non-negative integers.
Span = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=2, max_length=2)]


class ExplainOptionsBody(BaseModel):
    """The ``options`` object; every field optional, defaults as in ATMAN_SPEC §6."""

    model_config = ConfigDict(**_STRICT, title="ExplainOptions")

    factor: Annotated[float, Field(ge=MIN_FACTOR, le=MAX_FACTOR)] = Field(
        0.1, description="suppression (< 1) or amplification (> 1) factor, applied in every layer")
    mode: Annotated[Mode, Field(strict=False)] = Mode.LOG_ADDITIVE
    kappa: Annotated[float, Field(ge=0.0, le=1.0)] | None = Field(
        None, description="correlated-suppression threshold; null: off")
    granularity: Annotated[Granularity, Field(strict=False)] = Granularity.AUTO
    delimiter: StrictStr | None = Field(None, description="for granularity 'custom'")
    spans: list[Span] | None = Field(None, description="[start, length] character spans, for granularity 'spans'")
    target_granularity: Annotated[TargetGranularity, Field(strict=False)] = TargetGranularity.COMPLETE
    postprocessing: Annotated[Postprocessing, Field(strict=False)] = Postprocessing.NONE
    normalize: StrictBool = False
    search: Annotated[Search, Field(strict=False)] = Field(
        Search.EXHAUSTIVE, description="exhaustive: one fork per unit; hierarchical: paragraphs, then sentences "
                                       "and units inside the strongest ones, within budget forward passes")
    budget: Annotated[StrictInt, Field(ge=MIN_BUDGET)] | None = Field(
        None, description="most forward passes of a hierarchical search (default 32); only with search 'hierarchical'")
    image_granularity: Annotated[Granularity, Field(strict=False)] | None = Field(
        None, description="tiles of the prompt's images: token (one grid cell), word (2x2 cells), sentence (4x4), "
                          "paragraph (the whole image); null: as granularity")

    def to_options(self) -> ExplainOptions:
        spans = None if self.spans is None else tuple(tuple(s) for s in self.spans)
        return ExplainOptions(factor=self.factor, mode=self.mode, kappa=self.kappa, granularity=self.granularity,
                              delimiter=self.delimiter, spans=spans, target_granularity=self.target_granularity,
                              postprocessing=self.postprocessing, normalize=self.normalize,
                              search=self.search, budget=self.budget, image_granularity=self.image_granularity)


class TextPartBody(BaseModel):
    """A text part of a message's content (as OpenAI's chat completions take it)."""

    model_config = ConfigDict(**_STRICT, title="TextPart")

    type: Literal["text"]
    text: StrictStr


class ImageUrlBody(BaseModel):
    model_config = ConfigDict(**_STRICT, title="ImageUrl")

    url: StrictStr = Field(description="a base64 data URL (data:image/png;base64,...); other URLs are refused")


class ImagePartBody(BaseModel):
    """An image part of a message's content (as OpenAI's chat completions take it), inline only."""

    model_config = ConfigDict(**_STRICT, title="ImagePart")

    type: Literal["image_url"]
    image_url: ImageUrlBody


ContentPartBody = Annotated[TextPartBody | ImagePartBody, Field(discriminator="type")]


class ChatMessageBody(BaseModel):
    """One chat message; its role is checked by the core (system, user or assistant). Its content is a
    string, or text and image parts in order (an image's tiles become units beside the text's)."""

    model_config = ConfigDict(**_STRICT, title="ChatMessage")

    role: StrictStr
    content: StrictStr | list[ContentPartBody]


class ExplainBody(BaseModel):
    """``POST /v1/explain``: explain ``target`` as the continuation of ``prompt`` (or as the assistant's
    answer to ``messages``)."""

    model_config = ConfigDict(**_STRICT, title="ExplainRequest")

    model: StrictStr | None = Field(None, description="the served model's name; omitted: the one served")
    prompt: StrictStr | None = Field(None, description="the prompt; or give messages instead")
    messages: list[ChatMessageBody] | None = Field(
        None, description="a chat instead of prompt, rendered with the model's chat template (with the generation "
                          "prompt); the last message must be from the user. Units come from the messages' contents "
                          "only; each prompt score names its message, its span is into that message's content")
    target: StrictStr
    options: ExplainOptionsBody = Field(default_factory=ExplainOptionsBody)
    images: list[StrictStr] | None = Field(
        None, description="the prompt's images, in the order of the model's image placeholders in prompt "
                          "(<image> for Idefics3; or in the messages' string contents): base64 or data URLs "
                          "(data:image/png;base64,...). A chat may give its images as image_url parts instead")
    heatmap: StrictBool = Field(False, description="also return the image tiles' relevance drawn over the "
                                                   "images, as a PNG data URL (field heatmap of the reply)")


_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.ASCII)


def decode_image_string(text: str, field: str) -> bytes:
    """An image given as base64 or as a data URL, as bytes (decoded strictly: no stray characters)."""
    match = _DATA_URL.match(text)
    if text.startswith("data:") and not match:
        raise invalid(field, "a data URL must look like data:image/<type>;base64,<data>")
    payload = text[match.end():] if match else text
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is neither valid base64 nor a base64 data URL") from None


def decode_images(texts: list[str] | None, max_images: int) -> list[bytes]:
    """The body's images as bytes; the count is checked before any is decoded."""
    texts = texts or []
    if len(texts) > max_images:
        raise invalid("images", f"the prompt has {len(texts)} images; at most {max_images} are taken here")
    return [decode_image_string(t, f"images[{i}]") for i, t in enumerate(texts)]


def explain_request_schema() -> dict:
    """The published JSON Schema of the body (docs/schema/explain_request.json is this, written out)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **ExplainBody.model_json_schema()}


def write_schema(path: Path = SCHEMA_PATH) -> None:
    """Write the published schema (a unit test checks the file is up to date)."""
    path.write_text(json.dumps(explain_request_schema(), indent=2, sort_keys=True) + "\n")


def load_json_body(body: bytes):
    """JSON from request bytes; bytes that are not UTF-8 become lone surrogates
    (``surrogateescape``), so the text check later names the string field
    they are in, exactly as for a JSON ``"\\ud800"`` escape."""
    try:
        return json.loads(body.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as exc:
        raise invalid("body", f"is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid("body", "is nested too deeply") from None


def _field_of(location: tuple) -> str:
    """The field a pydantic error is about, named as the core names it."""
    names = [part for part in location if isinstance(part, str)]
    if not names:
        return "body"
    if names[0] == "options" and len(names) > 1:
        return names[1]
    return names[0]


def _without_union_branches(location: tuple) -> list:
    """A pydantic location without the names it gives a union's branches (``str``, ``list[...]``)
    and a tagged union's tag (repeated by the field after it)."""
    out: list = []
    for part in location:
        if isinstance(part, str) and ("[" in part or part == "str"):
            continue
        if out and part == out[-1] and isinstance(part, str):
            continue
        out.append(part)
    return out


def _error_from(exc: ValidationError) -> ServiceError:
    errors = exc.errors(include_url=False)
    # A union (a message's content: a string or a list of parts) fails once per branch; the deepest
    # error of the first failing field is the one that says what is wrong.
    field_errors = [e for e in errors if _field_of(tuple(e["loc"])) == _field_of(tuple(errors[0]["loc"]))]
    first = max(field_errors, key=lambda e: len(e["loc"]))
    location = tuple(first["loc"])
    field = _field_of(location)
    message = first["msg"]
    message = message[0].lower() + message[1:]
    if first["type"] == "extra_forbidden":
        message = "unknown field" if len(location) == 1 else "unknown option"
    elif first["type"] == "missing":
        message = "is required"
    elif first["type"] not in ("model_type", "dict_type"):
        message = f"{message}, got {first['input']!r}"[:300]
    if location[-1] != field:  # inside the field: say where (spans.2.0)
        message = f"{message} (at {'.'.join(str(p) for p in _without_union_branches(location))})"
    return invalid(field, message)


@dataclass(frozen=True)
class ParsedExplainBody:
    model: str | None
    prompt: str | None
    target: str
    options: ExplainOptions
    messages: list[dict] | None  # None: a plain prompt
    images: list[str] | None = None  # as given (base64 / data URLs): decoded by decode_images
    heatmap: bool = False


def parse_explain_body(body: bytes) -> ParsedExplainBody:
    """The fields of a /v1/explain body; errors name the field."""
    data = load_json_body(body)
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object with prompt (or messages), target and options")
    try:
        parsed = ExplainBody.model_validate(data)
    except ValidationError as exc:
        raise _error_from(exc) from None
    if parsed.prompt is None and parsed.messages is None:
        raise invalid("prompt", "is required (or give messages)")
    messages = None if parsed.messages is None else [m.model_dump() for m in parsed.messages]
    return ParsedExplainBody(parsed.model, parsed.prompt, parsed.target, parsed.options.to_options(), messages,
                             parsed.images, parsed.heatmap)


def parse_explain_field(value) -> ExplainOptions | None:
    """The ``explain`` extra field of a chat completions body: true (default options), an options object,
    or false/null (no explanation). Errors name ``explain`` (an option: ``explain.<option>``)."""
    if value is None or value is False:
        return None
    if value is True:
        return ExplainOptions()
    if not isinstance(value, dict):
        raise invalid("explain", f"must be true or an options object, got {type(value).__name__}")
    try:
        return ExplainOptionsBody.model_validate(value).to_options()
    except ValidationError as exc:
        error = _error_from(exc)
        raise invalid(f"explain.{error.field}", error.message.split(": ", 1)[-1]) from None
