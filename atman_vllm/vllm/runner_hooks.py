"""The model-runner side of AtMan: per-step biases and target scoring.

Two hooks on vLLM's GPUModelRunner (which the CPU runner subclasses):

- after ``_build_attention_metadata`` the step's perturbed batch rows and
  their key biases (``KeyBiasCSR``) are attached to every attention metadata object;
- after ``_get_prompt_logprobs_dict`` the target tokens' cross-entropies are
  computed from the hidden states at the target positions only (one logits
  row per target token, never a vocabulary-sized vector per prompt position),
  accumulated over prefill chunks, and handed to ``sample_tokens``'s output
  in ``prompt_token_id_logprobs_dict`` — a per-request tensor channel that
  vLLM carries unchanged to ``RequestOutput.prompt_token_id_logprobs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from atman_vllm.kernels.key_bias import KeyBiasCSR

from .biased_attention import BATCH_BIAS_ATTR
from .wire import AtmanRequestInfo, request_info

log = logging.getLogger(__name__)

_WORKER_ATTR = "_atman_worker_request"
_CE_ATTR = "_atman_target_ce"
_PENDING_ATTR = "_atman_pending_scores"
_MISSING = object()


@dataclass(frozen=True)
class WorkerRequest:
    info: AtmanRequestInfo
    bias: KeyBiasCSR | None  # the request's own bias, a batch of one sequence


def worker_request(state) -> WorkerRequest | None:
    """A request's AtMan data with its bias as tensors, built once and kept on the request state."""
    cached = state.__dict__.get(_WORKER_ATTR, _MISSING)
    if cached is _MISSING:
        info = request_info(state)
        cached = None if info is None else WorkerRequest(
            info, KeyBiasCSR.from_key_biases([info.bias]) if info.bias is not None else None)
        state.__dict__[_WORKER_ATTR] = cached
    return cached


def batch_key_biases(runner) -> dict[int, KeyBiasCSR]:
    batch: dict[int, KeyBiasCSR] = {}
    for row, req_id in enumerate(runner.input_batch.req_ids[: runner.input_batch.num_reqs]):
        parsed = worker_request(runner.requests[req_id])
        if parsed is not None and parsed.bias is not None:
            batch[row] = parsed.bias
    return batch


def _attach(attn_metadata, batch_bias) -> None:
    groups = attn_metadata if isinstance(attn_metadata, list) else [attn_metadata]
    for group in groups:
        for md in {id(m): m for m in group.values()}.values():
            setattr(md, BATCH_BIAS_ATTR, batch_bias)


def score_target_tokens(runner, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]) -> dict[str, torch.Tensor]:
    """Cross-entropies of target tokens for the scoring requests of this step.

    Returns the finished requests' full ``[T]`` vectors; partial prefill
    chunks accumulate on the request state until the last chunk. A position
    that was not computed (or a non-finite score) stays NaN: the front end
    fails that request alone (``forks.fork_result``); nothing here raises.
    """
    finished: dict[str, torch.Tensor] = {}
    for req_id, num_tokens in num_scheduled_tokens.items():
        state = runner.requests.get(req_id)
        parsed = worker_request(state) if state is not None else None
        if parsed is None or parsed.info.target_start is None:
            continue
        target_start = parsed.info.target_start
        prompt_ids = state.prompt_token_ids
        num_prompt = len(prompt_ids)
        start = state.num_computed_tokens
        if start >= num_prompt:
            continue  # decoding; the target was scored during prefill
        ce = state.__dict__.get(_CE_ATTR)
        if ce is None:
            ce = torch.full((num_prompt - target_start,), float("nan"), dtype=torch.float64)
            state.__dict__[_CE_ATTR] = ce
        # Position p's logits predict token p + 1; the target needs p in [target_start - 1, num_prompt - 2].
        lo = max(start, target_start - 1)
        hi = min(start + num_tokens, num_prompt - 1)
        if hi > lo:
            offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
            rows = hidden_states[offset + lo - start: offset + hi - start]
            # Under TP compute_logits is a collective (every rank calls it for the same rows, as every
            # rank sees the same batch); it all-gathers the vocabulary shards, except on platforms
            # that gather to the driver only, where the other ranks get None: their scores are
            # never read (only the driver's runner output reaches the engine core).
            logits = runner.model.compute_logits(rows)
            if logits is None:
                continue
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            targets = torch.tensor(prompt_ids[lo + 1: hi + 1], dtype=torch.long, device=logprobs.device)
            picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
            ce[lo + 1 - target_start: hi + 1 - target_start] = -picked.double().cpu()
        if start + num_tokens >= num_prompt:
            finished[req_id] = ce
            del state.__dict__[_CE_ATTR]
    return finished


def install(runner_cls) -> None:
    """Wrap the three runner methods once; idempotent."""
    if getattr(runner_cls, "_atman_hooks_installed", False):
        return
    from vllm.v1.outputs import ModelRunnerOutput

    from .seams import expect_fields, expect_function

    build = expect_function("runner_hooks", runner_cls, "_build_attention_metadata", ("num_tokens", "num_reqs"))
    prompt_logprobs = expect_function("runner_hooks", runner_cls, "_get_prompt_logprobs_dict",
                                      ("hidden_states", "num_scheduled_tokens"))
    sample_tokens = expect_function("runner_hooks", runner_cls, "sample_tokens", ("grammar_output",))
    expect_fields("runner_hooks", ModelRunnerOutput, ("req_ids", "prompt_token_id_logprobs_dict"))

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_metadata = build(self, *args, **kwargs)
        if attn_metadata:
            _attach(attn_metadata, batch_key_biases(self))
        return attn_metadata, spec_metadata

    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        result = prompt_logprobs(self, hidden_states, num_scheduled_tokens)
        scores = score_target_tokens(self, hidden_states, num_scheduled_tokens)
        if scores:
            self.__dict__.setdefault(_PENDING_ATTR, {}).update(scores)
        return result

    def _sample_tokens(self, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)
        pending = self.__dict__.pop(_PENDING_ATTR, None)
        if pending:
            if isinstance(output, ModelRunnerOutput):
                output.prompt_token_id_logprobs_dict.update(pending)
            else:  # async scheduling: the front end reports "no target scores" for these requests
                log.error("atman: runner output %s cannot carry target scores; dropped for %s",
                          type(output).__name__, sorted(pending))
        return output

    runner_cls._build_attention_metadata = _build_attention_metadata
    runner_cls._get_prompt_logprobs_dict = _get_prompt_logprobs_dict
    runner_cls.sample_tokens = _sample_tokens
    runner_cls._atman_hooks_installed = True
