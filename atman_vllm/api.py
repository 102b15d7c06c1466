"""The Python entry points: AtMan explanations and steered generation on vLLM.

``AtmanLLM`` wraps ``vllm.LLM`` (offline, synchronous); ``AsyncAtmanLLM``
wraps ``AsyncLLM`` for the server. Both plan with ``atman_vllm.core`` and run
the plan's forks through the same engine that generates: the unperturbed
pass first (its KV blocks enter the prefix cache), then all forks together.

    llm = AtmanLLM(model="path/to/model")
    result = llm.explain("Ben likes to eat burgers and", " fries", granularity="word")
    print(result.to_dict())
    # A chat: rendered with the model's template; units are the messages' words.
    result = llm.explain(messages=[{"role": "user", "content": "What is the capital of France?"}],
                         target="The capital of France is Paris.")

Asynchronously, one request builder serves both: ``await allm.explain(allm.explain_request(
messages=[...], target=...))``; an empty target generates the answer first and explains its ids.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import AsyncIterator, Callable, Sequence

import numpy as np

from atman_vllm.vllm.engine_client import close_engine_sockets

from atman_vllm.core import (
    ChatPrompt,
    Control,
    ExplainOptions,
    ExplainRequest,
    ExplainResult,
    Explainer,
    ForkJob,
    ForkResult,
    GenerationDelta,
    HFTokenizer,
    InvalidRequestError,
    Limit,
    Mode,
    PlanLimits,
    check_messages,
    encode_prompt,
    locate_contents,
    plan_prompt_controls,
    plan_explanation,
)
from atman_vllm.core.planning import CancelCheck

# vLLM's priority scheduling (lower value first): an explanation's forks run at
# this priority, ordinary generation at vLLM's default 0, so n + 1 forks never
# push a generation that arrives after them to the back of the queue.
DEFAULT_EXPLAIN_PRIORITY = 1


def _engine_kwargs(model: str, engine_args: dict) -> dict:
    from .vllm.engine_config import supported_engine_kwargs

    return supported_engine_kwargs(model, engine_args)


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    cached_tokens: int  # prompt tokens served from the prefix cache


def _sampling(max_tokens: int, temperature: float, seed: int | None, logprobs: int | None = None) -> dict:
    return {"max_tokens": max_tokens, "temperature": temperature, "seed": seed, "logprobs": logprobs}


class _AtmanEngineMixin:
    """What the sync and async APIs share: tokenizer, embeddings, controls."""

    def _init_common(self, model_dir: str, hf_tokenizer, max_model_len: int) -> None:
        from .vllm.embeddings import EmbeddingTable

        self.tokenizer = HFTokenizer(hf_tokenizer)
        self.max_model_len = max_model_len
        self.model_name = str(model_dir)
        self._embeddings = EmbeddingTable(model_dir) if os.path.isdir(model_dir) else None
        self.chat_template: str | None = None  # None: the tokenizer's own
        self.vision = self._load_vision(model_dir)
        # The ids of the image placeholder: what an image's tokens go back to in the engine's prompt.
        self.placeholder_ids = () if self.vision is None else tuple(self.tokenizer.encode(self.vision.placeholder)[0])

    @staticmethod
    def _load_vision(model_dir: str):
        """The model's image processing (core/images.py: VisionModel) for an Idefics3 directory, else None.
        κ over image cells needs the vision tower's output: loaded from the checkpoint on first use."""
        from .vllm.engine_config import model_type

        if model_type(model_dir) != "idefics3":
            return None
        from transformers import AutoProcessor

        from .imaging import Idefics3Vision, idefics3_features_from_checkpoint

        loaded = []

        def features(pixel_values):
            if not loaded:
                loaded.append(idefics3_features_from_checkpoint(model_dir))
            return loaded[0](pixel_values)

        return Idefics3Vision(AutoProcessor.from_pretrained(model_dir, backend="pil"), features)

    def prompt_images(self, images) -> tuple:
        """The caller's images (PIL images, uint8 arrays or encoded bytes) as core ``PromptImage``s."""
        if images is None or len(images) == 0:
            return ()
        if self.vision is None:
            raise InvalidRequestError("images", f"this model ({self.model_name}) takes no images")
        from .imaging import prompt_images

        return prompt_images(images)

    def set_chat_template(self, chat_template: str | None) -> None:
        """Render chats with this template (a file or inline Jinja, as vLLM's --chat-template) instead
        of the tokenizer's, as vLLM's chat route does when the server is given one."""
        from vllm.renderers.chat_utils import load_chat_template

        self.chat_template = load_chat_template(chat_template)

    # -- requests --------------------------------------------------------------------
    def render_chat(self, messages) -> tuple[str, ChatPrompt]:
        """The prompt text vLLM's chat route runs for ``messages`` (the model's chat template, with the
        generation prompt) and where each message's content sits in it. InvalidRequestError("messages")
        for messages that are not a valid chat or a template that refuses them."""
        checked = check_messages(messages)
        tok = self.tokenizer.tok
        template = self.chat_template or getattr(tok, "chat_template", None)
        if not template:
            raise InvalidRequestError("messages", "this model has no chat template (a server takes one with "
                                                  "--chat-template); explain a plain prompt instead")

        def render(msgs: list[dict]) -> str:
            try:
                text = tok.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True,
                                               tokenize=False)
            except Exception as exc:  # the template's own checks (roles must alternate, ...)
                raise InvalidRequestError("messages", f"the chat template refuses them: {exc}") from None
            if not isinstance(text, str):
                raise InvalidRequestError("messages", "the chat template did not render text")
            return text

        return locate_contents(checked, render)

    def explain_request(self, prompt: str | None = None, target: str = "", options: ExplainOptions | None = None,
                        *, messages=None, images=()) -> ExplainRequest:
        """The request for a prompt or a chat (``messages``, rendered here); every API builds it here.
        ``images``: the prompt's images, one per image placeholder of the prompt (or of the messages'
        contents, in message order), in order."""
        options = options or ExplainOptions()
        if messages is None:
            return ExplainRequest(prompt, target, options, images=self.prompt_images(images))
        if prompt:
            raise InvalidRequestError("messages", "give either a prompt or messages, not both")
        rendered, chat = self.render_chat(messages)
        return ExplainRequest(rendered, target, options, chat=chat, images=self.prompt_images(images))

    def prompt_ids(self, request: ExplainRequest) -> tuple[int, ...]:
        """The token ids the engine runs for the request's prompt (a chat's rendering has no added BOS);
        with images, every image expanded into its tokens."""
        if request.images:
            return self._encode_prompt_with_images(request)[0].token_ids
        return encode_prompt(self.tokenizer, request.prompt, add_bos=request.chat is None).token_ids

    def _encode_prompt_with_images(self, request: ExplainRequest):
        from atman_vllm.core.tokens import encode_prompt_with_images

        if self.vision is None:
            raise InvalidRequestError("images", f"this model ({self.model_name}) takes no images")
        return encode_prompt_with_images(self.tokenizer, request.prompt, request.images, self.vision,
                                         add_bos=request.chat is None)

    def engine_prompt(self, request: ExplainRequest):
        """The engine's prompt to generate after the request's prompt (its images attached)."""
        from .vllm.forks import engine_prompt

        if not request.images:
            return engine_prompt(self.prompt_ids(request))
        encoded, images = self._encode_prompt_with_images(request)
        return engine_prompt(encoded.token_ids, images, self.placeholder_ids)

    def answer_ids(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """Generated ids without the trailing stop token(s) (EOS, a chat's end-of-turn): the answer
        explained is what was generated before it stopped."""
        special = set(getattr(self.tokenizer.tok, "all_special_ids", ()) or ())
        ids = list(token_ids)
        while ids and ids[-1] in special:
            ids.pop()
        if not ids:
            raise InvalidRequestError("target", "the model generated an empty completion to explain")
        return tuple(ids)

    @staticmethod
    def _greedy_params(max_tokens: int):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0.0)

    def embedding_rows(self, token_ids: Sequence[int]) -> np.ndarray | None:
        return self._embeddings.rows(token_ids) if self._embeddings is not None else None

    def plan(self, request: ExplainRequest, *, limits: PlanLimits = PlanLimits(), cancelled: CancelCheck | None = None):
        """The request's plan within ``limits`` and the model's context (InvalidRequestError otherwise)."""
        return plan_explanation(request, self.tokenizer, self.embedding_rows, vision=self.vision,
                                limits=self._within_context(limits), cancelled=cancelled)

    def _within_context(self, limits: PlanLimits) -> PlanLimits:
        # -1: a fork samples one (discarded) token after the sequence.
        context = Limit(self.max_model_len - 1, f"this model serves at most {self.max_model_len - 1} tokens")
        if limits.tokens is None or limits.tokens.value > context.value:
            limits = replace(limits, tokens=context)
        if self.vision is not None:
            engine_images = self.vllm_config.model_config.multimodal_config.get_limit_per_prompt("image")
            if limits.images is None or limits.images.value > engine_images:
                limits = replace(limits, images=Limit(engine_images, "the engine's limit_mm_per_prompt"))
        return limits

    def _self_test_plan(self):
        from .vllm.self_test import self_test_plan

        cache = self.vllm_config.cache_config
        return self_test_plan(self.tokenizer, cache.block_size, bool(cache.enable_prefix_caching))

    @staticmethod
    def _steered_decode_request(plan):
        """Two greedy tokens under the self-test's bias; the second comes from a decode step. EOS
        does not end it: a model that answers in one word (the shapes VLM) would stop after one."""
        from vllm.inputs import TokensPrompt

        from .vllm.forks import controlled_params

        return (TokensPrompt(prompt_token_ids=list(plan.token_ids)),
                controlled_params(plan.bias, **_sampling(2, 0.0, None, 1), ignore_eos=True))

    @staticmethod
    def _second_token(output) -> tuple[tuple[int, ...], float]:
        """The generated ids and the log-probability of the second (decode-step) token."""
        c = output.outputs[0]
        ids = tuple(c.token_ids)
        return ids, c.logprobs[1][ids[1]].logprob

    def _controlled_prompt(self, prompt: str, controls, control_mode, control_kappa, control_overlap, images=()):
        """The engine's prompt (its ``images`` attached) and the bias of ``controls`` (text spans and
        ``ImageControl``s on those images)."""
        from .vllm.forks import engine_prompt

        encoded, located, bias = plan_prompt_controls(prompt, self.tokenizer, controls, control_mode, control_kappa,
                                                      control_overlap, self.embedding_rows,
                                                      self.prompt_images(images), self.vision)
        return engine_prompt(encoded.token_ids, located, self.placeholder_ids), bias


