from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Span(_message.Message):
    __slots__ = ("start", "length")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ExplainOptions(_message.Message):
    __slots__ = ("factor", "mode", "kappa", "granularity", "delimiter", "spans", "target_granularity", "postprocessing", "normalize", "search", "budget", "image_granularity")
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    DELIMITER_FIELD_NUMBER: _ClassVar[int]
    SPANS_FIELD_NUMBER: _ClassVar[int]
    TARGET_GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESSING_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    SEARCH_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GRANULARITY_FIELD_NUMBER: _ClassVar[int]
    factor: float
    mode: str
    kappa: float
    granularity: str
    delimiter: str
    spans: _containers.RepeatedCompositeFieldContainer[Span]
    target_granularity: str
    postprocessing: str
    normalize: bool
    search: str
    budget: int
    image_granularity: str
    def __init__(self, factor: _Optional[float] = ..., mode: _Optional[str] = ..., kappa: _Optional[float] = ..., granularity: _Optional[str] = ..., delimiter: _Optional[str] = ..., spans: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., target_granularity: _Optional[str] = ..., postprocessing: _Optional[str] = ..., normalize: _Optional[bool] = ..., search: _Optional[str] = ..., budget: _Optional[int] = ..., image_granularity: _Optional[str] = ...) -> None: ...

class PromptPart(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("prompt", "target", "options", "model", "messages", "parts")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: str
    options: ExplainOptions
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    parts: _containers.RepeatedCompositeFieldContainer[PromptPart]
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[str] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., parts: _Optional[_Iterable[_Union[PromptPart, _Mapping]]] = ...) -> None: ...

class TargetToken(_message.Message):
    __slots__ = ("text", "start", "length", "logprob")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    text: str
    start: int
    length: int
    logprob: float
    def __init__(self, text: _Optional[str] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TextSpan(_message.Message):
    __slots__ = ("start", "length", "text")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    text: str
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class ScoredSpan(_message.Message):
    __slots__ = ("start", "length", "text", "score", "message", "refined", "inherited_from", "image", "rect")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REFINED_FIELD_NUMBER: _ClassVar[int]
    INHERITED_FROM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    RECT_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    text: str
    score: float
    message: int
    refined: bool
    inherited_from: str
    image: int
    rect: Rect
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ..., message: _Optional[int] = ..., refined: _Optional[bool] = ..., inherited_from: _Optional[str] = ..., image: _Optional[int] = ..., rect: _Optional[_Union[Rect, _Mapping]] = ...) -> None: ...

class Rect(_message.Message):
    __slots__ = ("left", "top", "width", "height")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    left: float
    top: float
    width: float
    height: float
    def __init__(self, left: _Optional[float] = ..., top: _Optional[float] = ..., width: _Optional[float] = ..., height: _Optional[float] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("width", "height", "digest")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    digest: str
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., digest: _Optional[str] = ...) -> None: ...

