"""Conversions between the core's result types and the atman.v1 messages.

The one place where the JSON contract (core ``ExplainResult``) and the proto
meet; the server and the client both use it, so a field added to one side
shows up as a round-trip test failure rather than a silent loss.
"""

from __future__ import annotations

from collections.abc import Iterable

from atman_vllm.core.chat import ChatMessage
from atman_vllm.core.images import PromptImage, Rect
from atman_vllm.core.options import ExplainOptions, InvalidRequestError
from atman_vllm.core.results import (
    ExplainResult,
    ExplainStats,
    ExplanationForTarget,
    SpanScore,
    TargetBoundary,
    TargetToken,
    TextSpan,
)
from atman_vllm.proto_gen import atman_pb2 as pb

_U32_MAX = 2**32 - 1


def _u32(value, field: str) -> int:
    """A non-negative 32-bit integer; the wire cannot carry anything else."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidRequestError(field, f"must be an integer, got {value!r}") from None
    if not 0 <= number <= _U32_MAX:
        raise InvalidRequestError(field, f"must be between 0 and {_U32_MAX}, got {value!r}")
    return number


# --- options -----------------------------------------------------------------


def options_to_proto(options: ExplainOptions | dict | None) -> pb.ExplainOptions:
    """Options as given (not validated: the server validates, in one place)."""
    if options is None:
        return pb.ExplainOptions()
    if isinstance(options, ExplainOptions):
        options = {
            **options.to_dict(),
            "delimiter": options.delimiter,
            "spans": options.spans,
        }
    unknown = set(options) - set(ExplainOptions.__dataclass_fields__)
    if unknown:
        raise InvalidRequestError(sorted(unknown)[0], "unknown option")
    msg = pb.ExplainOptions()
    for name in ("factor", "kappa"):
        if options.get(name) is not None:
            try:
                setattr(msg, name, float(options[name]))
            except (TypeError, ValueError):
                raise InvalidRequestError(name, f"must be a number, got {options[name]!r}") from None
    if options.get("image_granularity") is not None:
        value = options["image_granularity"]
        msg.image_granularity = value.value if hasattr(value, "value") else str(value)
    for name in ("mode", "granularity", "target_granularity", "postprocessing", "search"):
        if options.get(name) is not None:
            value = options[name]
            setattr(msg, name, value.value if hasattr(value, "value") else str(value))
    if options.get("delimiter") is not None:
        msg.delimiter = str(options["delimiter"])
    if options.get("normalize") is not None:
        if not isinstance(options["normalize"], bool):
            raise InvalidRequestError("normalize", f"must be true or false, got {options['normalize']!r}")
        msg.normalize = options["normalize"]
    if options.get("budget") is not None:
        if isinstance(options["budget"], bool) or not isinstance(options["budget"], int):
            raise InvalidRequestError("budget", f"must be an integer, got {options['budget']!r}")
        msg.budget = _u32(options["budget"], "budget")
    for span in options.get("spans") or ():
        try:
            start, length = span
        except (TypeError, ValueError):
            raise InvalidRequestError("spans", f"each span must be a (start, length) pair, got {span!r}") from None
        msg.spans.add(start=_u32(start, "spans"), length=_u32(length, "spans"))
    return msg


def options_from_proto(msg: pb.ExplainOptions) -> ExplainOptions:
    """Unset fields take the defaults; the result is not yet validated."""
    defaults = ExplainOptions()
    return ExplainOptions(
        factor=msg.factor if msg.HasField("factor") else defaults.factor,
        mode=msg.mode or defaults.mode,
        kappa=msg.kappa if msg.HasField("kappa") else None,
        granularity=msg.granularity or defaults.granularity,
        delimiter=msg.delimiter if msg.HasField("delimiter") else None,
        spans=tuple((s.start, s.length) for s in msg.spans) or None,
        target_granularity=msg.target_granularity or defaults.target_granularity,
        postprocessing=msg.postprocessing or defaults.postprocessing,
        normalize=msg.normalize if msg.HasField("normalize") else defaults.normalize,
        search=msg.search or defaults.search,
        budget=msg.budget if msg.HasField("budget") else None,
        image_granularity=msg.image_granularity if msg.HasField("image_granularity") else None,
    )


# --- results -------------------------------------------------------------------


def _scores_to_proto(scores: Iterable[SpanScore]) -> list[pb.ScoredSpan]:
    return [pb.ScoredSpan(start=s.start, length=s.length, text=s.text, score=s.score, message=s.message,
                          refined=s.refined, inherited_from=s.inherited_from, image=s.image,
                          rect=None if s.rect is None else pb.Rect(**s.rect.to_dict()))
            for s in scores]


def _scores_from_proto(scores: Iterable[pb.ScoredSpan]) -> tuple[SpanScore, ...]:
    return tuple(SpanScore(s.start, s.length, s.text, s.score, s.message if s.HasField("message") else None,
                           s.refined if s.HasField("refined") else None,
                           s.inherited_from if s.HasField("inherited_from") else None,
                           s.image if s.HasField("image") else None,
                           Rect(s.rect.left, s.rect.top, s.rect.width, s.rect.height) if s.HasField("image") else None)
                 for s in scores)


def messages_to_proto(messages) -> list[pb.ChatMessage]:
    """Chat messages (ChatMessage or {role, content} dicts) as given; the server validates them."""
    out = []
    for i, m in enumerate(messages):
        role, content = (m.role, m.content) if isinstance(m, ChatMessage) else (
            (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None))
        if not isinstance(role, str) or not isinstance(content, str):
            raise InvalidRequestError("messages", f"messages[{i}] must have a string role and a string content")
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def messages_from_proto(messages: Iterable[pb.ChatMessage]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def result_to_proto(result: ExplainResult) -> pb.ExplainResult:
    stats = result.stats
    return pb.ExplainResult(
        prompt=result.prompt,
        target=result.target,
        target_tokens=[
            pb.TargetToken(text=t.text, start=t.start, length=t.length, logprob=t.logprob)
            for t in result.target_tokens
        ],
        explanations=[
            pb.Explanation(
                target=pb.TextSpan(start=e.target.start, length=e.target.length, text=e.target.text),
                prompt_scores=_scores_to_proto(e.prompt_scores),
                target_scores=_scores_to_proto(e.target_scores),
            )
            for e in result.explanations
        ],
        options=options_to_proto(result.options),
        stats=pb.ExplainStats(
            perturbations=stats.perturbations,
            forward_passes=stats.forward_passes,
            computed_tokens=stats.computed_tokens,
            cached_tokens=stats.cached_tokens,
            elapsed_s=stats.elapsed_s,
        ),
        target_boundary=pb.TargetBoundary(**result.target_boundary.to_dict()),
        messages=messages_to_proto(result.messages or ()),
        images=[pb.ImageInfo(width=im.width, height=im.height, digest=im.digest) for im in result.images],
    )


def result_from_proto(msg: pb.ExplainResult) -> ExplainResult:
    stats = msg.stats
    return ExplainResult(
        prompt=msg.prompt,
        target=msg.target,
        target_tokens=tuple(TargetToken(t.text, t.start, t.length, t.logprob) for t in msg.target_tokens),
        explanations=tuple(
            ExplanationForTarget(
                target=TextSpan(e.target.start, e.target.length, e.target.text),
                prompt_scores=_scores_from_proto(e.prompt_scores),
                target_scores=_scores_from_proto(e.target_scores),
            )
            for e in msg.explanations
        ),
        options=options_from_proto(msg.options).validated(),
        stats=ExplainStats(
            perturbations=stats.perturbations,
            forward_passes=stats.forward_passes,
            computed_tokens=stats.computed_tokens,
            cached_tokens=stats.cached_tokens,
            elapsed_s=stats.elapsed_s,
        ),
        target_boundary=(TargetBoundary(msg.target_boundary.aligned, msg.target_boundary.prompt_chars,
                                        msg.target_boundary.note)
                         if msg.HasField("target_boundary") else TargetBoundary(True)),
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.messages) or None,
        images=tuple(PromptImage(im.digest, im.width, im.height) for im in msg.images),
    )