class AtmanLLM(_AtmanEngineMixin, Explainer):
    """AtMan on an offline ``vllm.LLM``. Engine arguments pass through."""

    def __init__(self, model: str, **engine_args):
        from vllm import LLM

        from .models.registry import resolve_model
        from .vllm.parallel import cpu_thread_binding

        model = resolve_model(model)  # a prepared model's name ("smollm2-135m-instruct") -> its directory
        kwargs = _engine_kwargs(model, engine_args)
        with cpu_thread_binding(kwargs):  # TP/PP > 1 on CPU: vLLM's "auto" binding refuses on one NUMA node
            self.llm = LLM(**kwargs)
        self.vllm_config = self.llm.llm_engine.vllm_config
        config = self.vllm_config.model_config
        self._init_common(model, self.llm.get_tokenizer(), config.max_model_len)

    # -- Explainer -----------------------------------------------------------------
    def run_jobs(self, jobs: Sequence[ForkJob]) -> list[ForkResult]:
        from .vllm.forks import fork_request, fork_result
        from .vllm.parallel import fork_waves

        results: list[ForkResult | None] = [None] * len(jobs)
        for wave in fork_waves(jobs):  # one replica: vLLM's offline LLM has no data parallelism for dense models
            if not wave:
                continue
            requests = [fork_request(jobs[r.job], self.placeholder_ids) for r in wave]
            outputs = self.llm.generate([r.prompt for r in requests], [r.params for r in requests], use_tqdm=False)
            for r, out in zip(wave, outputs):
                results[r.job] = fork_result(jobs[r.job], out)
        return results  # type: ignore[return-value]

    def generate_target_ids(self, request: ExplainRequest, max_tokens: int) -> tuple[int, ...]:
        """The greedy completion of the request's prompt as ids (the engine's own, never re-tokenized)."""
        out = self.llm.generate([self.engine_prompt(request)],
                                [self._greedy_params(max_tokens)], use_tqdm=False)[0]
        return self.answer_ids(out.outputs[0].token_ids)

    def self_test(self) -> list[str]:
        """What is not in effect of the plugin's seams (empty: all are); see vllm/self_test.py."""
        from atman_vllm.core.steps import run_steps

        from .vllm.self_test import SteeredDecode, self_test_steps

        def answer(step):
            if isinstance(step, SteeredDecode):
                prompt, params = self._steered_decode_request(step.plan)
                return self._second_token(self.llm.generate([prompt], [params], use_tqdm=False)[0])
            return self.run_jobs(step.jobs)

        try:
            return run_steps(self_test_steps(self._self_test_plan()), answer)
        except RuntimeError as exc:  # e.g. no target scores at all: the runner hooks are missing
            return [f"the self-test's requests failed: {exc}"]

    def explain(self, prompt: str | None = None, target: str | None = None, options=None, *, messages=None,
                images=(), max_tokens: int = 32, **option_kwargs) -> ExplainResult:
        """Explain ``target`` given ``prompt``, or given the chat ``messages`` (a list of {role, content},
        the last from the user; ``target`` is the assistant's answer). With no target, explain the
        greedy completion: its generated token ids themselves are scored. ``images``: PIL images,
        uint8 arrays or encoded bytes, one per image placeholder of the prompt (``<image>`` for
        Idefics3), in order."""
        from atman_vllm.core import make_options

        request = self.explain_request(prompt, target or "", make_options(options, **option_kwargs),
                                       messages=messages, images=images)
        return self.explain_planned(request, generate_tokens=max_tokens if target is None else None)

    # -- generation ----------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], *, max_tokens: int = 64, temperature: float = 0.0,
                 seed: int | None = None, controls: Sequence[Control] = (), control_mode: Mode | str = Mode.LOG_ADDITIVE,
                 control_kappa: float | None = None, control_overlap: str = "partial",
                 images=()) -> list[Generation]:
        """Generate completions, optionally steered by attention ``controls`` on the prompt (text spans,
        and ``ImageControl``s on its ``images``: one per image placeholder, the same for every prompt)."""
        from .vllm.forks import controlled_params

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        engine_prompts, params = [], []
        for p in prompts:
            ep, bias = self._controlled_prompt(p, controls, control_mode, control_kappa, control_overlap, images)
            engine_prompts.append(ep)
            params.append(controlled_params(bias, **_sampling(max_tokens, temperature, seed)))
        outputs = self.llm.generate(engine_prompts, params, use_tqdm=False)
        return [Generation(p, o.outputs[0].text, tuple(o.outputs[0].token_ids), o.outputs[0].finish_reason,
                           int(o.num_cached_tokens or 0)) for p, o in zip(prompts, outputs)]

    def next_token_logprobs(self, prompt: str, *, controls: Sequence[Control] = (), control_mode: Mode | str = Mode.LOG_ADDITIVE,
                            control_kappa: float | None = None, control_overlap: str = "partial",
                            num_logprobs: int = 20, images=()) -> dict[int, float]:
        """Top next-token log-probabilities after ``prompt`` (raw model scores), under controls."""
        from .vllm.forks import controlled_params

        ep, bias = self._controlled_prompt(prompt, controls, control_mode, control_kappa, control_overlap, images)
        params = controlled_params(bias, **_sampling(1, 0.0, None, num_logprobs))
        out = self.llm.generate([ep], [params], use_tqdm=False)[0]
        return {tid: lp.logprob for tid, lp in out.outputs[0].logprobs[0].items()}

    def shutdown(self) -> None:
        """Stop the engine core and its worker processes."""
        self.llm.llm_engine.engine_core.shutdown()
        close_engine_sockets(self.llm.llm_engine.engine_core)

    def kv_block_stats(self) -> dict:
        """Engine-side KV blocks: {"free": n, "total": n} (for leak checks)."""
        core = self.llm.llm_engine.engine_core
        if hasattr(core, "call_utility"):
            return core.call_utility("atman_kv_block_stats")
        return core.engine_core.atman_kv_block_stats()


