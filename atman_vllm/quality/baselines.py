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
- ``attnlrp`` (Achtibat et al. 2024, AttnLRP): layer-wise relevance of the
  target logits, computed as gradient × input with the paper's rules as
  gradient modifications: identity rule through RMSNorm's scale and the
  MLP's activation, uniform rule (÷2) through the MLP's gate product and
  through the two matmuls of attention (query and key ÷4, value ÷2). Llama
  models only. The ``lxt`` package (2.1) implements the same but cannot run
  with the transformers here (docs/quality.md says why).
- ``ablation-sentence`` (sentence units only): Captum ``FeatureAblation`` with
  one feature per unit: each sentence's tokens replaced by the pad token
  together; score = drop of log p(target). Leave-one-out at the unit level.
- ``contextcite`` / ``contextcite-matched`` (sentence units only; Cohen-Wang
  et al. 2024): ``CONTEXTCITE_ABLATIONS`` (resp. as many as AtMan's forward
  passes on the example) random ablations, each keeping a context sentence
  with probability 1/2 and deleting the others from the prompt text; the
  target's log-odds per ablation; a Lasso (alpha 0.01, standardised masks) of
  log-odds on the masks; the weights are the scores. That is the
  ``context-cite`` package's algorithm and defaults (but its ablation count
  is 64), which cannot run here itself (docs/quality.md).

The gradient methods need ``captum`` (the ``bench`` extra); ContextCite's
surrogate needs ``scikit-learn`` (also ``bench``).

