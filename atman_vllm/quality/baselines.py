"""Baseline explanation methods, scored over the same units as AtMan.

Every baseline gives one score per token of the sequence ``[BOS] prompt
target`` for the same model and example; ``unit_scores`` sums the scores of
each unit's tokens (the units come from ``atman_vllm.core.segment_prompt``, so
a unit here is exactly the unit AtMan suppresses). Higher = more important
for the target, as in AtMan's sign convention.

- ``grad-x-input``: gradient of log p(target) w.r.t. the input embeddings,
  times the embeddings, summed over the embedding dimension (Captum
  ``LayerGradientXActivation`` via ``LLMGradientAttribution``).
- ``integrated-gradients``: Captum ``LayerIntegratedGradients`` on the input
  embeddings, baseline = the pad token's embedding at every prompt position
  (BOS kept), ``IG_STEPS`` steps (Riemann trapezoid), summed over dimensions.
- ``ablation``: Captum ``FeatureAblation`` through ``LLMAttribution``: each
  prompt token in turn replaced by the pad token; score = log p(target) −
  log p(target | token ablated).
- ``attention-last``: attention weights of the last layer, averaged over heads
  and over the query rows that predict the target tokens.
- ``attention-rollout`` (Abnar & Zuidema 2020): per layer ``0.5·mean_h A +
  0.5·I`` (rows renormalised), multiplied through the layers; the rows that
  predict the target.
- ``random``: a uniform random score per unit (seeded per example): chance level.

The gradient methods need ``captum`` (the ``bench`` extra).

Cost is counted with hooks on the model: a *forward pass* is one sequence
through the final norm (a batch of b sequences counts b), a *backward pass*
one sequence's gradient flowing back through it. Wall time is per method,
peak memory is the process's resident-set high-water mark (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs`` before the method runs) minus the
resident set before it: the extra memory the method needed, model excluded.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from atman_vllm.core import EncodedInput, ExplainOptions, Granularity, HFTokenizer, Unit, encode_input, segment_prompt

from .tasks import QAExample

IG_STEPS = 32
IG_BATCH = 32


# --------------------------------------------------------------------------- examples and units


@dataclass(frozen=True)
class PreparedExample:
    """An example tokenized as AtMan tokenizes it, with its scored units per granularity."""

    index: int
    example: QAExample
    encoded: EncodedInput
    units: dict[str, tuple[Unit, ...]]  # granularity -> context units (the ones ranked)

    @property
    def length(self) -> int:
        return len(self.encoded.token_ids)


def context_units(example: QAExample, encoded: EncodedInput, granularity: str) -> tuple[Unit, ...]:
    """The prompt units AtMan builds for ``granularity`` that start inside the context.

    Only context units are ranked (ATMAN_SPEC §8 ranks context tokens): the
    question and the "A:" marker are not candidate evidence.
    """
    units, _ = segment_prompt(example.prompt, encoded.prompt_offsets, encoded.prompt_start,
                              ExplainOptions(granularity=Granularity(granularity)).validated())
    return tuple(u for u in units if u.start < len(example.context))


def prepare(examples: Sequence[QAExample], tokenizer: HFTokenizer, granularities: Sequence[str]) -> list[PreparedExample]:
    out = []
    for i, ex in enumerate(examples):
        enc = encode_input(tokenizer, ex.prompt, ex.target)
        out.append(PreparedExample(i, ex, enc, {g: context_units(ex, enc, g) for g in granularities}))
    return out


def unit_scores(token_scores: np.ndarray, units: Sequence[Unit]) -> np.ndarray:
    """Sum of each unit's token scores (``token_scores`` indexed by absolute position)."""
    return np.array([float(np.sum(token_scores[list(u.positions)])) for u in units])


# --------------------------------------------------------------------------- cost


