"""AtMan on plain Hugging Face transformers: the definition the vLLM path is tested against."""

from .attention import ATTENTION_NAME, biased_scores, key_bias_scope
from .explainer import ReferenceExplainer

__all__ = ["ATTENTION_NAME", "ReferenceExplainer", "biased_scores", "key_bias_scope"]
