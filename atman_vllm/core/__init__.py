"""AtMan's algorithm, independent of any model runtime (no vllm/torch/transformers here).

Request -> ``plan_explanation`` -> ``ForkJob``s -> a backend's ``run_jobs`` ->
``ExplainPlan.finish`` -> ``ExplainResult`` (the JSON contract). Backends
subclass ``Explainer`` and only run forward passes.
"""

from .chat import ChatMessage, ChatPrompt, check_messages, locate_contents
from .controls import Control, ImageControl, Overlap, plan_controls, plan_prompt_controls
from .correlation import correlated_factors, cosine_similarity
from .events import ExplainProgress, GenerationDelta
from .explainer import Explainer, make_options
from .images import EncodedImage, ImageLayout, PromptImage, Rect, VisionModel, join_parts
from .options import (
    ExplainOptions,
    Granularity,
    InvalidRequestError,
    Mode,
    Postprocessing,
    TargetGranularity,
    check_factor,
    check_kappa,
    check_spans,
)
from .jobs import ForkJob, ForkResult, KeyBias
from .planning import (
    CancelCheck,
    EmbeddingRows,
    ExplainPlan,
    Limit,
    PlanCancelled,
    PlanLimits,
    TokenSimilarity,
    plan_explanation,
    unit_bias,
)
from .requests import ExplainRequest
from .results import (
    EXPLAIN_RESULT_SCHEMA,
    ExplainResult,
    ExplainStats,
    ExplanationForTarget,
    SpanScore,
    TargetBoundary,
    TargetToken,
    TextSpan,
)
from .scoring import normalize_scores, postprocess, raw_deltas, score_explanations
from .tokens import (
    EncodedInput,
    EncodedPrompt,
    HFTokenizer,
    Tokenizer,
    decoded_offsets,
    encode_input,
    encode_prompt,
    encode_with_target_ids,
)
from .units import AUTO_MAX_UNITS, PromptRegion, Unit, chat_regions, segment_prompt, segment_regions, target_units

__all__ = [
    "EncodedImage", "ImageLayout", "PromptImage", "Rect", "VisionModel", "join_parts",
    "AUTO_MAX_UNITS", "CancelCheck", "ChatMessage", "ChatPrompt", "PromptRegion", "TargetBoundary", "chat_regions",
    "check_messages", "decoded_offsets", "encode_with_target_ids", "locate_contents", "segment_regions", "Control", "EXPLAIN_RESULT_SCHEMA", "EmbeddingRows", "EncodedInput", "EncodedPrompt",
    "ExplainOptions", "ExplainPlan", "ExplainProgress", "ExplainRequest", "ExplainResult", "ExplainStats", "Explainer",
    "ExplanationForTarget", "ForkJob", "ForkResult", "GenerationDelta", "Granularity", "HFTokenizer", "InvalidRequestError",
    "KeyBias", "Limit", "Mode", "Overlap", "PlanCancelled", "PlanLimits", "Postprocessing", "SpanScore", "TargetGranularity", "TargetToken", "TextSpan",
    "TokenSimilarity", "Tokenizer", "Unit", "check_factor", "check_kappa", "check_spans", "correlated_factors",
    "cosine_similarity", "encode_input", "encode_prompt", "make_options", "normalize_scores", "plan_controls", "plan_prompt_controls", "ImageControl",
    "plan_explanation", "postprocess", "raw_deltas", "score_explanations", "segment_prompt", "target_units",
    "unit_bias",
]