class AsyncAtmanLLM(_AtmanEngineMixin):
    """AtMan on vLLM's ``AsyncLLM``: the engine the server shares with generation."""

    def __init__(self, engine, model_dir: str, *, explain_priority: int = DEFAULT_EXPLAIN_PRIORITY,
                 planning_threads: int = 2, fork_tokens_in_flight: int | None = None):
        from .vllm.forks import ForkBudget

        self.engine = engine
        self.vllm_config = engine.vllm_config
        self.explain_priority = explain_priority
        self.fork_budget = ForkBudget(fork_tokens_in_flight)
        # Planning has threads of its own, so a slow plan holds up neither the event
        # loop nor anything else that uses asyncio's default executor.
        self._planner = ThreadPoolExecutor(max_workers=planning_threads, thread_name_prefix="atman-plan")
        self._plan_stops: set[threading.Event] = set()
        # vLLM's data-parallel replicas (independent engine cores for a dense model behind this one
        # AsyncLLM); one explanation's forks are spread over all of them (vllm/parallel.py).
        self.replicas = self.vllm_config.parallel_config.data_parallel_size
        self._init_common(model_dir, engine.tokenizer, self.vllm_config.model_config.max_model_len)

    @classmethod
    def from_engine_args(cls, model: str, *, explain_priority: int = DEFAULT_EXPLAIN_PRIORITY,
                         planning_threads: int = 2, fork_tokens_in_flight: int | None = None,
                         **engine_args) -> "AsyncAtmanLLM":
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from .vllm.parallel import cpu_thread_binding

        kwargs = _engine_kwargs(model, engine_args)
        with cpu_thread_binding(kwargs):  # TP/PP/DP > 1 on CPU: vLLM's "auto" binding refuses on one NUMA node
            engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        return cls(engine, model, explain_priority=explain_priority, planning_threads=planning_threads,
                   fork_tokens_in_flight=fork_tokens_in_flight)

    async def plan_async(self, request: ExplainRequest, *, limits: PlanLimits = PlanLimits()):
        """``plan`` on the planning threads. Cancelling the awaiting task (the
        client went away, the deadline passed) stops the plan at its next check."""
        stop = threading.Event()
        self._plan_stops.add(stop)
        future = asyncio.get_running_loop().run_in_executor(
            self._planner, lambda: self.plan(request, limits=limits, cancelled=stop.is_set))
        try:
            return await future
        finally:
            stop.set()  # a no-op once the plan is done
            self._plan_stops.discard(stop)

    def prompt_tokens(self, request: ExplainRequest) -> int:
        """Tokens of a request's prompt as the engine sees it (with BOS for a plain prompt), validating it."""
        return len(self.prompt_ids(request))

    async def _generate_target_ids(self, request: ExplainRequest, max_tokens: int, request_id: str) -> tuple[int, ...]:
        """The greedy completion of the request's prompt as ids (the engine's own, never re-tokenized)."""
        final = None
        async for out in self.engine.generate(self.engine_prompt(request),
                                              self._greedy_params(max_tokens), request_id=request_id):
            final = out
        return self.answer_ids(final.outputs[0].token_ids)

    async def _run_fork(self, run, job: ForkJob, request_id: str):  # run: parallel.ForkRun -> (run, ForkResult)
        from .vllm.forks import fork_cost, fork_request, fork_result

        req = fork_request(job, self.placeholder_ids)
        final = None
        async with self.fork_budget.hold(fork_cost(job, self.vllm_config.cache_config.block_size)):
            async for out in self.engine.generate(req.prompt, req.params, request_id=request_id,
                                                  priority=self.explain_priority, data_parallel_rank=run.replica):
                final = out
        return run, fork_result(job, final)

    async def explain(self, request: ExplainRequest, *, plan=None, request_id: str | None = None,
                      on_progress: Callable[[int, int], None] | None = None, max_tokens: int = 32) -> ExplainResult:
        """Explain one request. An empty target means: generate greedily, then explain that.
        ``plan``: the request's ``plan_async`` result, when the caller already has it.

        Cancelling the awaiting task aborts every fork still running.
        """
        from atman_vllm.core.steps import explanation_steps

        return await self._run_explanation(explanation_steps(request, max_tokens), request, plan, request_id,
                                           on_progress)

    async def explain_many(self, requests: Sequence[ExplainRequest], *, request_id: str | None = None,
                           on_progress: Callable[[int, int], None] | None = None) -> list[ExplainResult]:
        """Explain several requests together (e.g. questions over one document): planned first, then
        each round's forks of all of them at once (``core.steps.lockstep_steps``), so the forks
        suppressing the same document unit run side by side and share its perturbed blocks."""
        from atman_vllm.core.steps import explanation_steps, lockstep_steps

        return await self._run_explanation(lockstep_steps([explanation_steps(r) for r in requests]), None, None,
                                           request_id, on_progress)

    async def _run_explanation(self, steps, given: ExplainRequest | None, plan, request_id: str | None,
                               on_progress: Callable[[int, int], None] | None):
        """Answer an explanation's steps on this engine (``plan``: the caller's plan for ``given``)."""
        from atman_vllm.core.steps import GenerateTarget, PlanRequest, run_steps_async

        request_id = request_id or uuid.uuid4().hex
        # A hierarchical search runs several rounds of forks: progress counts across them (the
        # total grows by each round's passes as it starts), and each round's engine requests get
        # ids of their own.
        rounds = {"n": 0, "done": 0}

        def round_progress(done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(rounds["done"] + done, rounds["done"] + total)

        async def answer(step):
            if isinstance(step, GenerateTarget):
                return await self._generate_target_ids(step.request, step.max_tokens, f"{request_id}-gen")
            if isinstance(step, PlanRequest):
                # The caller's plan is for the request as given, not for one with a generated target.
                return plan if plan is not None and step.request is given else await self.plan_async(step.request)
            round_id = request_id if rounds["n"] == 0 else f"{request_id}-round{rounds['n']}"
            results = await self._run_jobs(step.jobs, round_id, round_progress)
            rounds["n"] += 1
            rounds["done"] += len(step.jobs)
            return results

        return await run_steps_async(steps, answer)

    async def _run_jobs(self, jobs: Sequence[ForkJob], request_id: str,
                        on_progress: Callable[[int, int], None] | None = None) -> list[ForkResult]:
        """Every job, the unperturbed ones first, each on its data-parallel replica (``fork_waves``);
        cancelling aborts every fork still running."""
        from .vllm.parallel import fork_waves

        results: list[ForkResult | None] = [None] * len(jobs)
        warmups: list[ForkResult] = []  # the unperturbed pass repeated on further replicas
        done = 0
        for wave in fork_waves(jobs, self.replicas, self.vllm_config.cache_config.block_size):
            tasks = [asyncio.ensure_future(self._run_fork(run, jobs[run.job], f"{request_id}-{run.job}"
                                                          + ("" if run.primary else f"-r{run.replica}")))
                     for run in wave]
            try:
                for fut in asyncio.as_completed(tasks):
                    run, result = await fut
                    if not run.primary:
                        warmups.append(result)
                        continue
                    results[run.job] = result
                    done += 1
                    if on_progress is not None:
                        on_progress(done, len(jobs))
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        if warmups:  # their cost is the explanation's too: reported with the unperturbed job's
            first = next(i for i, j in enumerate(jobs) if j.bias is None)
            results[first] = replace(results[first],
                                     computed_tokens=results[first].computed_tokens + sum(w.computed_tokens for w in warmups),
                                     cached_tokens=results[first].cached_tokens + sum(w.cached_tokens for w in warmups))
        return results  # type: ignore[return-value]

    async def self_test(self) -> list[str]:
        """What is not in effect of the plugin's seams (empty: all are); see vllm/self_test.py."""
        from atman_vllm.core.steps import run_steps_async

        from .vllm.self_test import SteeredDecode, self_test_steps

        request_id = f"atman-self-test-{uuid.uuid4().hex[:8]}"
        waves = iter(("forks", "decode"))

        async def answer(step):
            if isinstance(step, SteeredDecode):
                final = None
                async for out in self.engine.generate(*self._steered_decode_request(step.plan),
                                                      request_id=f"{request_id}-steer"):
                    final = out
                return self._second_token(final)
            return await self._run_jobs(step.jobs, f"{request_id}-{next(waves)}")

        try:
            return await run_steps_async(self_test_steps(self._self_test_plan()), answer)
        except RuntimeError as exc:  # e.g. no target scores at all: the runner hooks are missing
            return [f"the self-test's requests failed: {exc}"]

    async def generate(self, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                       controls: Sequence[Control] = (), control_mode: Mode | str = Mode.LOG_ADDITIVE,
                       control_kappa: float | None = None, control_overlap: str = "partial",
                       request_id: str | None = None, images=()) -> AsyncIterator[GenerationDelta]:
        from vllm.sampling_params import RequestOutputKind

        from .vllm.forks import controlled_params

        ep, bias = self._controlled_prompt(prompt, controls, control_mode, control_kappa, control_overlap, images)
        params = controlled_params(bias, **_sampling(max_tokens, temperature, seed))
        params.output_kind = RequestOutputKind.DELTA
        text = ""
        async for out in self.engine.generate(ep, params, request_id=request_id or uuid.uuid4().hex):
            c = out.outputs[0]
            text += c.text
            yield GenerationDelta(c.text, tuple(c.token_ids), out.finished, c.finish_reason, text)

    async def kv_block_stats(self) -> dict:
        """Engine-side KV blocks, summed over the data-parallel replicas."""
        if self.replicas == 1:
            return await self.engine.engine_core.call_utility_async("atman_kv_block_stats")
        stats = await self.engine.engine_core.call_utility_all_async("atman_kv_block_stats")
        return {k: sum(s[k] for s in stats) for k in stats[0]}

    async def num_free_kv_blocks(self) -> int:
        return (await self.kv_block_stats())["free"]

    def stop_planning(self) -> None:
        """Stop every running plan at its next check, start no more, and wait for them."""
        for stop in list(self._plan_stops):
            stop.set()
        self._planner.shutdown(wait=True, cancel_futures=True)

    def shutdown(self) -> None:
        self._planner.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
        close_engine_sockets(self.engine.engine_core)
