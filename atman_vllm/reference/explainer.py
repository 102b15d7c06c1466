"""AtMan on plain Hugging Face transformers: the executable definition.

Every fork is a full forward pass (no prefix cache) with the per-key bias
applied in every layer and head by ``attention.atman_attention_forward``.
The vLLM fast path is tested against this class.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from atman_vllm.core import ExplainRequest, Explainer, ForkJob, ForkResult, HFTokenizer, KeyBias, Tokenizer
from atman_vllm.core.images import EncodedImage
from atman_vllm.core.tokens import encode_prompt
from atman_vllm.kernels.key_bias import KeyBiasCSR

from .attention import ATTENTION_NAME, key_bias_scope


class ReferenceExplainer(Explainer):
    """AtMan explainer over a float32 transformers causal LM.

    Build it from a model directory, or from an already-loaded model (whose
    attention implementation is switched to the AtMan one: without an active
    bias that is plain eager attention, so the model's outputs do not change)
    and its tokenizer (a transformers tokenizer or a core ``Tokenizer``).
    ``batch_size`` caps how many perturbations of one sequence share a forward pass.
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | Tokenizer | None = None,
        *,
        batch_size: int = 16,
    ):
        if isinstance(model, (str, Path)):
            model_dir = str(model)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=ATTENTION_NAME)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
        else:
            model.set_attn_implementation(ATTENTION_NAME)
            model = model.to(torch.float32)
        if model.config._attn_implementation != ATTENTION_NAME:
            raise ValueError(f"{type(model).__name__} cannot use a custom attention function")
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with an already-loaded model")
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = HFTokenizer(tokenizer)
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    # --- forward passes ----------------------------------------------------

    @torch.no_grad()
    def _logits(self, token_ids: Sequence[int], biases: Sequence[KeyBias | None],
                images: tuple[EncodedImage, ...] = ()) -> torch.Tensor:
        """[len(biases), L, V] float32 logits of the same sequence under each bias (one forward)."""
        length = len(token_ids)
        input_ids = torch.tensor([list(token_ids)] * len(biases), dtype=torch.long)
        outside = [b.positions[-1] for b in biases if b is not None and b.positions and b.positions[-1] >= length]
        if outside:
            raise ValueError(f"bias position {outside[0]} is outside a sequence of {length} tokens")
        embeds = self._input_embeds(input_ids, images)  # outside the bias scope: a vision tower is never biased
        with key_bias_scope(KeyBiasCSR.from_key_biases(biases)):
            return self._forward(input_ids, embeds)

    def _input_embeds(self, input_ids: torch.Tensor, images: tuple[EncodedImage, ...]) -> torch.Tensor | None:
        """The decoder's input embeddings when they are not its token embeddings (images); None here."""
        if images:
            raise ValueError(f"{type(self).__name__} takes no images")
        return None

    def _forward(self, input_ids: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def run_jobs(self, jobs: Sequence[ForkJob]) -> list[ForkResult]:
        by_sequence: dict[tuple, list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            if not 1 <= job.target_start < len(job.token_ids):
                raise ValueError(f"target_start {job.target_start} outside 1..{len(job.token_ids) - 1}")
            by_sequence[(tuple(job.token_ids), job.images)].append(i)

        results: list[ForkResult | None] = [None] * len(jobs)
        for (token_ids, images), indices in by_sequence.items():
            targets = torch.tensor(token_ids[1:], dtype=torch.long)  # token at p+1 is predicted at position p
            for chunk_start in range(0, len(indices), self.batch_size):
                chunk = indices[chunk_start:chunk_start + self.batch_size]
                logits = self._logits(token_ids, [jobs[i].bias for i in chunk], images)
                logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # float64, as the contract asks
                token_ce = -logprobs.gather(-1, targets.expand(len(chunk), -1)[..., None])[..., 0]  # [b, L-1]
                for row, i in enumerate(chunk):
                    start = jobs[i].target_start
                    results[i] = ForkResult(
                        target_ce=token_ce[row, start - 1:].numpy().copy(),
                        computed_tokens=len(token_ids),
                        cached_tokens=0,
                    )
        return results  # type: ignore[return-value]

    def biased_next_token_logprobs(self, token_ids: Sequence[int], bias: KeyBias | None,
                                   images: tuple[EncodedImage, ...] = ()) -> np.ndarray:
        """[V] float64 log-probabilities of the next token after ``token_ids`` (its ``images`` located in
        them) under ``bias``."""
        logits = self._logits(token_ids, [bias], images)
        return torch.log_softmax(logits[0, -1].double(), dim=-1).numpy()

    def embedding_rows(self, token_ids: Sequence[int]) -> np.ndarray:
        weight = self.model.get_input_embeddings().weight
        return weight.detach()[torch.tensor(list(token_ids), dtype=torch.long)].double().numpy()

    def generate_target_ids(self, request: ExplainRequest, max_tokens: int) -> tuple[int, ...]:
        """Greedy continuation of the request's prompt, stopping at EOS (not included)."""
        ids = list(encode_prompt(self.tokenizer, request.prompt, add_bos=request.chat is None).token_ids)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        generated: list[int] = []
        for _ in range(max_tokens):
            next_id = int(self._logits(ids + generated, [None])[0, -1].argmax())
            if next_id in eos_ids:
                break
            generated.append(next_id)
        return tuple(generated)
