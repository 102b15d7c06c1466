"""Attention controls on vLLM's completions and chat completions routes.

Completions and chat completions take attention ``controls`` as extra body
fields: ``ControlPlanner.rewrite`` validates them, removes them, and passes
the bias they ask for to the engine through vLLM's standard ``vllm_xargs``
(a payload sealed by this process: see ``atman_vllm.vllm.wire``). It runs as
a body rewriter of ``http_guard.RequestGuard``. On chat completions a control
is a span of a string message content, or ``{image, rect, factor}`` over an
image of the chat (its ``image_url`` parts, in message order).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from atman_vllm.core.chat import split_at_markers
from atman_vllm.core.controls import Control, check_controls, controls_bias, plan_controls
from atman_vllm.core.options import InvalidRequestError
from atman_vllm.core.jobs import KeyBias
from atman_vllm.core.tokens import EncodedPrompt, encode_prompt_with_images
from atman_vllm.vllm.wire import EXTRA_ARGS_KEY, AtmanRequestInfo

from .errors import invalid
from .http_guard import COMPLETIONS_PATH, ReplyInstead
from .chat_media import image_parts
from .service import CONTROL_FIELD_NAMES, AtmanService, check_text

CONTROL_FIELDS = ("controls", "control_mode", "control_kappa", "control_overlap")
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
# Control keys a request may send; "message" only on chat completions.
CONTROL_KEYS = ("start", "length", "factor")
CHAT_CONTROL_KEYS = (*CONTROL_KEYS, "message")
# Fields whose effect would move the prompt's tokens away from the positions the bias names,
# or drop the bias (beam search builds its own sampling parameters, without vllm_xargs).
INCOMPATIBLE_WITH_CONTROLS = ("truncate_prompt_tokens", "prompt_embeds", "use_beam_search")


@dataclass(frozen=True)
class ControlRequest:
    """The control fields of a completions body, before validation."""

    controls: list
    mode: str
    kappa: float | None
    overlap: str

    @classmethod
    def pop_from(cls, data: dict) -> "ControlRequest":
        """Remove the control fields from ``data`` (vLLM must not see them)."""
        fields = {name: data.pop(name, None) for name in CONTROL_FIELDS}
        controls = fields["controls"]
        if controls is None:
            controls = []
        if not isinstance(controls, list):
            raise invalid("controls", f"must be a list of {{start, length, factor}} objects, got "
                                      f"{type(controls).__name__}")
        return cls(controls, fields["control_mode"] or "log-additive", fields["control_kappa"],
                   fields["control_overlap"] or "partial")

    def reject_unknown_keys(self, allowed: tuple[str, ...], indices: range | list[int] | None = None) -> None:
        """400 for a span control with a key outside ``allowed`` (``indices``: only those controls)."""
        for i in range(len(self.controls)) if indices is None else indices:
            c = self.controls[i]
            unknown = sorted(set(c) - set(allowed)) if isinstance(c, dict) else []
            if unknown:
                raise invalid("controls", f"controls[{i}] has the unknown field {unknown[0]!r}; expected "
                                          f"{', '.join(allowed)}")


@dataclass(frozen=True)
class RenderedChat:
    """A chat request's prompt as vLLM renders and tokenizes it for the engine."""

    text: str | None  # None for a prompt with images: vLLM gives only its (expanded) token ids
    token_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...] | None  # char offsets of each token into text; (0, 0) for added specials


def _is_image_control(control) -> bool:
    return isinstance(control, dict) and "image" in control