class TargetBoundary(_message.Message):
    __slots__ = ("aligned", "prompt_chars", "note")
    ALIGNED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    aligned: bool
    prompt_chars: int
    note: str
    def __init__(self, aligned: _Optional[bool] = ..., prompt_chars: _Optional[int] = ..., note: _Optional[str] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("target", "prompt_scores", "target_scores")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SCORES_FIELD_NUMBER: _ClassVar[int]
    TARGET_SCORES_FIELD_NUMBER: _ClassVar[int]
    target: TextSpan
    prompt_scores: _containers.RepeatedCompositeFieldContainer[ScoredSpan]
    target_scores: _containers.RepeatedCompositeFieldContainer[ScoredSpan]
    def __init__(self, target: _Optional[_Union[TextSpan, _Mapping]] = ..., prompt_scores: _Optional[_Iterable[_Union[ScoredSpan, _Mapping]]] = ..., target_scores: _Optional[_Iterable[_Union[ScoredSpan, _Mapping]]] = ...) -> None: ...

class ExplainStats(_message.Message):
    __slots__ = ("perturbations", "forward_passes", "computed_tokens", "cached_tokens", "elapsed_s")
    PERTURBATIONS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    perturbations: int
    forward_passes: int
    computed_tokens: int
    cached_tokens: int
    elapsed_s: float
    def __init__(self, perturbations: _Optional[int] = ..., forward_passes: _Optional[int] = ..., computed_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., elapsed_s: _Optional[float] = ...) -> None: ...

class ExplainResult(_message.Message):
    __slots__ = ("prompt", "target", "target_tokens", "explanations", "options", "stats", "target_boundary", "messages", "images")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    TARGET_BOUNDARY_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    target: str
    target_tokens: _containers.RepeatedCompositeFieldContainer[TargetToken]
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    options: ExplainOptions
    stats: ExplainStats
    target_boundary: TargetBoundary
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    images: _containers.RepeatedCompositeFieldContainer[ImageInfo]
    def __init__(self, prompt: _Optional[str] = ..., target: _Optional[str] = ..., target_tokens: _Optional[_Iterable[_Union[TargetToken, _Mapping]]] = ..., explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., stats: _Optional[_Union[ExplainStats, _Mapping]] = ..., target_boundary: _Optional[_Union[TargetBoundary, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[ImageInfo, _Mapping]]] = ...) -> None: ...

class ExplainProgress(_message.Message):
    __slots__ = ("done_forks", "total_forks")
    DONE_FORKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FORKS_FIELD_NUMBER: _ClassVar[int]
    done_forks: int
    total_forks: int
    def __init__(self, done_forks: _Optional[int] = ..., total_forks: _Optional[int] = ...) -> None: ...

class ExplainEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: ExplainProgress
    result: ExplainResult
    def __init__(self, progress: _Optional[_Union[ExplainProgress, _Mapping]] = ..., result: _Optional[_Union[ExplainResult, _Mapping]] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("start", "length", "factor", "image", "rect")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    RECT_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    factor: float
    image: int
    rect: Rect
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ..., factor: _Optional[float] = ..., image: _Optional[int] = ..., rect: _Optional[_Union[Rect, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "temperature", "seed", "controls", "control_mode", "control_kappa", "control_overlap", "explain", "explain_options", "model", "parts")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CONTROLS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_MODE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_KAPPA_FIELD_NUMBER: _ClassVar[int]
    CONTROL_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    temperature: float
    seed: int
    controls: _containers.RepeatedCompositeFieldContainer[Control]
    control_mode: str
    control_kappa: float
    control_overlap: str
    explain: bool
    explain_options: ExplainOptions
    model: str
    parts: _containers.RepeatedCompositeFieldContainer[PromptPart]
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., controls: _Optional[_Iterable[_Union[Control, _Mapping]]] = ..., control_mode: _Optional[str] = ..., control_kappa: _Optional[float] = ..., control_overlap: _Optional[str] = ..., explain: _Optional[bool] = ..., explain_options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., model: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[PromptPart, _Mapping]]] = ...) -> None: ...

class GenerationDelta(_message.Message):
    __slots__ = ("text", "token_ids", "finished", "finish_reason", "completion_text")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    completion_text: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., completion_text: _Optional[str] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("delta", "explain_progress", "explanation")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    delta: GenerationDelta
    explain_progress: ExplainProgress
    explanation: ExplainResult
    def __init__(self, delta: _Optional[_Union[GenerationDelta, _Mapping]] = ..., explain_progress: _Optional[_Union[ExplainProgress, _Mapping]] = ..., explanation: _Optional[_Union[ExplainResult, _Mapping]] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "start", "length", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: int
    start: int
    length: int
    text: str
    def __init__(self, id: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[Token]
    def __init__(self, tokens: _Optional[_Iterable[_Union[Token, _Mapping]]] = ...) -> None: ...

class ServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_model_len", "max_explain_tokens", "max_units", "max_concurrent_explains", "max_generate_tokens", "max_message_bytes")
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_EXPLAIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_UNITS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_EXPLAINS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_model_len: int
    max_explain_tokens: int
    max_units: int
    max_concurrent_explains: int
    max_generate_tokens: int
    max_message_bytes: int
    def __init__(self, max_model_len: _Optional[int] = ..., max_explain_tokens: _Optional[int] = ..., max_units: _Optional[int] = ..., max_concurrent_explains: _Optional[int] = ..., max_generate_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...

class Versions(_message.Message):
    __slots__ = ("api", "atman_vllm", "vllm", "grpcio")
    API_FIELD_NUMBER: _ClassVar[int]
    ATMAN_VLLM_FIELD_NUMBER: _ClassVar[int]
    VLLM_FIELD_NUMBER: _ClassVar[int]
    GRPCIO_FIELD_NUMBER: _ClassVar[int]
    api: str
    atman_vllm: str
    vllm: str
    grpcio: str
    def __init__(self, api: _Optional[str] = ..., atman_vllm: _Optional[str] = ..., vllm: _Optional[str] = ..., grpcio: _Optional[str] = ...) -> None: ...

class ServerInfoResponse(_message.Message):
    __slots__ = ("model", "limits", "versions", "explains_in_flight", "free_kv_blocks", "kv_block_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPLAINS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    FREE_KV_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    model: str
    limits: Limits
    versions: Versions
    explains_in_flight: int
    free_kv_blocks: int
    kv_block_size: int
    def __init__(self, model: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., explains_in_flight: _Optional[int] = ..., free_kv_blocks: _Optional[int] = ..., kv_block_size: _Optional[int] = ...) -> None: ...
