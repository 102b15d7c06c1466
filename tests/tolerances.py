"""Float tolerances for the test suite: they follow the dtype's resolution and the values' magnitude.

Two results of the same quantity differ by rounding as soon as they are not computed by the same
sequence of operations: another batch shape (GEMM blocking picks another summation order), another
kernel (vLLM's attention vs. transformers' eager attention), another CPU (oneDNN and MKL choose AMX,
AVX-512 or AVX2 code paths per machine), another thread count. Such a difference is proportional to
the dtype's machine epsilon and to the magnitude of the values the error scales with, so a
comparison allows, everywhere,

    |actual - expected| <= ops * eps(dtype) * scale

- ``eps(dtype)``: the spacing of the dtype's numbers at 1 (float32 1.2e-7, bfloat16 7.8e-3,
  float64 2.2e-16) for the dtype the computation was *done* in: cross-entropies reported in float64
  but computed from float32 logits are float32 values.
- ``scale``: by default the largest ``|expected|``. Where the compared values are differences of
  larger ones, pass the larger magnitude: an AtMan score is a difference of cross-entropies, so its
  rounding error is that of the cross-entropies (~10), not of the score (~0.01). Where ``expected``
  is all zeros the caller must pass ``scale``.
- ``ops``: how many roundings may accumulate, ``ACCUMULATED_OPS`` by default (see there). A short,
  known computation passes its own count (a sum of n terms: n).

A test whose goal is a fixed bound from the spec (vLLM equals the reference within 1e-4) passes
it as ``bound``; the check is then ``|actual - expected| <= max(bound, ops * eps * scale)``: the
spec's goal wherever the dtype can meet it with that margin, never less than its resolution (a
bound of 1e-4 on cross-entropies of 13 is just below 64 eps x 13 = 1.0e-4).

Exact equality (``==``, ``torch.equal``) is used only where both sides are bitwise identical by
construction: the same operations on the same inputs and shapes in the same process, values copied
rather than computed, or exactly representable results of exact operations. Each such test says
why in a comment.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A forward pass of the test models is a chain of a few dozen rounded reductions (embedding, per
# layer norm, 4-7 GEMMs, softmax, residual adds; final norm, LM head, log-softmax), each of which
# may round another way on another CPU or batch shape. Observed on an AMD EPYC (AVX-512): ~1 eps x
# scale for batched vs. one at a time, 2-4 for a 1e-9 factor vs. masking, up to 10 for vLLM vs.
# transformers. 64 leaves a margin of 6x over the largest for other CPUs, and stays about 10x
# below the smallest effect any test checks (1e-3 on cross-entropies of ~10: 64 x 1.2e-7 x 10 = 7.6e-5).
ACCUMULATED_OPS = 64


def eps(dtype: Any) -> float:
    """Machine epsilon of a torch dtype, a numpy dtype or a dtype name ("float32", "bfloat16")."""
    if isinstance(dtype, str) and dtype in ("bfloat16", "torch.bfloat16"):
        import torch

        return float(torch.finfo(torch.bfloat16).eps)
    if type(dtype).__module__ == "torch":  # torch.dtype, without importing torch for numpy-only tests
        import torch

        return float(torch.finfo(dtype).eps)
    if isinstance(dtype, str):
        dtype = dtype.removeprefix("torch.")
    return float(np.finfo(np.dtype(dtype)).eps)


def tolerance(dtype: Any, scale: float, ops: float = ACCUMULATED_OPS) -> float:
    """The largest rounding difference allowed between values of magnitude ``scale`` computed in ``dtype``."""
    return float(ops) * eps(dtype) * float(scale)


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual: Any, expected: Any, dtype: Any, *, scale: float | None = None,
                 ops: float = ACCUMULATED_OPS, bound: float | None = None, what: str = "") -> float:
    """Assert ``|actual - expected| <= ops * eps(dtype) * scale`` (or ``max(bound, ...)``) everywhere.

    Shapes must match; non-finite entries must match exactly (a masked -inf stays -inf). On failure
    the message gives the largest absolute difference, where it is, and its size relative to ``scale``
    in units of eps; the same line is printed on success (``pytest -rP`` shows it). Returns the largest
    absolute difference.
    """
    a, e = _as_float64(actual), _as_float64(expected)
    label = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{label}shapes differ: {a.shape} vs {e.shape}"
    finite = np.isfinite(e)
    assert np.array_equal(np.isfinite(a), finite) and np.array_equal(a[~finite], e[~finite], equal_nan=True), \
        f"{label}non-finite entries differ"
    if scale is None:
        scale = float(np.abs(e[finite]).max()) if finite.any() else 0.0
    resolution = eps(dtype)
    derived = tolerance(dtype, scale, ops)
    spec = bound is not None and bound >= derived
    allowed = bound if spec else derived
    diff = np.zeros(e.shape)
    diff[finite] = np.abs(a[finite] - e[finite])
    worst = float(diff.max()) if diff.size else 0.0
    report = f"{label}max |actual - expected| = {worst:.3g}"
    if diff.size:
        at = np.unravel_index(int(diff.argmax()), diff.shape)
        report += f" at {tuple(int(i) for i in at)} (actual {a[at]:.9g}, expected {e[at]:.9g})"
    if scale > 0:
        report += f" = {worst / (resolution * scale):.2f} eps({dtype}) x scale {scale:.3g}"
    report += (f"; allowed {allowed:.3g} (spec bound)" if spec
               else f"; allowed {allowed:.3g} = {ops:g} eps x scale")
    print(report)
    assert worst <= allowed, report
    return worst
