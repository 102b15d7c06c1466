"""Explanation-quality evaluation: AtMan and baselines on labelled QA examples.

For each method and prompt granularity, every example's context units are
ranked by the method's scores and compared with the evidence (metrics.py).
AtMan runs through an ``Explainer`` backend: the vLLM engine (``AtmanLLM``,
the product path; the numbers reported) or the plain-transformers
``ReferenceExplainer`` (for comparison). Baselines run on plain transformers.

AtMan variants (all with factor 0.1, target granularity "complete"):

    atman              log-additive, no correlated suppression
    atman-kappa        log-additive, correlated suppression kappa = 0.6
    atman-mult         multiplicative
    atman-mult-kappa   multiplicative, kappa = 0.6
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from atman_vllm.core import ExplainOptions, ExplainRequest, ExplainResult, Granularity, Mode

from .baselines import BASELINES, Cost, HFModel, PeakMemory, PreparedExample, prepare, run_baseline
from .metrics import ExampleScore, Summary, score_example, summarize
from .tasks import QAExample

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"
KAPPA = 0.6
GRANULARITIES = ("token", "sentence")


@dataclass(frozen=True)
class AtmanVariant:
    name: str
    mode: Mode
    kappa: float | None

    def options(self, granularity: str) -> ExplainOptions:
        return ExplainOptions(mode=self.mode, kappa=self.kappa, granularity=Granularity(granularity)).validated()


ATMAN_VARIANTS: dict[str, AtmanVariant] = {
    v.name: v for v in (
        AtmanVariant("atman", Mode.LOG_ADDITIVE, None),
        AtmanVariant("atman-kappa", Mode.LOG_ADDITIVE, KAPPA),
        AtmanVariant("atman-mult", Mode.MULTIPLICATIVE, None),
        AtmanVariant("atman-mult-kappa", Mode.MULTIPLICATIVE, KAPPA),
    )
}
METHODS: tuple[str, ...] = tuple(ATMAN_VARIANTS) + tuple(BASELINES)

# vLLM engine settings for evaluation on CPU: in-process engine (starts in
# seconds, and its memory is this process's, so the peak-memory probe sees it),
# float32 like the reference, eager, 32-token blocks, a small KV cache.
VLLM_ENGINE_ARGS = dict(enforce_eager=True, dtype="float32", max_model_len=512, block_size=32,
                        kv_cache_memory_bytes=256 << 20)
ATMAN_CHUNK = 16  # examples per explain_many call (progress granularity; forks batch across them)


@dataclass
class MethodRow:
    """One line of the results table."""

    method: str
    granularity: str
    backend: str  # "vllm", "reference" or "transformers" (baselines)
    summary: Summary
    cost: dict
    per_example: list[dict] = field(default_factory=list)
    # Token units only: ranked against the answer span instead of the evidence
    # sentence (the paper's label; docs/quality.md says why both).
    answer_summary: Summary | None = None

    def to_dict(self) -> dict:
        return {"method": self.method, "granularity": self.granularity, "backend": self.backend,
                "summary": self.summary.to_dict(), "cost": self.cost, "per_example": self.per_example,
                "answer_span_summary": None if self.answer_summary is None else self.answer_summary.to_dict()}


@dataclass
class EvalReport:
    model_dir: str
    data: str
    n_examples: int
    seed: int
    rows: list[MethodRow]
    unit_scores: dict[tuple[str, str], list[np.ndarray]]  # (method, granularity) -> per example
    examples: list[PreparedExample]
    environment: dict

    def to_dict(self) -> dict:
        return {
            "model_dir": self.model_dir, "data": self.data, "n_examples": self.n_examples, "seed": self.seed,
            "environment": self.environment, "rows": [r.to_dict() for r in self.rows],
        }


# --------------------------------------------------------------------------- AtMan


def load_explainer(backend: str, model_dir: str | Path):
    """The AtMan backend: ``AtmanLLM`` on vLLM, or the transformers ``ReferenceExplainer``."""
    if backend == "vllm":
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from atman_vllm.api import AtmanLLM

        return AtmanLLM(str(model_dir), **VLLM_ENGINE_ARGS)
    if backend == "reference":
        from atman_vllm.reference import ReferenceExplainer

        return ReferenceExplainer(str(model_dir))
    raise ValueError(f"unknown backend {backend!r}; expected 'vllm' or 'reference'")


def _match_units(result: ExplainResult, ex: PreparedExample, granularity: str) -> np.ndarray:
    """AtMan's prompt scores for the example's context units (same segmentation, matched by span)."""
    by_span = {(s.start, s.length): s.score for s in result.explanations[0].prompt_scores}
    units = ex.units[granularity]
    try:
        return np.array([by_span[(u.start, u.length)] for u in units], dtype=np.float64)
    except KeyError as e:
        raise ValueError(f"example {ex.index}: AtMan returned no score for unit span {e}; "
                         "its segmentation differs from core.segment_prompt") from None


def timed_explanations(explain_chunk: Callable[[Sequence], list], items: Sequence,
                       match: Callable[[object, object], np.ndarray],
                       on_chunk: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], Cost, dict]:
    """Run AtMan on ``items``, ``ATMAN_CHUNK`` per ``explain_chunk`` call (one ``explain_many``:
    the backend batches forks across them), and ``match(item, result)`` its units' scores.
    Returns the scores, the cost (wall time of the explain calls, forward passes, peak extra
    memory) and the computed / cached tokens."""
    scores: list[np.ndarray] = []
    cost = Cost(examples=len(items))
    tokens = {"computed_tokens": 0, "cached_tokens": 0}
    with PeakMemory() as mem:
        for i in range(0, len(items), ATMAN_CHUNK):
            chunk = items[i:i + ATMAN_CHUNK]
            started = time.perf_counter()
            results = explain_chunk(chunk)
            cost.wall_s += time.perf_counter() - started
            for item, res in zip(chunk, results, strict=True):
                scores.append(match(item, res))
                cost.forward_passes += res.stats.forward_passes
                tokens["computed_tokens"] += res.stats.computed_tokens
                tokens["cached_tokens"] += res.stats.cached_tokens
            if on_chunk:
                on_chunk(len(chunk))
    cost.peak_memory_bytes = mem.peak_bytes
    return scores, cost, tokens


def run_atman(explainer, variant: AtmanVariant, granularity: str, prepared: Sequence[PreparedExample],
              on_chunk: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], Cost, dict]:
    """Scores of one AtMan variant on every example, batched with ``explain_many``."""
    options = variant.options(granularity)
    return timed_explanations(
        lambda chunk: explainer.explain_many([ExplainRequest(ex.example.prompt, ex.example.target, options)
                                              for ex in chunk]),
        prepared, lambda ex, res: _match_units(res, ex, granularity), on_chunk)


# --------------------------------------------------------------------------- evaluation


def _score_rows(method: str, backend: str, granularity: str, prepared: Sequence[PreparedExample],
                scores: Sequence[np.ndarray], cost: dict) -> MethodRow:
    per_example: list[ExampleScore | None] = []
    per_answer: list[ExampleScore | None] = []
    details = []
    for ex, s in zip(prepared, scores):
        spans = [(u.start, u.start + u.length) for u in ex.units[granularity]]
        es = score_example(spans, s, ex.example.evidence_spans, ex.example.qtype)
        per_example.append(es)
        if granularity == "token":
            per_answer.append(score_example(spans, s, ex.example.answer_spans(), ex.example.qtype))
        details.append({"index": ex.index, "qtype": ex.example.qtype,
                        "ap": None if es is None else es.ap, "recall": None if es is None else es.recall})
    answer_summary = summarize(per_answer) if granularity == "token" else None
    return MethodRow(method, granularity, backend, summarize(per_example), cost, details, answer_summary)


def evaluate(examples: Sequence[QAExample], *, model_dir: str | Path = DEFAULT_MODEL_DIR,
             methods: Sequence[str] = METHODS, granularities: Sequence[str] = GRANULARITIES,
             backend: str = "vllm", seed: int = 0, data_name: str = "facts",
             progress: bool = True, explainer=None, threads: int | None = None,
             hf: HFModel | None = None) -> EvalReport:
    """Run every method on ``examples`` and score it.

    ``explainer`` overrides the AtMan backend, ``hf`` the baselines' model
    (both reusable across calls on the same model).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    bad_g = [g for g in granularities if g not in GRANULARITIES]
    if bad_g:
        raise ValueError(f"unknown granularity {', '.join(bad_g)}; expected some of {', '.join(GRANULARITIES)}")
    hf = hf or HFModel(model_dir, threads=threads)
    prepared = prepare(examples, hf.tokenizer, granularities)
    rows: list[MethodRow] = []
    unit_scores: dict[tuple[str, str], list[np.ndarray]] = {}

    atman_methods = [m for m in methods if m in ATMAN_VARIANTS]
    baseline_methods = [m for m in methods if m in BASELINES]
    n_steps = len(prepared) * (len(atman_methods) * len(granularities) + len(baseline_methods))
    with _Progress(progress, n_steps) as bar:
        if atman_methods:
            if explainer is None:
                bar.status(f"starting the {backend} AtMan backend")
                explainer = load_explainer(backend, model_dir)
            # One untimed explanation per granularity first: lazy initialisation
            # (buffers, first-call allocations) is not charged to the first variant.
            for g in granularities:
                explainer.explain(prepared[0].example.prompt, prepared[0].example.target,
                                  ATMAN_VARIANTS[atman_methods[0]].options(g))
            for m in atman_methods:
                for g in granularities:
                    bar.status(f"{m} / {g}")
                    scores, cost, tokens = run_atman(explainer, ATMAN_VARIANTS[m], g, prepared, bar.advance)
                    unit_scores[(m, g)] = scores
                    rows.append(_score_rows(m, backend, g, prepared, scores, {**cost.per_example(), **tokens}))
        if baseline_methods:
            hf.target_logprob(prepared[0].encoded.token_ids, prepared[0].encoded.target_start)  # warm-up
        for m in baseline_methods:
            bar.status(m)
            run = run_baseline(m, hf, prepared, granularities, on_example=lambda: bar.advance(1), seed=seed)
            for g in run.scores:  # unit-level methods run only at their granularities
                unit_scores[(m, g)] = run.scores[g]
                rows.append(_score_rows(m, "transformers", g, prepared, run.scores[g], run.cost.per_example()))
    return EvalReport(str(model_dir), data_name, len(prepared), seed, rows, unit_scores, prepared, _environment(hf))


