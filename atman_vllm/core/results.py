"""The explanation result and its JSON contract (shared by CLI, HTTP and gRPC).

Every span is ``(start, length)`` into the prompt (``prompt_scores``) or the
target (``target``, ``target_tokens``, ``target_scores``), with its text, so
clients never handle token ids. For a chat explanation (``messages``), each
prompt score also names its ``message`` and its span is into that message's
content; ``prompt`` is then the rendered chat prompt the model saw. For a
prompt with images, an image tile's score names its ``image`` (index into
``images``) and its ``rect`` (``{left, top, width, height}`` in [0, 1] of the
original image); its span is the image's placeholder in the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chat import ChatMessage
from .images import PromptImage, Rect
from .options import ExplainOptions


@dataclass(frozen=True)
class TextSpan:
    start: int
    length: int
    text: str

    def to_dict(self) -> dict:
        return {"start": self.start, "length": self.length, "text": self.text}

    @classmethod
    def from_dict(cls, d: dict) -> "TextSpan":
        return cls(int(d["start"]), int(d["length"]), d["text"])


@dataclass(frozen=True)
class SpanScore:
    start: int
    length: int
    text: str
    score: float  # positive: suppressing this span made the target less likely
    message: int | None = None  # chat: the message whose content start/length index; else None
    # Hierarchical search only (None otherwise, and then absent from the JSON): whether this unit had
    # a fork of its own; if not, the granularity of the ancestor unit whose score it inherits.
    refined: bool | None = None
    inherited_from: str | None = None
    image: int | None = None  # an image tile: the image's index in the prompt, and the tile
    rect: Rect | None = None

    def to_dict(self) -> dict:
        d = {"start": self.start, "length": self.length, "text": self.text, "score": self.score}
        if self.message is not None:
            d["message"] = self.message
        if self.image is not None:
            d["image"] = self.image
            d["rect"] = self.rect.to_dict()
        if self.refined is not None:
            d["refined"] = self.refined
        if self.inherited_from is not None:
            d["inherited_from"] = self.inherited_from
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SpanScore":
        message, image = d.get("message"), d.get("image")
        return cls(int(d["start"]), int(d["length"]), d["text"], float(d["score"]),
                   None if message is None else int(message), d.get("refined"), d.get("inherited_from"),
                   None if image is None else int(image), None if image is None else Rect.from_dict(d["rect"]))


@dataclass(frozen=True)
class TargetBoundary:
    """Whether prompt and target split on a token boundary (see core/tokens.py).

    Not aligned: the first target token also covers the prompt's last
    ``prompt_chars`` characters (it is scored as the model sees it; those
    prompt characters belong to no unit); ``note`` says which.
    """

    aligned: bool
    prompt_chars: int = 0
    note: str = ""

    def to_dict(self) -> dict:
        return {"aligned": self.aligned, "prompt_chars": self.prompt_chars, "note": self.note}

    @classmethod
    def from_dict(cls, d: dict | None) -> "TargetBoundary":
        if d is None:
            return cls(True)
        return cls(bool(d["aligned"]), int(d.get("prompt_chars", 0)), d.get("note", ""))


@dataclass(frozen=True)
class TargetToken:
    text: str
    start: int  # into the target text
    length: int
    logprob: float  # log p(token | everything before it), unperturbed run

    def to_dict(self) -> dict:
        return {"text": self.text, "start": self.start, "length": self.length, "logprob": self.logprob}

    @classmethod
    def from_dict(cls, d: dict) -> "TargetToken":
        return cls(d["text"], int(d["start"]), int(d["length"]), float(d["logprob"]))


@dataclass(frozen=True)
class ExplanationForTarget:
    """Scores explaining one target span (the whole target, or one target token)."""

    target: TextSpan
    prompt_scores: tuple[SpanScore, ...]
    target_scores: tuple[SpanScore, ...] = ()  # earlier target tokens; only for target granularity "token"

    def to_dict(self) -> dict:
        return {
            "target": self.target.to_dict(),
            "prompt_scores": [s.to_dict() for s in self.prompt_scores],
            "target_scores": [s.to_dict() for s in self.target_scores],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ExplanationForTarget":
        return cls(
            TextSpan.from_dict(d["target"]),
            tuple(SpanScore.from_dict(s) for s in d["prompt_scores"]),
            tuple(SpanScore.from_dict(s) for s in d["target_scores"]),
        )


@dataclass(frozen=True)
class ExplainStats:
    perturbations: int  # forks with a bias
    forward_passes: int  # perturbations + the unperturbed run
    computed_tokens: int  # positions the model actually ran, all passes together
    cached_tokens: int  # positions served from the prefix cache
    elapsed_s: float

    def to_dict(self) -> dict:
        return {
            "perturbations": self.perturbations,
            "forward_passes": self.forward_passes,
            "computed_tokens": self.computed_tokens,
            "cached_tokens": self.cached_tokens,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ExplainStats":
        return cls(int(d["perturbations"]), int(d["forward_passes"]), int(d["computed_tokens"]),
                   int(d["cached_tokens"]), float(d["elapsed_s"]))


@dataclass(frozen=True)
class ExplainResult:
    prompt: str
    target: str
    target_tokens: tuple[TargetToken, ...]
    explanations: tuple[ExplanationForTarget, ...]
    options: ExplainOptions  # as resolved (granularity "auto" replaced by what it chose)
    stats: ExplainStats
    target_boundary: TargetBoundary = TargetBoundary(True)
    messages: tuple[ChatMessage, ...] | None = None  # chat explanations: the messages, as given
    images: tuple[PromptImage, ...] = ()  # a prompt with images: each one's size and digest (not its pixels)

    def to_dict(self) -> dict:
        d = {
            "prompt": self.prompt,
            "target": self.target,
            "target_tokens": [t.to_dict() for t in self.target_tokens],
            "explanations": [e.to_dict() for e in self.explanations],
            "options": self.options.to_dict(),
            "stats": self.stats.to_dict(),
            "target_boundary": self.target_boundary.to_dict(),
        }
        if self.messages is not None:
            d["messages"] = [m.to_dict() for m in self.messages]
        if self.images:
            d["images"] = [im.to_dict() for im in self.images]
        return d

    # Display and conversions live in atman_vllm.view, imported on first use so
    # the core carries no rendering code and imports neither rich nor torch.
    def _repr_html_(self) -> str:
        from atman_vllm.view import notebook_html

        return notebook_html(self)

    def __rich__(self):
        from atman_vllm.view import explanation_group

        return explanation_group(self)

    def to_captum(self):
        """Captum's ``LLMAttributionResult`` (needs captum); see ``atman_vllm.view.interop.to_captum``."""
        from atman_vllm.view import to_captum

        return to_captum(self)

    def to_records(self) -> list[dict]:
        """One tidy row per (explained target, unit); see ``atman_vllm.view.interop.to_records``."""
        from atman_vllm.view import to_records

        return to_records(self)

    def to_dataframe(self):
        """``to_records`` as a pandas DataFrame (needs pandas)."""
        from atman_vllm.view import to_dataframe

        return to_dataframe(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExplainResult":
        return cls(
            prompt=d["prompt"],
            target=d["target"],
            target_tokens=tuple(TargetToken.from_dict(t) for t in d["target_tokens"]),
            explanations=tuple(ExplanationForTarget.from_dict(e) for e in d["explanations"]),
            options=ExplainOptions.from_dict(d["options"]),
            stats=ExplainStats.from_dict(d["stats"]),
            target_boundary=TargetBoundary.from_dict(d.get("target_boundary")),
            messages=None if d.get("messages") is None else tuple(ChatMessage.from_dict(m) for m in d["messages"]),
            images=tuple(PromptImage(m["digest"], int(m["width"]), int(m["height"])) for m in d.get("images", ())),
        )


_INT0 = {"type": "integer", "minimum": 0}
_SPAN_PROPS = {"start": _INT0, "length": _INT0, "text": {"type": "string"}}


def _obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _optional(schema: dict, *names: str) -> dict:
    schema["required"] = [r for r in schema["required"] if r not in names]
    return schema


_SPAN_SCORE = _obj({**_SPAN_PROPS, "score": {"type": "number"}})
# Chat explanations: prompt scores name their message (spans are into its content).
# Hierarchical search: each prompt score says whether it was refined, or which coarser unit it inherits.
_UNIT_NUMBER = {"type": "number", "minimum": 0, "maximum": 1}
_RECT = _obj({"left": _UNIT_NUMBER, "top": _UNIT_NUMBER, "width": _UNIT_NUMBER, "height": _UNIT_NUMBER})
# Prompts with images: an image tile's score names the image and its rectangle in the original image.
_PROMPT_SCORE = _optional(_obj({**_SPAN_PROPS, "score": {"type": "number"}, "message": _INT0,
                                "refined": {"type": "boolean"},
                                "inherited_from": {"enum": ["paragraph", "sentence"]},
                                "image": _INT0, "rect": _RECT}),
                          "message", "refined", "inherited_from", "image", "rect")
_PROMPT_SCORE["dependentRequired"] = {"image": ["rect"], "rect": ["image"]}
_OPTIONS = _obj({
    "factor": {"type": "number", "exclusiveMinimum": 0},
    "mode": {"enum": ["log-additive", "multiplicative"]},
    "kappa": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
    # The result reports the resolved granularity, so "auto" never appears here.
    "granularity": {"enum": ["token", "word", "sentence", "paragraph", "custom", "spans"]},
    "target_granularity": {"enum": ["complete", "token"]},
    "postprocessing": {"enum": ["none", "absolute", "square"]},
    "normalize": {"type": "boolean"},
})
_OPTIONS["properties"]["delimiter"] = {"type": "string", "minLength": 1}
# Present only for search "hierarchical" (an exhaustive result's options are as they always were).
_OPTIONS["properties"]["search"] = {"enum": ["exhaustive", "hierarchical"]}
_OPTIONS["properties"]["budget"] = {"type": "integer", "minimum": 2}
_OPTIONS["properties"]["image_granularity"] = {"enum": ["token", "word", "sentence", "paragraph"]}
_OPTIONS["properties"]["spans"] = {
    "type": "array", "minItems": 1,
    "items": {"type": "array", "prefixItems": [_INT0, {"type": "integer", "minimum": 1}], "minItems": 2, "maxItems": 2},
}

EXPLAIN_RESULT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "AtMan explanation result",
    **_obj({
        "prompt": {"type": "string", "minLength": 1},
        "target": {"type": "string", "minLength": 1},
        "target_tokens": {"type": "array", "minItems": 1, "items": _obj({
            "text": {"type": "string"}, "start": _INT0, "length": _INT0, "logprob": {"type": "number"},
        })},
        "explanations": {"type": "array", "minItems": 1, "items": _obj({
            "target": _obj(dict(_SPAN_PROPS)),
            "prompt_scores": {"type": "array", "minItems": 1, "items": _PROMPT_SCORE},
            "target_scores": {"type": "array", "items": _SPAN_SCORE},
        })},
        "options": _OPTIONS,
        "stats": _obj({
            "perturbations": _INT0, "forward_passes": {"type": "integer", "minimum": 1},
            "computed_tokens": _INT0, "cached_tokens": _INT0, "elapsed_s": {"type": "number", "minimum": 0},
        }),
        "target_boundary": _obj({"aligned": {"type": "boolean"}, "prompt_chars": _INT0, "note": {"type": "string"}}),
        "messages": {"type": "array", "minItems": 1, "items": _obj({
            "role": {"enum": ["system", "user", "assistant"]}, "content": {"type": "string"},
        })},
        "images": {"type": "array", "minItems": 1, "items": _obj({
            "width": {"type": "integer", "minimum": 1}, "height": {"type": "integer", "minimum": 1},
            "digest": {"type": "string"},
        })},
        # HTTP /v1/explain with "heatmap": true: the image tiles' relevance drawn over the images.
        "heatmap": {"type": "string", "pattern": "^data:image/png;base64,"},
    }),
}
_optional(EXPLAIN_RESULT_SCHEMA, "messages", "images", "heatmap")
