"""Turning ForkJobs into engine requests and engine outputs into ForkResults.

Shared by the synchronous (vllm.LLM) and asynchronous (AsyncLLM) APIs. The
unperturbed run of an explanation must finish before its forks start: only
then are its KV blocks committed to the prefix cache for the forks to reuse
(the order, and the data-parallel replica of each run: ``parallel.fork_waves``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from atman_vllm.core.images import EncodedImage
from atman_vllm.core.jobs import ForkJob, ForkResult, KeyBias

from .wire import AtmanRequestInfo


@dataclass(frozen=True)
class EngineRequest:
    prompt: TokensPrompt
    params: SamplingParams


def check_multimodal_seams() -> None:
    """What the image path uses of vLLM (docs/vllm_touchpoints.md, row 24), checked at start-up."""
    from vllm.config.multimodal import MultiModalConfig

    from .seams import expect_function, expect_keys

    expect_keys("multimodal", TokensPrompt, ("prompt_token_ids", "multi_modal_data", "multi_modal_uuids"))
    expect_function("multimodal", MultiModalConfig, "get_limit_per_prompt", ("modality",))


def engine_prompt(token_ids, images: tuple[EncodedImage, ...] = (), placeholder_ids: tuple[int, ...] = ()) -> TokensPrompt:
    """The engine's prompt for a sequence whose images are expanded (core/images.py): each image's
    tokens go back to its placeholder's ids and its pixels ride along, so vLLM's processor expands
    it again, runs the vision encoder, and keys the image's prefix-cache blocks by its hash
    (``multi_modal_uuids``: the pixels' sha256, so forks do not re-hash the pixels)."""
    if not images:
        return TokensPrompt(prompt_token_ids=list(token_ids))
    if not placeholder_ids:
        raise ValueError("a prompt with images needs the model's placeholder ids")
    ids, pos = [], 0
    for im in images:
        ids += list(token_ids[pos:im.token_start]) + list(placeholder_ids)
        pos = im.token_end
    ids += list(token_ids[pos:])
    return TokensPrompt(prompt_token_ids=ids, multi_modal_data={"image": [im.image.data for im in images]},
                        multi_modal_uuids={"image": [im.image.digest for im in images]})


def fork_request(job: ForkJob, placeholder_ids: tuple[int, ...] = ()) -> EngineRequest:
    """One forward pass scoring the target: max_tokens=1, nothing detokenized."""
    info = AtmanRequestInfo(job.bias, job.target_start, nonce=uuid.uuid4().hex)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, extra_args=info.to_extra_args())
    return EngineRequest(engine_prompt(job.token_ids, job.images, placeholder_ids), params)


def fork_result(job: ForkJob, output) -> ForkResult:
    ce = output.prompt_token_id_logprobs
    if ce is None:
        raise RuntimeError("the engine returned no target scores: is the atman vLLM plugin installed?")
    if job.images and list(output.prompt_token_ids or ()) != list(job.token_ids):
        # Bias positions and the target start index the expansion planned here: vLLM's must be the same.
        raise RuntimeError("vLLM expanded the prompt's images into other tokens than planned "
                           f"({len(output.prompt_token_ids or ())} vs {len(job.token_ids)} tokens)")
    ce = np.asarray(ce, dtype=np.float64)
    if ce.shape != (job.num_targets,) or not np.all(np.isfinite(ce)):
        # The worker leaves a position NaN when it was not computed; it never raises in a step.
        raise RuntimeError(f"the engine returned {ce.shape[0] if ce.ndim == 1 else ce.shape} target scores with "
                           f"{int(np.sum(~np.isfinite(ce)))} missing or non-finite, for {job.num_targets} targets")
    cached = int(output.num_cached_tokens or 0)
    return ForkResult(ce, computed_tokens=len(job.token_ids) - cached, cached_tokens=cached)


def controlled_params(bias: KeyBias | None, **sampling) -> SamplingParams:
    """Sampling parameters of a generation steered by attention controls."""
    extra = AtmanRequestInfo(bias).to_extra_args() if bias is not None else None
    return SamplingParams(extra_args=extra, **sampling)


def fork_cost(job: ForkJob, block_size: int) -> int:
    """Token positions the engine computes for ``job``: everything from the first
    perturbed block on (the blocks before it come from the prefix cache)."""
    if job.bias is None:
        return len(job.token_ids)
    return len(job.token_ids) - (job.bias.first_position // block_size) * block_size


class ForkBudget:
    """An engine-wide cap on the token positions that explanation forks have in flight.

    Forks share each engine step with generation; without a cap, a few
    explanations put thousands of prefill positions into every step and every
    generation's per-token latency grows with them (priority scheduling orders
    the waiting queue, but does not limit what running requests add to a
    step). A fork larger than the whole budget runs alone. None: no cap.
    """

    def __init__(self, tokens: int | None):
        if tokens is not None and tokens < 1:
            raise ValueError("the fork token budget must be >= 1 or None")
        self.capacity = tokens
        self.in_use = 0
        self._changed: asyncio.Condition | None = None  # made in the running loop

    @asynccontextmanager
    async def hold(self, tokens: int) -> AsyncIterator[None]:
        if self.capacity is None:
            yield
            return
        tokens = min(tokens, self.capacity)
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use + tokens <= self.capacity)
            self.in_use += tokens
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= tokens
                self._changed.notify_all()
