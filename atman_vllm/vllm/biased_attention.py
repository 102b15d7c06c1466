"""Per-request key biases as tensors, for the worker-side attention backends."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from atman_vllm.core.options import Mode
from atman_vllm.core.plan import KeyBias
from atman_vllm.kernels.key_bias import dense_row

# Attribute on a step's attention metadata: dict[batch row -> KeyBiasTensors].
BATCH_BIAS_ATTR = "atman_bias"


@dataclass(frozen=True)
class KeyBiasTensors:
    """A KeyBias as tensors, built once per request and reused every step and layer."""

    positions: torch.Tensor  # int64 [nnz]
    log_factors: torch.Tensor  # float32 [nnz]
    mode: str  # "log-additive" | "multiplicative"

    @classmethod
    def from_bias(cls, bias: KeyBias) -> "KeyBiasTensors":
        return cls(
            positions=torch.tensor(bias.positions, dtype=torch.long),
            log_factors=torch.tensor([math.log(f) for f in bias.factors], dtype=torch.float32),
            mode=Mode(bias.mode).value,
        )

    def dense(self, length: int) -> torch.Tensor:
        return dense_row(self.positions, self.log_factors, length)
