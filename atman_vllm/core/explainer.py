"""The base class every backend reuses: a backend only runs forward passes.

A backend (Hugging Face reference, vLLM) implements ``run_jobs`` (and
``embedding_rows`` if it supports kappa, ``complete`` if it can generate a
target); planning, scoring and the result contract come from here, so all
backends give the same answer for the same cross-entropies.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from .options import ExplainOptions, InvalidRequestError
from .jobs import ForkJob, ForkResult
from .planning import ExplainPlan, plan_explanation
from .requests import ExplainRequest
from .results import ExplainResult
from .steps import GenerateTarget, PlanRequest, Step, explanation_steps, lockstep_steps, run_steps
from .tokens import Tokenizer


def make_options(options: ExplainOptions | None = None, **option_kwargs) -> ExplainOptions:
    """``options`` with ``option_kwargs`` applied on top; an unknown keyword names itself."""
    known = {f.name for f in dataclasses.fields(ExplainOptions)}
    for name in option_kwargs:
        if name not in known:
            raise InvalidRequestError(name, "unknown option")
    if "spans" in option_kwargs and option_kwargs["spans"] is not None:
        option_kwargs["spans"] = tuple(tuple(s) for s in option_kwargs["spans"])
    return dataclasses.replace(options or ExplainOptions(), **option_kwargs)


class Explainer(ABC):
    tokenizer: Tokenizer

    @abstractmethod
    def run_jobs(self, jobs: Sequence[ForkJob]) -> list[ForkResult]:
        """Run every job (any order, any batching) and return one result per job, in job order."""

    def embedding_rows(self, token_ids: Sequence[int]) -> np.ndarray | None:
        """Input-embedding rows [len(token_ids), d] for correlated suppression (kappa); None if unsupported."""
        return None

    def generate_target_ids(self, request: ExplainRequest, max_tokens: int) -> tuple[int, ...]:
        """The token ids of the greedy continuation of the request's prompt (used when a caller
        gives no target): explanations score these ids themselves."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate a target")

    # The backend's image processing (core/images.py: VisionModel); None: the model takes no images.
    vision = None

    def prompt_images(self, images: Sequence) -> tuple:
        """The caller's images as core ``PromptImage``s (backends with a vision model decode them)."""
        if images:
            raise InvalidRequestError("images", f"{type(self).__name__} takes no images")
        return ()

    def plan(self, request: ExplainRequest) -> ExplainPlan:
        return plan_explanation(request, self.tokenizer, self.embedding_rows, vision=self.vision)

    def explain(self, prompt: str, target: str | None, options: ExplainOptions | None = None, *,
                images: Sequence = (), max_tokens: int = 32, **option_kwargs) -> ExplainResult:
        """Explain ``target`` after ``prompt``; ``target=None``: the greedy completion of up to
        ``max_tokens`` tokens, scored as the generated ids. ``images``: the prompt's images, in the
        order of its image placeholders (``prompt_images`` turns the caller's into ``PromptImage``s)."""
        request = ExplainRequest(prompt, target or "", make_options(options, **option_kwargs),
                                 images=self.prompt_images(images))
        return self.explain_planned(request, generate_tokens=max_tokens if target is None else None)

    def explain_planned(self, request: ExplainRequest, *, generate_tokens: int | None = None) -> ExplainResult:
        """The one path every ``explain`` takes: ``core.steps.explanation_steps``, answered here."""
        return run_steps(explanation_steps(request, generate_tokens), self.answer_step)

    def answer_step(self, step: Step):
        if isinstance(step, GenerateTarget):
            return self.generate_target_ids(step.request, step.max_tokens)
        if isinstance(step, PlanRequest):
            return self.plan(step.request)
        return self.run_jobs(step.jobs)

    def explain_many(self, requests: Sequence[ExplainRequest]) -> list[ExplainResult]:
        """Plan all requests (any invalid one fails before anything runs), then run their steps in
        lockstep (``core.steps.lockstep_steps``): each round's forks of every request in one
        ``run_jobs`` call, so the backend can batch across requests (one round for exhaustive
        search; a hierarchical search has several). Each result's ``elapsed_s`` runs from the
        batch's start to that request's last round."""
        return run_steps(lockstep_steps([explanation_steps(r) for r in requests]), self.answer_step)
