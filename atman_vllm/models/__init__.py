"""Tiny locally built models for tests and benchmarks (no hub downloads)."""

from .factory import FAMILIES, build_tiny_model, load_tokenizer

__all__ = ["FAMILIES", "build_tiny_model", "load_tokenizer"]
