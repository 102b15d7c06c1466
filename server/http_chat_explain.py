"""The ``explain`` extra field of ``POST /v1/chat/completions``: the completion's explanation beside it.

``{"explain": true}`` (or an options object, as ``/v1/explain``'s ``options``)
on a non-streaming chat completion adds a top-level ``explanation`` (the JSON
contract of ``/v1/explain``, for the chat) to vLLM's reply. vLLM's own route
generates; the body is only told to return the token ids
(``return_token_ids``), and the reply hook explains exactly those ids after
exactly the prompt ids vLLM ran, right after the generation, so the
unperturbed pass and the forks reuse the generation's blocks from the prefix
cache. Everything that can be refused is refused before anything generates:
the messages (as ``/v1/explain`` checks them), streaming, n > 1, and a
rendering that differs from the model's chat template's (tools, template
kwargs: unit spans could not be placed). A chat's ``image_url`` parts (data
URLs) are its images: their tiles are units beside the messages' words.
"""

from __future__ import annotations

import dataclasses

from atman_vllm.core.options import InvalidRequestError
from atman_vllm.core.requests import ExplainRequest

from .errors import invalid
from .http_bodies import parse_explain_field
from .http_guard import Rewritten
from .service import AtmanService

EXPLAIN_FIELD = "explain"
# Body fields under which vLLM's reply would not be one completion of the rendered chat prompt.
_REFUSED = {"stream": "the explanation comes with the whole completion; send a non-streaming request",
            "use_beam_search": "beam search is not explained", "echo": "echo is not explained",
            "continue_final_message": "the explained answer is a new assistant turn"}


class ChatExplain:
    """Body rewriter of ``/v1/chat/completions``: takes ``explain`` out, then hands on to ``inner``
    (the controls' rewriter), and explains the reply."""

    def __init__(self, llm, service: AtmanService, planner):
        self.llm = llm
        self.service = service
        self.planner = planner  # ControlPlanner: steering controls, and vLLM's own rendering of a chat

    async def rewrite(self, path: str, data):
        if not isinstance(data, dict) or EXPLAIN_FIELD not in data:
            return await self.planner.rewrite(path, data)
        options = parse_explain_field(data.pop(EXPLAIN_FIELD))
        if options is None:
            return await self.planner.rewrite(path, data) or data
        for name, why in _REFUSED.items():
            if data.get(name) not in (None, False):
                raise invalid(EXPLAIN_FIELD, f"cannot be combined with {name}: {why}")
        if data.get("n") not in (None, 1):
            raise invalid(EXPLAIN_FIELD, f"explains one completion; n must be 1, got {data.get('n')!r}")
        if data.get("add_generation_prompt") is False:
            raise invalid(EXPLAIN_FIELD, "cannot be combined with add_generation_prompt=false: the explained "
                                         "answer is a new assistant turn")
        request = self.service.explain_request(None, "", options, data.get("model"), data.get("messages"),
                                               generated=True)
        self._check_budget(request, data)
        wanted_ids = data.get("return_token_ids") is True
        data["return_token_ids"] = True
        await self._check_vllm_renders_alike(data, request)
        body = await self.planner.rewrite(path, data) or data

        async def explain_reply(reply: dict) -> dict:
            return await self._explained(reply, request, wanted_ids)

        return Rewritten(body, explain_reply)

    def _check_budget(self, request: ExplainRequest, data: dict) -> None:
        max_tokens = data.get("max_completion_tokens") or data.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            prompt_tokens, limit = self.llm.prompt_tokens(request), self.service.limits.max_explain_tokens
            if prompt_tokens + max_tokens > limit:
                raise invalid("max_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceed the "
                                            f"{limit} tokens this server explains (--max-explain-tokens); lower "
                                            "max_tokens or shorten the messages")

    async def _check_vllm_renders_alike(self, data: dict, request: ExplainRequest) -> None:
        rendered = await self.planner.render_chat(data)
        if rendered is None:
            return  # vLLM refuses the body itself and says why
        # With images vLLM gives only the token ids, image tokens expanded: those must agree.
        text_differs = rendered.text is not None and rendered.text != request.prompt
        if text_differs or rendered.token_ids != self.llm.prompt_ids(request):
            raise invalid(EXPLAIN_FIELD, "vLLM renders this request's chat prompt differently from the model's chat "
                                         "template on the messages alone (tools, chat_template_kwargs, ...), so "
                                         "the explanation's spans could not be placed")

    async def _explained(self, reply: dict, request: ExplainRequest, wanted_ids: bool) -> dict:
        choices = reply.get("choices") or []
        prompt_ids = reply.get("prompt_token_ids")
        if len(choices) != 1 or prompt_ids is None or choices[0].get("token_ids") is None:
            raise RuntimeError("vLLM's chat reply lacks the token ids to explain")
        if tuple(prompt_ids) != self.llm.prompt_ids(request):
            raise RuntimeError("vLLM ran other prompt tokens than the explanation would")
        try:
            answer = self.llm.answer_ids(choices[0]["token_ids"])
        except InvalidRequestError:
            raise invalid(EXPLAIN_FIELD, "the completion is empty (the model stopped at once); nothing to "
                                         "explain") from None
        # The generated ids themselves, after the prompt ids vLLM ran: all in the prefix cache now.
        explained = dataclasses.replace(request, target_token_ids=answer)
        result = await self.service.explain(lambda: explained, transport="http-chat")
        if not wanted_ids:
            reply.pop("prompt_token_ids", None)
            choices[0].pop("token_ids", None)
        reply["explanation"] = result.to_dict()
        return reply