Cost is counted with hooks on the model: a *forward pass* is one sequence
through the final norm (a batch of b sequences counts b), a *backward pass*
one sequence's gradient flowing back through it. Wall time is per method,
peak memory is the process's resident-set high-water mark (Linux ``VmHWM``,
reset through ``/proc/self/clear_refs`` before the method runs) minus the
resident set before it: the extra memory the method needed, model excluded.
"""

from __future__ import annotations

import functools
import re
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from atman_vllm.core import EncodedInput, ExplainOptions, Granularity, HFTokenizer, Unit, encode_input, segment_prompt

from .tasks import QAExample

IG_STEPS = 32
IG_BATCH = 32
CONTEXTCITE_ABLATIONS = 32
CONTEXTCITE_KEEP = 0.5  # keep probability of a sentence per ablation (the package's ``ablation_keep_prob``)
CONTEXTCITE_ALPHA = 0.01  # the package's Lasso alpha


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

    def __init__(self, model, norm=None):
        self.forward = 0
        self.backward = 0
        norm = model.model.norm if norm is None else norm  # a causal LM's final norm, or the one given

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

    def __init__(self, model_dir: str | Path, threads: int | None = None, ig_steps: int = IG_STEPS):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = str(model_dir)
        self.ig_steps = ig_steps  # integrated gradients' steps: its cost knob on a larger model
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
    """A scoring method.

    Token-level methods (``_fn``) return scores indexed by absolute position,
    summed into every granularity's units. Unit-level methods (``_unit_fn``)
    score the units of one granularity directly and run only for
    ``granularities``.
    """

    name: str
    needs_captum: bool = False
    description: str = ""
    _fn: Callable | None = field(default=None, repr=False)
    _unit_fn: Callable | None = field(default=None, repr=False)
    granularities: tuple[str, ...] = ("token", "sentence")

    def token_scores(self, hf: HFModel, ex: PreparedExample) -> np.ndarray:
        return self._fn(hf, ex)

    def unit_scores(self, hf: HFModel, ex: PreparedExample, granularity: str) -> np.ndarray:
        return self._unit_fn(hf, ex, granularity)


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
    res = method.attribute(inp, target=target, n_steps=hf.ig_steps, internal_batch_size=IG_BATCH)
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


def attention_rollout(attentions, rows: Sequence[int]) -> np.ndarray:
    """Rollout of per-layer attention weights ([H, L, L] each), averaged over the query ``rows``."""
    import torch

    rollout = None
    for layer in attentions:
        a = 0.5 * layer.mean(0) + 0.5 * torch.eye(layer.shape[-1], dtype=layer.dtype)
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[list(rows)].mean(0).numpy()


def _attention_rollout(hf: HFModel, ex: PreparedExample) -> np.ndarray:
    return attention_rollout(_attentions(hf, ex), _target_rows(ex))


# --------------------------------------------------------------------------- AttnLRP


@functools.cache
def _identity_rule_fn():
    """Autograd function: forward ``fn(x)``, backward as if ``fn`` were the linear map x -> (fn(x)/x)·x.

    In gradient × input form this passes each element's relevance straight
    through an element-wise non-linearity (AttnLRP's identity rule).
    """
    import torch

    class IdentityRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, fn, inp):
            out = fn(inp)
            ctx.save_for_backward(out / (inp + torch.where(inp >= 0, 1e-10, -1e-10)))
            return out

        @staticmethod
        def backward(ctx, grad):
            (ratio,) = ctx.saved_tensors
            return None, grad * ratio

    return IdentityRule


def _scale_grad(x, factor: float):
    """Identity forward; gradient divided by ``factor`` (AttnLRP's uniform rule for a product of inputs)."""
    return x.detach() + (x - x.detach()) / factor  # value x, d/dx = 1/factor


class _AttnLRPRules:
    """Context manager: the model's Llama modules run with AttnLRP's gradient rules (forward values unchanged)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        from transformers.models.llama import modeling_llama as ml

        self._saved = []
        for mod in self.model.modules():
            if isinstance(mod, ml.LlamaRMSNorm):
                self._patch(mod, _lrp_rms_norm)
            elif isinstance(mod, ml.LlamaMLP):
                self._patch(mod, _lrp_mlp)
        if not any(isinstance(m, ml.LlamaMLP) for m in self.model.modules()):
            self.__exit__()
            raise ValueError("attnlrp: only Llama models (transformers LlamaForCausalLM) are supported")
        self._ml, self._eager = ml, ml.eager_attention_forward
        eager = self._eager

        def attention(module, query, key, value, *args, **kwargs):
            # softmax(q k^T) v: q and k each share the q k^T product (÷2) and the
            # product with v (÷2); v shares the second product only.
            return eager(module, _scale_grad(query, 4.0), _scale_grad(key, 4.0), _scale_grad(value, 2.0),
                         *args, **kwargs)

        ml.eager_attention_forward = attention  # looked up per call by LlamaAttention.forward
        return self

    def _patch(self, mod, fn):
        self._saved.append(mod)
        mod.forward = types.MethodType(fn, mod)  # this instance only; the class stays as it is

    def __exit__(self, *exc):
        for mod in self._saved:
            del mod.forward  # back to the class's forward
        self._saved = []
        if hasattr(self, "_eager"):
            self._ml.eager_attention_forward = self._eager


def _lrp_rms_norm(self, hidden_states):
    import torch

    dtype = hidden_states.dtype
    h = hidden_states.to(torch.float32)
    # Identity rule: the normalising factor is treated as a constant.
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).detach()
    return self.weight * h.to(dtype)


def _lrp_mlp(self, x):
    gate = _identity_rule_fn().apply(self.act_fn, self.gate_proj(x))
    return self.down_proj(_scale_grad(gate * self.up_proj(x), 2.0))


def _attnlrp(hf: HFModel, ex: PreparedExample) -> np.ndarray:
    import torch

    ids = torch.tensor([list(ex.encoded.token_ids)])
    t0 = ex.encoded.target_start
    emb = hf.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    with _AttnLRPRules(hf.model), torch.enable_grad():
        logits = hf.model(inputs_embeds=emb).logits[0]
        # Relevance of the target tokens' logits (LRP explains a logit, not a probability).
        rows = torch.arange(t0 - 1, ids.shape[1] - 1)
        logits[rows, ids[0, t0:]].sum().backward()
    return (emb.grad[0] * emb[0]).sum(-1).detach().double().numpy()


# --------------------------------------------------------------------------- unit-level methods


def _all_prompt_units(ex: PreparedExample, granularity: str) -> tuple[Unit, ...]:
    units, _ = segment_prompt(ex.example.prompt, ex.encoded.prompt_offsets, ex.encoded.prompt_start,
                              ExplainOptions(granularity=Granularity(granularity)).validated())
    return tuple(units)


def _ablation_units(hf: HFModel, ex: PreparedExample, granularity: str) -> np.ndarray:
    import torch
    from captum.attr import FeatureAblation

    enc = ex.encoded
    t0 = enc.target_start
    target = torch.tensor(list(enc.token_ids[t0:]))

    def logprob(prompt_ids):  # [B, t0] -> [B]
        ids = torch.cat([prompt_ids, target.expand(prompt_ids.shape[0], -1)], 1)
        with torch.no_grad():
            logp = torch.log_softmax(hf.model(input_ids=ids).logits[:, t0 - 1:-1].double(), -1)
        return logp.gather(-1, ids[:, t0:, None])[..., 0].sum(-1)

    units = ex.units[granularity]
    # One feature per context unit; every other prompt position in one extra
    # feature (Captum ablates every feature; its score is ignored).
    mask = torch.full((1, t0), len(units), dtype=torch.long)
    for i, u in enumerate(units):
        mask[0, list(u.positions)] = i
    attr = FeatureAblation(logprob).attribute(torch.tensor([list(enc.token_ids[:t0])]),
                                              baselines=int(hf.pad_id), feature_mask=mask,
                                              perturbations_per_eval=8)
    return np.array([float(attr[0, u.positions[0]]) for u in units])


def _ablated_prompt(prompt: str, units: Sequence[Unit], keep: np.ndarray) -> str:
    """The prompt with the dropped units' text (and the whitespace after each) deleted."""
    out, pos = [], 0
    for u, k in zip(units, keep):
        if k:
            continue
        out.append(prompt[pos:u.start])
        pos = u.start + u.length
        while pos < len(prompt) and prompt[pos].isspace():
            pos += 1
    out.append(prompt[pos:])
    return "".join(out)


def _target_logprobs(hf: HFModel, prompts: Sequence[str], target: str, batch: int = 16) -> np.ndarray:
    """log p(target | prompt) for each prompt, right-padded batches (causal: padding after a row is unseen)."""
    import torch

    from atman_vllm.core import encode_input

    encs = [encode_input(hf.tokenizer, p, target) for p in prompts]
    out = []
    for i in range(0, len(encs), batch):
        chunk = encs[i:i + batch]
        width = max(len(e.token_ids) for e in chunk)
        ids = torch.full((len(chunk), width), int(hf.pad_id), dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, e in enumerate(chunk):
            ids[r, :len(e.token_ids)] = torch.tensor(e.token_ids)
            att[r, :len(e.token_ids)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(hf.model(input_ids=ids, attention_mask=att).logits.double(), -1)
        for r, e in enumerate(chunk):
            pos = torch.arange(e.target_start - 1, len(e.token_ids) - 1)
            out.append(float(logp[r, pos, ids[r, pos + 1]].sum()))
    return np.array(out)


def contextcite_scores(hf: HFModel, ex: PreparedExample, granularity: str, n_ablations: int,
                       seed: int = 0) -> np.ndarray:
    """ContextCite's surrogate weights for the example's context units (see the module docstring)."""
    from sklearn.linear_model import Lasso
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    units = ex.units[granularity]
    rng = np.random.default_rng([seed, ex.index])
    masks = rng.random((n_ablations, len(units))) < CONTEXTCITE_KEEP
    logp = _target_logprobs(hf, [_ablated_prompt(ex.example.prompt, units, m) for m in masks], ex.example.target)
    # Log-odds of the whole target (the package's "logit_prob" output), kept finite when p -> 1.
    log_odds = logp - np.log(np.maximum(-np.expm1(logp), 1e-300))
    n_tokens = ex.length - ex.encoded.target_start
    scaler, lasso = StandardScaler(), Lasso(alpha=CONTEXTCITE_ALPHA, random_state=0, fit_intercept=True)
    make_pipeline(scaler, lasso).fit(masks.astype(np.float32), log_odds / n_tokens)
    return lasso.coef_ / scaler.scale_ * n_tokens


def _contextcite(hf: HFModel, ex: PreparedExample, granularity: str) -> np.ndarray:
    return contextcite_scores(hf, ex, granularity, CONTEXTCITE_ABLATIONS)


def _contextcite_matched(hf: HFModel, ex: PreparedExample, granularity: str) -> np.ndarray:
    # AtMan's forward passes on this example: one per prompt unit plus the unperturbed run.
    return contextcite_scores(hf, ex, granularity, len(_all_prompt_units(ex, granularity)) + 1)


BASELINES: dict[str, Baseline] = {
    b.name: b for b in (
        Baseline("grad-x-input", True, "gradient x input (Captum)", _grad_x_input),
        Baseline("integrated-gradients", True, f"integrated gradients, {IG_STEPS} steps, pad baseline (Captum)",
                 _integrated_gradients),
        Baseline("ablation", True, "token ablation to pad (Captum FeatureAblation)", _ablation),
        Baseline("attention-last", False, "last layer attention, mean over heads", _attention_last),
        Baseline("attention-rollout", False, "attention rollout (Abnar & Zuidema)", _attention_rollout),
        Baseline("random", False, "uniform random score per unit", None),
        Baseline("attnlrp", False, "AttnLRP (gradient x input with the paper's rules), Llama", _attnlrp),
        Baseline("ablation-sentence", True, "each sentence ablated to pad together (Captum FeatureAblation)",
                 None, _ablation_units, ("sentence",)),
        Baseline("contextcite", False, f"ContextCite, {CONTEXTCITE_ABLATIONS} random sentence ablations + Lasso",
                 None, _contextcite, ("sentence",)),
        Baseline("contextcite-matched", False, "ContextCite with as many ablations as AtMan's forward passes",
                 None, _contextcite_matched, ("sentence",)),
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
    method = BASELINES[name]
    if method._unit_fn is not None:
        granularities = [g for g in granularities if g in method.granularities]
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
                elif method._unit_fn is not None:
                    for g in granularities:
                        scores[g].append(method.unit_scores(hf, ex, g))
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
