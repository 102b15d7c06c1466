"""The CPU backend's perturbed-row recompute, chunked (what it does) or one sequence per call.

``AtmanCPUAttentionBackendImpl._overwrite_perturbed_rows`` (atman_vllm/vllm/
backend_cpu.py) recomputes the perturbed sequences of a step in chunks: one
KV gather and one attention call per chunk (``recompute_chunks``). Until
2026-12-03 it looped over the sequences, one gather and ~20 small ops per
sequence and layer. ``use("per-row")`` makes every chunk a single sequence —
the same arithmetic, one call per sequence — so the benchmarks can measure
what batching saves; ``use("chunked")`` restores the backend's own chunking.
(The old loop also built the scores with einsum and repeated KV heads; the
per-row variant already uses the fused attention of the chunked one, so it
understates the gain over the old code.)
"""

from __future__ import annotations

from atman_vllm.vllm import backend_cpu

_CHUNKED = backend_cpu.recompute_chunks


def _per_row(rows, heads):
    return [[r] for r in rows]


VARIANTS = {"chunked": _CHUNKED, "per-row": _per_row}


def use(variant: str) -> None:
    backend_cpu.recompute_chunks = VARIANTS[variant]
