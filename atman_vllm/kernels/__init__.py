"""GPU attention kernels for AtMan perturbations (Triton; PyTorch fallback).

Importing this package does not import Triton; the kernels load on first use.
"""

from .key_bias import KeyBiasCSR
from .paged_attention_bias import (
    dense_log_factors,
    paged_attention_with_key_bias,
    paged_attention_with_key_bias_torch,
)

__all__ = [
    "KeyBiasCSR",
    "dense_log_factors",
    "paged_attention_with_key_bias",
    "paged_attention_with_key_bias_torch",
]
