"""What the service does, independent of the transport.

The gRPC servicer and the HTTP routes both translate their request into a
call here and the outcome (or the ``ServiceError``) back; validation, limits,
the explain slots, deadlines, metrics and the per-call log line live here
once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from atman_vllm.core.chat import check_messages
from atman_vllm.core.controls import Control
from atman_vllm.core.events import ExplainProgress
from atman_vllm.core.images import join_parts
from atman_vllm.core.options import ExplainOptions, InvalidRequestError
from atman_vllm.core.planning import Limit, PlanLimits
from atman_vllm.core.requests import ExplainRequest
from atman_vllm.core.results import ExplainResult

from .chat_media import prompt_parts
from .errors import ErrorCode, ServiceError, invalid, service_error_from
from .limits import ExplainSlots, ServiceLimits
from .metrics import ServiceMetrics

request_log = logging.getLogger("atman_server.requests")

DEFAULT_GENERATE_TOKENS = 64


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    max_tokens: int = DEFAULT_GENERATE_TOKENS
    temperature: float = 0.0
    seed: int | None = None
    controls: tuple[Control, ...] = ()
    control_mode: str = "log-additive"
    control_kappa: float | None = None
    control_overlap: str = "partial"
    explain_options: ExplainOptions | None = None  # None: do not explain the completion
    images: tuple = ()  # one per image placeholder of the prompt (encoded bytes, decoded by the library)


@dataclass(frozen=True)
class TokenSpan:
    id: int
    start: int
    length: int
    text: str


@dataclass(frozen=True)
class ServerStatus:
    """What ServerInfo reports (the gRPC reply and the client's ServerInfo are built from it)."""

    model: str
    max_model_len: int
    limits: ServiceLimits
    versions: dict[str, str]
    explains_in_flight: int
    free_kv_blocks: int
    kv_block_size: int


CONTROL_FIELD_NAMES = {"mode": "control_mode", "kappa": "control_kappa", "overlap": "control_overlap"}


def absolute_deadline(deadline_s: float | None) -> float | None:
    return None if deadline_s is None else time.monotonic() + deadline_s


def cancelled_status(deadline: float | None) -> str:
    """gRPC cancels a handler whose deadline passed, often before our own timeout fires."""
    past_deadline = deadline is not None and time.monotonic() >= deadline
    return (ErrorCode.DEADLINE_EXCEEDED if past_deadline else ErrorCode.CANCELLED).name


def new_request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:16]}"