class ControlPlanner:
    """Turns the controls of a completions / chat completions body into the engine's bias.

    The controls leave the body; the bias goes to the engine through vLLM's
    standard ``vllm_xargs`` (``{"atman": AtmanRequestInfo(bias).to_json()}``),
    which becomes ``SamplingParams.extra_args``. Positions must be those of
    the token ids the engine runs: a completion's text prompt is replaced by
    the ids we planned on; a chat prompt is rendered and tokenized by vLLM's
    own renderer, exactly as its chat handler will do it again.
    """

    def __init__(self, llm, online_renderer, service: AtmanService):
        self.llm = llm
        self.renderer = online_renderer
        self.service = service  # its limits (prompt characters, checked before tokenizing), a chat's images

    async def rewrite(self, path: str, data) -> dict | None:
        """The body vLLM should see instead of the parsed JSON ``data`` (None: pass it on unchanged)."""
        if not isinstance(data, dict) or not any(name in data for name in CONTROL_FIELDS):
            return None
        request = ControlRequest.pop_from(data)
        if request.controls:
            for name in INCOMPATIBLE_WITH_CONTROLS:
                if data.get(name) not in (None, False):
                    raise invalid("controls", f"cannot be combined with {name}")
        try:
            # Mode, kappa and overlap are checked even without controls (as plan_controls does).
            controls_bias(EncodedPrompt((), 0, ()), "", (), request.mode, request.kappa, request.overlap)
            if path == COMPLETIONS_PATH:
                bias = self._steer_completion(data, request)
            else:
                bias = await self._steer_chat(data, request)
        except InvalidRequestError as exc:
            # The core names control options by their Python API names.
            raise invalid(CONTROL_FIELD_NAMES.get(exc.field, exc.field), exc.message) from exc
        if bias is not None:
            xargs = data.get("vllm_xargs")
            if xargs is None:
                xargs = {}
            if not isinstance(xargs, dict):
                raise invalid("vllm_xargs", "must be a JSON object")
            data["vllm_xargs"] = {**xargs, EXTRA_ARGS_KEY: AtmanRequestInfo(bias).to_json()}
        return data

    # --- /v1/completions ------------------------------------------------------------

    def _steer_completion(self, data: dict, request: ControlRequest) -> KeyBias | None:
        request.reject_unknown_keys(CONTROL_KEYS)
        if not request.controls:
            return None
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
            raise invalid("controls", f"apply to one prompt; this request has {len(prompt)} prompts")
        if not isinstance(prompt, str):
            raise invalid("controls", "are character spans of a text prompt; send the prompt as one string")
        if data.get("add_special_tokens") is False:
            raise invalid("controls", "cannot be combined with add_special_tokens=false")
        check_text("prompt", prompt)
        self.service.plan_limits.check_text("prompt", prompt)
        token_ids, bias = plan_controls(prompt, self.llm.tokenizer, request.controls, request.mode,
                                        request.kappa, request.overlap, self.llm.embedding_rows)
        # The engine runs exactly the ids the bias was planned on (vLLM would tokenize
        # the text the same way, BOS included, but this way it cannot differ).
        data["prompt"] = list(token_ids)
        return bias

    # --- /v1/chat/completions -------------------------------------------------------

    async def _steer_chat(self, data: dict, request: ControlRequest) -> KeyBias | None:
        text_controls = [(i, c) for i, c in enumerate(request.controls) if not _is_image_control(c)]
        image_controls = [(i, c) for i, c in enumerate(request.controls) if _is_image_control(c)]
        request.reject_unknown_keys(CHAT_CONTROL_KEYS, [i for i, _ in text_controls])
        if not request.controls:
            return None
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise invalid("controls", "steer chat messages, but the request has none")
        contents, checked = self._text_controls(messages, text_controls)
        num_images = len(image_parts(data))
        images = check_controls([c for _, c in image_controls], 0, image_count=num_images,
                                indices=[i for i, _ in image_controls])
        rendered = await self.render_chat(data)
        if rendered is None:
            return None  # vLLM refuses the body; it says why
        if num_images:
            if request.kappa is not None:
                # As plan_prompt_controls: every cell carries the placeholder's id (docs/design.md).
                raise InvalidRequestError("kappa", "correlated steering (kappa) is not supported for prompts "
                                                   "with images")
            text, starts, encoded, located = self._encode_with_images(messages, rendered)
        else:
            if rendered.text is None or rendered.offsets is None:
                raise invalid("controls", "this model's chat prompts have no text offsets (not rendered as text, "
                                          "or not a fast tokenizer), so character spans cannot be placed")
            text, located = rendered.text, ()
            starts = await self._content_starts(data, contents, text) if contents else {}
            encoded = EncodedPrompt(rendered.token_ids, 0, rendered.offsets)
        # Spans move from message content into the rendered prompt; spans of different
        # messages cannot overlap there, and those of one message were checked above.
        shifted = sorted((Control(c.start + starts[m], c.length, c.factor) for m in checked for c in checked[m]),
                         key=lambda c: c.start)
        special_ids = set(self.llm.tokenizer.tok.all_special_ids)
        # Leading special tokens (the BOS, from the template or add_special_tokens) are
        # never steered, as in plan_controls.
        first = next((i for i, t in enumerate(encoded.token_ids) if t not in special_ids), len(encoded.token_ids))
        encoded = EncodedPrompt(encoded.token_ids, first, encoded.prompt_offsets[first - encoded.prompt_start:])
        return controls_bias(encoded, text, [*shifted, *images], request.mode, request.kappa, request.overlap,
                             self.llm.embedding_rows, located)

    def _text_controls(self, messages: list, text_controls: list) -> tuple[dict[int, str], dict[int, tuple]]:
        """The steered messages' contents and their checked span controls, by message index."""
        groups: dict[int, list[tuple[int, object]]] = {}
        for i, c in text_controls:
            m = len(messages) - 1
            if isinstance(c, dict):
                c = dict(c)
                m = c.pop("message", m)
            if not isinstance(m, int) or isinstance(m, bool) or not 0 <= m < len(messages):
                raise invalid("controls", f"controls[{i}].message must be the index of a message "
                                          f"(0 to {len(messages) - 1}), got {m!r}")
            groups.setdefault(m, []).append((i, c))
        contents: dict[int, str] = {}
        checked: dict[int, tuple[Control, ...]] = {}
        for m, group in sorted(groups.items()):
            content = messages[m].get("content") if isinstance(messages[m], dict) else None
            if not isinstance(content, str):
                raise invalid("controls", f"controls[{group[0][0]}] steers messages[{m}], whose content is not "
                                          "a string; span controls steer string contents (an image of the chat is "
                                          "steered by {image, rect, factor})")
            check_text(f"messages[{m}].content", content, allow_empty=True)
            self.service.plan_limits.check_text(f"messages[{m}].content", content)
            contents[m] = content
            checked[m] = check_controls([c for _, c in group], len(content), text_name=f"messages[{m}].content",
                                        indices=[i for i, _ in group])
        return contents, checked

    def _encode_with_images(self, messages: list, rendered: "RenderedChat"):
        """A chat with images as this server encodes it: rendered with the model's template (each image
        as its placeholder), tokenized with the images expanded; it must be exactly the token ids vLLM
        runs (vLLM gives no text nor offsets for a prompt with images)."""
        if self.llm.vision is None:
            raise invalid("controls", f"this model ({self.llm.model_name}) takes no images")
        chat_messages, image_bytes = self.service.messages_from_parts(messages)
        try:
            text, chat = self.llm.render_chat(chat_messages)
        except InvalidRequestError as exc:
            raise invalid("controls", f"a chat with images is steered as the model's chat template renders its "
                                      f"messages, which fails: {exc.message}") from None
        encoded, located = encode_prompt_with_images(self.llm.tokenizer, text, self.llm.prompt_images(image_bytes),
                                                     self.llm.vision, add_bos=False)
        if encoded.token_ids != rendered.token_ids:
            raise invalid("controls", "vLLM renders this chat differently from the model's chat template on its "
                                      "messages alone (tools, chat_template_kwargs, ...), so the controls cannot "
                                      "be placed")
        return text, dict(enumerate(chat.content_starts)), encoded, located

    async def render_chat(self, data: dict) -> RenderedChat | None:
        """The prompt vLLM's chat handler will run for ``data`` (None: the body is not a valid request)."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        try:
            request = ChatCompletionRequest.model_validate({**data, "return_token_offsets": True})
        except ValidationError:
            return None
        try:
            # Render only: a rendering that is never sent to the engine must not enter the multimodal
            # cache, whose front-end half records what the engine core holds (vLLM's own render-only
            # routes, /tokenize and render, pass skip_mm_cache for this reason).
            result = await self.renderer.render_chat(request, skip_mm_cache=True)
        except Exception as exc:  # what vLLM's handler would have answered
            result = create_error_response(exc)
        if isinstance(result, ErrorResponse):
            raise ReplyInstead(JSONResponse(result.model_dump(), status_code=result.error.code))
        _, (engine_input,) = result
        text, offsets = engine_input.get("prompt"), engine_input.get("prompt_token_offsets")
        return RenderedChat(text if isinstance(text, str) else None,
                            tuple(int(t) for t in engine_input["prompt_token_ids"]),
                            None if offsets is None else tuple((int(s), int(e)) for s, e in offsets))

    async def _content_starts(self, data: dict, contents: dict[int, str], rendered: str) -> dict[int, int]:
        """Where each steered message's content begins in the rendered prompt.

        Searching for the content could find a copy elsewhere (a system prompt
        quoting it); instead the chat is rendered once more with a unique
        marker as each steered message's content. The template must copy the
        content verbatim and once: putting the contents back in place of the
        markers must give exactly the real rendering.
        """
        order = sorted(contents)
        markers = {m: f"ATMANCONTROL{m}X{uuid.uuid4().hex}" for m in order}
        marked = {**data, "messages": [dict(msg, content=markers[m]) if m in markers else msg
                                       for m, msg in enumerate(data["messages"])]}
        try:
            marked_render = await self.render_chat(marked)
        except ReplyInstead:
            marked_render = None
        if marked_render is None:
            raise invalid("controls", f"the chat template does not copy messages[{order[0]}].content into the "
                                      "prompt verbatim and once, so its spans cannot be placed")
        try:
            return split_at_markers(marked_render.text, [markers[m] for m in order], [contents[m] for m in order],
                                    rendered, field="controls", indices=order)
        except InvalidRequestError as exc:
            raise invalid(exc.field, exc.message) from None
