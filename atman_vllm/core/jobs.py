"""What an explanation asks of a model: forward passes with per-key factors.

The planner (``plan_explanation``) turns a request into an ``ExplainPlan``;
any backend (the Hugging Face reference, the vLLM path) runs the plan's
``ForkJob``s and hands back ``ForkResult``s; ``ExplainPlan.finish`` turns them
into the JSON-contract result. Backends never see text, units or options.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .images import EncodedImage
from .options import MAX_FACTOR, MIN_FACTOR, Mode, factor_in_range


@dataclass(frozen=True)
class KeyBias:
    """A sparse per-key factor list applied in every layer and head.

    ``positions`` are absolute token indices in the sequence, strictly
    increasing; ``factors[i]`` multiplies the attention to ``positions[i]``
    (log-additive: ``+log f``; multiplicative: ``m + f (H - m)``).
    """

    positions: tuple[int, ...]
    factors: tuple[float, ...]
    mode: Mode = Mode.LOG_ADDITIVE

    def __post_init__(self):
        if len(self.positions) != len(self.factors):
            raise ValueError("positions and factors differ in length")
        if any(b <= a for a, b in zip(self.positions, self.positions[1:])):
            raise ValueError("positions must be strictly increasing")
        if not all(isinstance(f, float) and factor_in_range(f) for f in self.factors):
            raise ValueError(f"factors must be floats between {MIN_FACTOR:g} and {MAX_FACTOR:g}")

    @property
    def first_position(self) -> int:
        """Nothing before this position differs from the unperturbed run."""
        return self.positions[0]

    @property
    def is_identity(self) -> bool:
        return all(f == 1.0 for f in self.factors)

    def to_wire(self) -> dict:
        """Plain lists, for SamplingParams.extra_args and other serialisers."""
        return {"positions": list(self.positions), "factors": list(self.factors), "mode": Mode(self.mode).value}

    @classmethod
    def from_wire(cls, d: dict) -> "KeyBias":
        return cls(tuple(int(p) for p in d["positions"]), tuple(float(f) for f in d["factors"]), Mode(d["mode"]))


@dataclass(frozen=True)
class ForkJob:
    """One forward pass over ``token_ids`` scoring the target tokens.

    ``target_start`` is the index of the first target token; the pass returns
    ``CE_t = -log p(token_ids[target_start + t] | token_ids[:target_start + t])``
    for every target token. ``bias=None`` is the unperturbed run. ``images``:
    the prompt's images, each with the positions of its tokens in ``token_ids``
    (which hold every image's tokens expanded, as the model sees them).
    """

    token_ids: tuple[int, ...]
    target_start: int
    bias: KeyBias | None = None
    images: tuple[EncodedImage, ...] = ()

    @property
    def num_targets(self) -> int:
        return len(self.token_ids) - self.target_start


@dataclass(frozen=True)
class ForkResult:
    target_ce: np.ndarray  # shape [T], float64
    computed_tokens: int  # positions the model actually ran
    cached_tokens: int = 0  # positions served from the prefix cache