def check_text(field: str, text, *, allow_empty: bool = False) -> str:
    if not isinstance(text, str):
        raise invalid(field, f"must be a string, got {type(text).__name__}")
    if not text and not allow_empty:
        raise invalid(field, "must not be empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. from a JSON "\ud800" escape
        raise invalid(field, f"is not valid UTF-8 text (character {exc.start} is a lone surrogate)") from None
    return text


def _versions() -> dict[str, str]:
    import grpc
    import vllm

    try:
        atman = importlib.metadata.version("atman-vllm")
    except importlib.metadata.PackageNotFoundError:
        atman = "unknown"
    return {"api": "atman.v1", "atman_vllm": atman, "vllm": vllm.__version__, "grpcio": grpc.__version__}


@dataclass
class _CallRecord:
    """What one explain call did, for its log line and the metrics."""

    request_id: str
    transport: str
    prompt: str | None = None
    tokens: int | None = None
    units: int | None = None
    result: ExplainResult | None = None
    status: str = "OK"
    deadline: float | None = None  # time.monotonic() value


class AtmanService:
    def __init__(self, llm, limits: ServiceLimits, *, metrics: ServiceMetrics | None = None,
                 log_prompts: bool = False):
        self.llm = llm
        self.limits = limits
        self.metrics = metrics or ServiceMetrics()
        self.log_prompts = log_prompts
        self.slots = ExplainSlots(limits.max_concurrent_explains)
        self.plan_limits = PlanLimits(prompt_chars=Limit(limits.prompt_chars, "the server's --max-prompt-chars"),
                                      tokens=Limit(limits.max_explain_tokens, "the server's --max-explain-tokens"),
                                      units=Limit(limits.max_units, "the server's --max-units"),
                                      images=Limit(limits.max_images, "this server's limit"))
        self.metrics.explains_in_flight.set_function(lambda: self.slots.in_use)
        self._versions = _versions()

    # --- validation ----------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model and model != self.llm.model_name:
            raise ServiceError(ErrorCode.NOT_FOUND,
                               f"model: {model!r} is not served here; this server serves {self.llm.model_name!r}",
                               "model")

    def explain_request(self, prompt, target, options: ExplainOptions, model: str | None = None,
                        messages=None, *, generated: bool = False, images=()) -> ExplainRequest:
        """A validated request (raises ServiceError / InvalidRequestError naming the field).

        ``messages`` (None: a plain prompt) is a chat, rendered with the model's template.
        ``generated``: the target is generated later (an empty one is then expected).
        ``images``: encoded image bytes, one per image placeholder of the prompt; counted before any
        is decoded, each decoded only after its size (bytes, then pixels from its header) is checked.
        """
        self.check_model(model)
        if messages is not None and prompt:
            raise invalid("messages", "give either prompt or messages, not both")
        if messages is not None:
            messages, part_images = self.messages_from_parts(messages)
            if part_images and images:
                raise invalid("images", "give a chat's images either as image parts of its messages or in "
                                        "images, not both")
            images = images or part_images
        self.plan_limits.check_images(len(images))
        check_text("target", target, allow_empty=generated)
        if isinstance(options.delimiter, str):
            check_text("delimiter", options.delimiter, allow_empty=True)
            self.plan_limits.check_text("delimiter", options.delimiter)
        if messages is None:
            check_text("prompt", prompt)
            request = self.llm.explain_request(prompt, target, options.validated(), images=images)
        else:
            checked = check_messages(messages)
            for m in checked:  # before anything renders or tokenizes them
                check_text("messages", m.content, allow_empty=True)
                self.plan_limits.check_text("messages", m.content)
            request = self.llm.explain_request(None, target, options.validated(), messages=checked, images=images)
        self.plan_limits.check_chars(request)  # before anything tokenizes them
        return request

    def prompt_from_parts(self, parts, field: str = "parts") -> tuple[str, tuple]:
        """A prompt given as ordered text (str) and image (bytes) parts, as the prompt text with the
        model's image placeholder where each image goes, and the images (counted, not yet decoded)."""
        count = sum(not isinstance(p, str) for p in parts)
        self.plan_limits.check_images(count)
        vision = getattr(self.llm, "vision", None)
        if vision is None:
            if count:
                raise invalid(field, f"an image part was given, but this model ({self.llm.model_name}) "
                                     "takes no images")
            return "".join(parts), ()
        return join_parts(parts, vision.placeholder, field)

    def messages_from_parts(self, messages) -> tuple[list, tuple]:
        """Chat messages whose content may be OpenAI content parts (text and image_url parts) as
        messages with string content (the model's image placeholder where each image goes) and the
        chat's images in order; other messages pass unchanged (``check_messages`` judges them)."""
        if not isinstance(messages, (list, tuple)):
            return messages, ()
        out, images = [], []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                text, found = self.prompt_from_parts(prompt_parts(i, m["content"]), f"messages[{i}].content")
                m = {**m, "content": text}
                images += found
            out.append(m)
        return out, tuple(images)

    async def _plan_within_limits(self, request: ExplainRequest, record: _CallRecord):
        """The request's plan (None when its target is generated first), within the limits.

        Every limit is checked before the work it bounds (core's PlanLimits);
        planning runs on the engine's planning threads and stops when this
        call is cancelled (client gone, deadline passed).
        """
        if request.target or request.target_token_ids is not None:
            plan = await self.llm.plan_async(request, limits=self.plan_limits)
            record.tokens, record.units = plan.num_tokens, plan.num_units
            return plan
        record.tokens, record.units = self.llm.prompt_tokens(request), 0
        self.plan_limits.check_tokens(record.tokens)
        return None

    # --- explain -----------------------------------------------------------------

    @contextmanager
    def _recorded(self, record: _CallRecord) -> Iterator[None]:
        """Log line and metrics for one explain call; errors leave as ServiceError."""
        started = time.monotonic()
        try:
            yield
        except asyncio.CancelledError:
            record.status = cancelled_status(record.deadline)
            raise
        except Exception as exc:
            error = service_error_from(exc, request_id=record.request_id)
            record.status = error.code.name
            raise error from exc
        finally:
            elapsed = time.monotonic() - started
            m = self.metrics
            m.explain_requests.labels(record.transport, record.status).inc()
            line = {"event": "explain", "id": record.request_id, "transport": record.transport,
                    "status": record.status, "units": record.units, "tokens": record.tokens,
                    "elapsed_s": round(elapsed, 4)}
            if record.result is not None:
                stats = record.result.stats
                m.explain_forks.inc(stats.forward_passes)
                m.explain_computed_tokens.inc(stats.computed_tokens)
                m.explain_cached_tokens.inc(stats.cached_tokens)
                m.explain_latency.observe(elapsed)
                line.update(forks=stats.forward_passes, computed_tokens=stats.computed_tokens,
                            cached_tokens=stats.cached_tokens)
            if self.log_prompts and record.prompt is not None:
                line["prompt"] = record.prompt
            request_log.info(json.dumps(line))

    async def _run_explain(self, request: ExplainRequest, record: _CallRecord,
                           on_progress: Callable[[int, int], None] | None) -> ExplainResult:
        plan = await self._plan_within_limits(request, record)
        record.result = await self.llm.explain(request, plan=plan, request_id=record.request_id,
                                               on_progress=on_progress)
        return record.result

    async def explain(self, parse: Callable[[], ExplainRequest], *, transport: str,
                      deadline_s: float | None = None,
                      on_progress: Callable[[int, int], None] | None = None) -> ExplainResult:
        """Explain what ``parse()`` returns (it may raise: bad input is counted and logged too)."""
        record = _CallRecord(new_request_id("explain"), transport, deadline=absolute_deadline(deadline_s))
        with self._recorded(record):
            request = parse()
            record.prompt = request.prompt
            with self.slots.hold():
                async with asyncio.timeout(deadline_s):
                    return await self._run_explain(request, record, on_progress)

    def explain_events(self, parse: Callable[[], ExplainRequest], *, transport: str,
                       deadline_s: float | None = None) -> AsyncIterator[ExplainProgress | ExplainResult]:
        """Progress events, then the result."""

        async def produce(emit):
            return await self.explain(parse, transport=transport, deadline_s=deadline_s,
                                      on_progress=lambda done, total: emit(ExplainProgress(done, total)))

        return _stream(produce)

    # --- generate -----------------------------------------------------------------

    def _check_generate(self, p: GenerateParams) -> GenerateParams:
        check_text("prompt", p.prompt)
        self.plan_limits.check_text("prompt", p.prompt)
        if not 1 <= p.max_tokens <= self.limits.max_generate_tokens:
            raise invalid("max_tokens", f"must be between 1 and {self.limits.max_generate_tokens}, got {p.max_tokens}")
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            raise invalid("temperature", f"must be finite and >= 0, got {p.temperature}")
        if p.explain_options is None:
            return p
        options = p.explain_options.validated()
        prompt_tokens = len(self.llm.tokenizer.encode(p.prompt)[0])
        if prompt_tokens + p.max_tokens > self.limits.max_explain_tokens:
            raise invalid("max_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({p.max_tokens}) exceed the "
                                        f"{self.limits.max_explain_tokens} tokens this server explains "
                                        "(--max-explain-tokens); lower max_tokens or shorten the prompt")
        return dataclasses.replace(p, explain_options=options)

    def generate(self, params: GenerateParams, *, transport: str, deadline_s: float | None = None
                 ) -> AsyncIterator[object]:
        """GenerationDelta events; with explain_options, ExplainProgress events and the ExplainResult."""
        request_id = new_request_id("generate")
        deadline = absolute_deadline(deadline_s)

        async def produce(emit):
            status = "OK"
            try:
                p = self._check_generate(params)
                explaining = p.explain_options is not None
                # The slot is taken before generating, so a busy server refuses at once
                # instead of after the caller has waited for the completion.
                with self.slots.hold() if explaining else nullcontext():
                    async with asyncio.timeout(deadline_s):
                        completion = await self._stream_generation(p, request_id, emit)
                        if not explaining:
                            return None
                        try:
                            answer = self.llm.answer_ids(completion)
                        except InvalidRequestError:
                            raise invalid("explain", "the completion is empty (the model stopped at once); "
                                                     "nothing to explain") from None
                        # The generated ids themselves are scored, never a re-tokenized copy of their text.
                        request = ExplainRequest(p.prompt, "", p.explain_options, target_token_ids=answer,
                                                 images=self.llm.prompt_images(p.images))
                        record = _CallRecord(f"{request_id}-explain", transport, p.prompt, deadline=deadline)
                        with self._recorded(record):
                            return await self._run_explain(
                                request, record, lambda done, total: emit(ExplainProgress(done, total)))
            except asyncio.CancelledError:
                status = cancelled_status(deadline)
                raise
            except Exception as exc:
                error = service_error_from(exc, request_id=request_id)
                status = error.code.name
                raise error from exc
            finally:
                self.metrics.generate_requests.labels(status).inc()

        return _stream(produce)

    async def _stream_generation(self, p: GenerateParams, request_id: str, emit) -> list[int]:
        """The generated token ids (each delta emitted as it comes)."""
        completion: list[int] = []
        try:
            async for delta in self.llm.generate(
                p.prompt, max_tokens=p.max_tokens, temperature=p.temperature, seed=p.seed,
                controls=p.controls, control_mode=p.control_mode, control_kappa=p.control_kappa,
                control_overlap=p.control_overlap, request_id=request_id, images=p.images,
            ):
                self.metrics.generated_tokens.inc(len(delta.token_ids))
                completion += delta.token_ids
                emit(delta)
        except InvalidRequestError as exc:
            # The engine names control options by their Python API names.
            field = CONTROL_FIELD_NAMES.get(exc.field, exc.field)
            raise invalid(field, exc.message) from exc
        return completion

    # --- tokenize and info ------------------------------------------------------

    def tokenize(self, text: str) -> list[TokenSpan]:
        check_text("text", text, allow_empty=True)
        ids, offsets = self.llm.tokenizer.encode(text)
        return [TokenSpan(int(i), s, e - s, text[s:e]) for i, (s, e) in zip(ids, offsets)]

    async def server_info(self) -> ServerStatus:
        config = self.llm.vllm_config
        return ServerStatus(
            model=self.llm.model_name,
            max_model_len=config.model_config.max_model_len,
            limits=self.limits,
            versions=self._versions,
            explains_in_flight=self.slots.in_use,
            free_kv_blocks=await self.llm.num_free_kv_blocks(),
            kv_block_size=config.cache_config.block_size,
        )


_DONE = object()


async def _stream(produce: Callable[[Callable[[object], None]], Awaitable[object | None]]) -> AsyncIterator[object]:
    """Run ``produce(emit)`` in its own task; yield what it emits, then what it returns.

    The producer runs in a task of its own so its deadline (asyncio.timeout)
    never fires inside the consumer's code between two events; if the
    consumer goes away (client cancelled), the producer is cancelled, which
    aborts every engine request it had running.
    """
    queue: asyncio.Queue = asyncio.Queue()
    task = asyncio.create_task(produce(queue.put_nowait))
    task.add_done_callback(lambda _: queue.put_nowait(_DONE))
    try:
        while (item := await queue.get()) is not _DONE:
            yield item
        final = task.result()
        if final is not None:
            yield final
    finally:
        if not task.done():
            task.cancel()
        # Retrieve its outcome even when the consumer left first (a slot refusal the
        # client never read): otherwise asyncio logs "exception was never retrieved".
        await asyncio.gather(task, return_exceptions=True)