def _environment(hf: HFModel) -> dict:
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "machine": platform.machine()}


class _Progress:
    """A rich progress bar (or nothing), advanced per example."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled and total > 0
        self.total = total

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), transient=False)
            self._p.__enter__()
            self._task = self._p.add_task("eval", total=self.total)
        return self

    def status(self, text: str) -> None:
        if self.enabled:
            self._p.update(self._task, description=f"eval: {text}")

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self._p.advance(self._task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._p.__exit__(*exc)


# --------------------------------------------------------------------------- output


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def _mib(b: int) -> str:
    return f"{b / (1 << 20):.1f}"


def markdown_table(report: EvalReport) -> str:
    lines = [
        "| method | granularity | backend | mAP | mAR | IQM mAP | IQM mAR | fwd/ex | bwd/ex | wall s/ex | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.rows:
        s, c = r.summary, r.cost
        lines.append(
            f"| {r.method} | {r.granularity} | {r.backend} | {_fmt(s.mAP)} | {_fmt(s.mAR)} | {_fmt(s.iqm_AP)} | "
            f"{_fmt(s.iqm_AR)} | {c['forward_passes_per_example']:.1f} | {c['backward_passes_per_example']:.1f} | "
            f"{c['wall_s_per_example']:.4f} | {_mib(c['peak_memory_bytes'])} |")
    return "\n".join(lines)


def qtype_table(report: EvalReport, granularity: str) -> str:
    rows = [r for r in report.rows if r.granularity == granularity]
    qtypes = sorted({q for r in rows for q in r.summary.by_qtype})
    lines = ["| method | " + " | ".join(qtypes) + " |", "|---|" + "---:|" * len(qtypes)]
    for r in rows:
        cells = [_fmt(r.summary.by_qtype[q].mAP) if q in r.summary.by_qtype else "n/a" for q in qtypes]
        lines.append(f"| {r.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def answer_span_table(report: EvalReport) -> str:
    """Token units ranked against the answer span (the paper's label)."""
    lines = ["| method | mAP | mAR | IQM mAP | IQM mAR |", "|---|---:|---:|---:|---:|"]
    for r in report.rows:
        if r.answer_summary is not None:
            s = r.answer_summary
            lines.append(f"| {r.method} | {_fmt(s.mAP)} | {_fmt(s.mAR)} | {_fmt(s.iqm_AP)} | {_fmt(s.iqm_AR)} |")
    return "\n".join(lines)


def markdown_report(report: EvalReport) -> str:
    parts = [f"# Explanation quality: {report.data}", "",
             f"model `{report.model_dir}`, {report.n_examples} examples, seed {report.seed}", "",
             markdown_table(report), ""]
    if any(r.answer_summary is not None for r in report.rows):
        parts += ["## Token units against the answer span (the paper's label)", "", answer_span_table(report), ""]
    for g in sorted({r.granularity for r in report.rows}):
        parts += [f"## mAP by question type, {g} units", "", qtype_table(report, g), ""]
    return "\n".join(parts)


def write_outputs(report: EvalReport, out_dir: str | Path, html_examples: int = 20) -> dict[str, Path]:
    from .html_view import render_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "markdown": out / "quality.md", "html": out / "examples.html"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    paths["markdown"].write_text(markdown_report(report) + "\n")
    paths["html"].write_text(render_html(report, html_examples))
    return paths