def _rss_kib(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    m = re.search(rf"{field_name}:\s+(\d+)\s+kB", status)
    return int(m.group(1)) if m else 0


class PeakMemory:
    """Extra resident memory of a block: VmHWM after (reset before) minus VmRSS before."""

    def __enter__(self) -> "PeakMemory":
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
            self.supported = True
        except OSError:
            self.supported = False
        self.before_kib = _rss_kib("VmRSS")
        self.peak_bytes = 0
        return self

    def __exit__(self, *exc) -> None:
        if self.supported:
            self.peak_bytes = max(0, _rss_kib("VmHWM") - self.before_kib) * 1024


@dataclass
class Cost:
    """What a method spent on a set of examples."""

    examples: int = 0
    forward_passes: int = 0  # sequences run forward
    backward_passes: int = 0  # sequences back-propagated
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    memory_note: str = "VmHWM-VmRSS (process resident set above its level before the method)"

    def per_example(self) -> dict:
        n = max(1, self.examples)
        return {
            "examples": self.examples,
            "forward_passes_per_example": self.forward_passes / n,
            "backward_passes_per_example": self.backward_passes / n,
            "wall_s_per_example": self.wall_s / n,
            "wall_s_total": self.wall_s,
            "peak_memory_bytes": self.peak_memory_bytes,
            "memory_note": self.memory_note,
        }


class PassCounter:
    """Counts sequences through the model's final norm, forward and backward."""

    def __init__(self, model):
        self.forward = 0
        self.backward = 0
        norm = model.model.norm

        def hook(_module, _inputs, output):
            self.forward += int(output.shape[0])
            if output.requires_grad:
                output.register_hook(self._on_backward)

        self._handle = norm.register_forward_hook(hook)

    def _on_backward(self, grad):
        self.backward += int(grad.shape[0])

    def close(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------- model


class HFModel:
    """The model under explanation, on plain transformers (eager attention: weights visible)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = str(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        for p in self.model.parameters():
            p.requires_grad_(False)  # gradients w.r.t. the inputs only
        self.hf_tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.tokenizer = HFTokenizer(self.hf_tokenizer)
        self.pad_id = self.hf_tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.hf_tokenizer.unk_token_id or 0

    def target_logprob(self, token_ids: Sequence[int], target_start: int) -> float:
        import torch

        ids = torch.tensor([list(token_ids)])
        with torch.no_grad():
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        return float(logp[torch.arange(len(tgt)), tgt][target_start - 1:].sum())


# --------------------------------------------------------------------------- methods


@dataclass
class Baseline:
    """A token-scoring method; ``token_scores`` returns scores indexed by absolute position."""

    name: str
    needs_captum: bool = False
    description: str = ""
    _fn: Callable | None = field(default=None, repr=False)

    def token_scores(self, hf: HFModel, ex: PreparedExample) -> np.ndarray:
        return self._fn(hf, ex)


def _captum_input(hf: HFModel, ex: PreparedExample):
    """Captum's text input for the prompt, checked to tokenize exactly as AtMan does."""
    import torch
    from captum.attr import TextTokenInput

    enc = ex.encoded
    skip = [enc.token_ids[0]] if enc.prompt_start == 1 else None
    inp = TextTokenInput(ex.example.prompt, hf.hf_tokenizer, baselines=int(hf.pad_id), skip_tokens=skip)
    prompt_ids = list(enc.token_ids[:enc.target_start])
    if inp.inp_tensor[0].tolist() != prompt_ids:
        raise ValueError("Captum tokenizes the prompt differently from AtMan")
    if skip and prompt_ids.count(skip[0]) != 1:
        raise ValueError("the BOS id occurs inside the prompt; cannot skip it for Captum")
    target = torch.tensor(list(enc.token_ids[enc.target_start:]))
    return inp, target


def _scatter_prompt(ex: PreparedExample, prompt_scores) -> np.ndarray:
    """Captum scores over the prompt tokens (BOS skipped) to scores by absolute position."""
    out = np.zeros(ex.length)
    vals = np.asarray(prompt_scores.detach().double().cpu().numpy() if hasattr(prompt_scores, "detach") else prompt_scores)
    start = ex.encoded.prompt_start
    out[start:start + len(vals)] = vals
    if start + len(vals) != ex.encoded.target_start:
        raise ValueError("attribution length does not match the prompt")
    return out


def _grad_x_input(hf: HFModel, ex: PreparedExample) -> np.ndarray:
    from captum.attr import LayerGradientXActivation, LLMGradientAttribution

    method = LLMGradientAttribution(LayerGradientXActivation(hf.model, hf.model.get_input_embeddings()), hf.hf_tokenizer)
    inp, target = _captum_input(hf, ex)
    return _scatter_prompt(ex, method.attribute(inp, target=target).seq_attr)


def _integrated_gradients(hf: HFModel, ex: PreparedExample) -> np.ndarray:
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution

    method = LLMGradientAttribution(LayerIntegratedGradients(hf.model, hf.model.get_input_embeddings()), hf.hf_tokenizer)
    inp, target = _captum_input(hf, ex)
    res = method.attribute(inp, target=target, n_steps=IG_STEPS, internal_batch_size=IG_BATCH)
    return _scatter_prompt(ex, res.seq_attr)


def _ablation(hf: HFModel, ex: PreparedExample) -> np.ndarray:
    from captum.attr import FeatureAblation, LLMAttribution

    method = LLMAttribution(FeatureAblation(hf.model), hf.hf_tokenizer)
    inp, target = _captum_input(hf, ex)
    # One pass over prompt+target per ablation (not token by token): same numbers
    # for a model without generation-time state, and what a fair cost count needs.
    # Captum 0.9's sequence-level forward supports one perturbation per pass only.
    res = method.attribute(inp, target=target, forward_in_tokens=False)
    return _scatter_prompt(ex, res.seq_attr)


def _attentions(hf: HFModel, ex: PreparedExample):
    import torch

    ids = torch.tensor([list(ex.encoded.token_ids)])
    with torch.no_grad():
        out = hf.model(input_ids=ids, output_attentions=True)
    return [a[0].double() for a in out.attentions]  # per layer [H, L, L]


def _target_rows(ex: PreparedExample) -> list[int]:
    """Query positions that predict the target tokens."""
    return list(range(ex.encoded.target_start - 1, ex.length - 1))


def _attention_last(hf: HFModel, ex: PreparedExample) -> np.ndarray:
    last = _attentions(hf, ex)[-1].mean(0)  # [L, L]
    return last[_target_rows(ex)].mean(0).numpy()


def _attention_rollout(hf: HFModel, ex: PreparedExample) -> np.ndarray:
    import torch

    rollout = None
    for layer in _attentions(hf, ex):
        a = 0.5 * layer.mean(0) + 0.5 * torch.eye(layer.shape[-1], dtype=layer.dtype)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[_target_rows(ex)].mean(0).numpy()


BASELINES: dict[str, Baseline] = {
    b.name: b for b in (
        Baseline("grad-x-input", True, "gradient x input (Captum)", _grad_x_input),
        Baseline("integrated-gradients", True, f"integrated gradients, {IG_STEPS} steps, pad baseline (Captum)",
                 _integrated_gradients),
        Baseline("ablation", True, "token ablation to pad (Captum FeatureAblation)", _ablation),
        Baseline("attention-last", False, "last layer attention, mean over heads", _attention_last),
        Baseline("attention-rollout", False, "attention rollout (Abnar & Zuidema)", _attention_rollout),
        Baseline("random", False, "uniform random score per unit", None),
    )
}


def random_unit_scores(ex: PreparedExample, granularity: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, ex.index, len(granularity)])
    return rng.random(len(ex.units[granularity]))


@dataclass
class BaselineRun:
    """Unit scores of one baseline for every example and granularity, and its cost."""

    name: str
    scores: dict[str, list[np.ndarray]]  # granularity -> per example
    cost: Cost


def run_baseline(name: str, hf: HFModel, prepared: Sequence[PreparedExample], granularities: Sequence[str],
                 on_example: Callable[[], None] | None = None, seed: int = 0) -> BaselineRun:
    """Run one baseline on every example; token scores are computed once and reused per granularity."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    scores: dict[str, list[np.ndarray]] = {g: [] for g in granularities}
    cost = Cost(examples=len(prepared))
    counter = PassCounter(hf.model)
    try:
        with PeakMemory() as mem:
            started = time.perf_counter()
            for ex in prepared:
                if name == "random":
                    for g in granularities:
                        scores[g].append(random_unit_scores(ex, g, seed))
                else:
                    tok = BASELINES[name].token_scores(hf, ex)
                    for g in granularities:
                        scores[g].append(unit_scores(tok, ex.units[g]))
                if on_example:
                    on_example()
            cost.wall_s = time.perf_counter() - started
        cost.peak_memory_bytes = mem.peak_bytes
        cost.forward_passes, cost.backward_passes = counter.forward, counter.backward
    finally:
        counter.close()
    return BaselineRun(name, scores, cost)
