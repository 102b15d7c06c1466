"""Models without hub downloads: tiny locally built models for tests and benchmarks, and
prepared real models (``resolve_model("smollm2-135m-instruct")``) built from installed packages,
and the trained shapes VLM shipped in the package (``resolve_model("tiny-shapes-vlm")``)."""

from .factory import FAMILIES, build_tiny_model, load_tokenizer
from .vlm import build_tiny_vlm
from .registry import PREPARED, SHIPPED, PreparedModelError, model_cache_dir, prepare, resolve_model

__all__ = ["FAMILIES", "PREPARED", "PreparedModelError", "SHIPPED", "build_tiny_model", "build_tiny_vlm", "load_tokenizer", "model_cache_dir",
           "prepare", "resolve_model"]
