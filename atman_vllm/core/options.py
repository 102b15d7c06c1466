"""Explanation options (ATMAN_SPEC §6) and their validation.

Every public entry point (Python API, CLI, gRPC, HTTP) builds an
``ExplainOptions`` and calls ``validate()``; the error names the field so the
service can turn it into INVALID_ARGUMENT / HTTP 400 as it is.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from enum import Enum


class InvalidRequestError(ValueError):
    """Bad input from a caller. ``field`` names the offending option."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Mode(str, Enum):
    LOG_ADDITIVE = "log-additive"
    MULTIPLICATIVE = "multiplicative"


class Granularity(str, Enum):
    TOKEN = "token"
    WORD = "word"
    SENTENCE = "sentence"
    PARAGRAPH = "paragraph"
    CUSTOM = "custom"
    AUTO = "auto"
    SPANS = "spans"  # explicit character spans given by the caller


class TargetGranularity(str, Enum):
    COMPLETE = "complete"
    TOKEN = "token"


class Search(str, Enum):
    EXHAUSTIVE = "exhaustive"  # one fork per unit
    HIERARCHICAL = "hierarchical"  # coarse units first, then refine the strongest (core/hierarchical.py)


# Forward passes a hierarchical search may use when the caller gives no budget.
DEFAULT_BUDGET = 32
MIN_BUDGET = 2  # the unperturbed pass and at least one fork
# Granularities a hierarchical search can refine down to: those nested in paragraphs and sentences.
HIERARCHICAL_GRANULARITIES = ("token", "word", "sentence", "paragraph", "auto")
# Granularities of image tiles (core/images.py).
IMAGE_GRANULARITIES = ("token", "word", "sentence", "paragraph")


class Postprocessing(str, Enum):
    NONE = "none"
    ABSOLUTE = "absolute"
    SQUARE = "square"


def _enum(cls, value, name: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise InvalidRequestError(name, f"unknown value {value!r}; expected one of {allowed}") from None


# The factors every entry point accepts, in both modes. Within them the engine's
# arithmetic stays finite in float32, bfloat16 and float16 alike: |log f| <= 13.9
# (log-additive), and multiplicative scaling by at most 100x keeps f·(H − m) below
# float16's 65504 for any score spread H − m < 655 (the kernels compute scores in
# float32 anyway). 1e-6 already removes a key's weight to below float32 rounding of
# the others; beyond 100x one key takes all the weight. docs/service.md states it.
MIN_FACTOR = 1e-6
MAX_FACTOR = 100.0


def check_number(value, name: str) -> float:
    """A real number as a float: booleans and strings are refused, not coerced."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(name, f"must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def factor_in_range(f: float) -> bool:
    return MIN_FACTOR <= f <= MAX_FACTOR  # also False for NaN


def check_factor(value, name: str = "factor") -> float:
    """A suppression/amplification factor in [MIN_FACTOR, MAX_FACTOR]."""
    f = check_number(value, name)
    if not math.isfinite(f) or f <= 0:
        raise InvalidRequestError(name, f"must be finite and > 0, got {value!r}")
    if not factor_in_range(f):
        raise InvalidRequestError(name, f"must be between {MIN_FACTOR:g} and {MAX_FACTOR:g}, got {value!r}")
    return f


def check_kappa(value, name: str = "kappa") -> float | None:
    """The correlated-suppression threshold: None (off) or a number in [0, 1]."""
    if value is None:
        return None
    try:
        kappa = check_number(value, name)
    except InvalidRequestError:
        raise InvalidRequestError(name, f"must be a number in [0, 1], got {type(value).__name__} {value!r}") from None
    if not (0.0 <= kappa <= 1.0):  # also rejects NaN
        raise InvalidRequestError(name, f"must be in [0, 1], got {value!r}")
    return kappa


def check_spans(value, name: str = "spans") -> tuple[tuple[int, int], ...]:
    """Explicit (start, length) character spans as a tuple of int pairs (range checks need the text)."""
    try:
        spans = tuple((s, n) for s, n in value)
    except (TypeError, ValueError):
        raise InvalidRequestError(name, f"must be a list of (start, length) pairs, got {value!r}") from None
    for s, n in spans:
        if not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in (s, n)):
            raise InvalidRequestError(name, f"start and length must be integers, got ({s!r}, {n!r})")
    return tuple((int(s), int(n)) for s, n in spans)


@dataclass(frozen=True)
class ExplainOptions:
    factor: float = 0.1
    mode: Mode = Mode.LOG_ADDITIVE
    kappa: float | None = None
    granularity: Granularity = Granularity.AUTO
    delimiter: str | None = None  # for granularity=custom
    spans: tuple[tuple[int, int], ...] | None = None  # (start, length) for granularity=spans
    target_granularity: TargetGranularity = TargetGranularity.COMPLETE
    postprocessing: Postprocessing = Postprocessing.NONE
    normalize: bool = False
    search: Search = Search.EXHAUSTIVE
    budget: int | None = None  # forward passes, hierarchical search only (None: DEFAULT_BUDGET)
    # Tiles of a prompt's images (core/images.py): token | word | sentence | paragraph; None: as granularity.
    image_granularity: Granularity | None = None

    def validated(self) -> "ExplainOptions":
        """Return a copy with enums coerced; raise InvalidRequestError naming the field."""
        factor = check_factor(self.factor)
        mode = _enum(Mode, self.mode, "mode")
        granularity = _enum(Granularity, self.granularity, "granularity")
        target_granularity = _enum(TargetGranularity, self.target_granularity, "target_granularity")
        post = _enum(Postprocessing, self.postprocessing, "postprocessing")
        kappa = check_kappa(self.kappa)
        spans = self.spans
        if spans is not None and granularity is Granularity.AUTO:
            granularity = Granularity.SPANS
        if granularity is Granularity.SPANS:
            if not spans:
                raise InvalidRequestError("spans", "granularity 'spans' needs at least one (start, length) span")
            spans = check_spans(spans)
        elif spans is not None:
            raise InvalidRequestError("spans", f"spans are only allowed with granularity 'spans', not {granularity.value!r}")
        delimiter = self.delimiter
        if delimiter is not None and not isinstance(delimiter, str):
            raise InvalidRequestError("delimiter", f"must be a string, got {type(delimiter).__name__}")
        if granularity is Granularity.CUSTOM:
            if not delimiter:
                raise InvalidRequestError("delimiter", "granularity 'custom' needs a non-empty delimiter")
        if not isinstance(self.normalize, bool):
            raise InvalidRequestError("normalize", f"must be true or false, got {self.normalize!r}")
        search = _enum(Search, self.search, "search")
        budget = self.budget
        if search is Search.HIERARCHICAL:
            if granularity.value not in HIERARCHICAL_GRANULARITIES:
                raise InvalidRequestError("search", f"'hierarchical' refines paragraphs and sentences down to "
                                                    f"token, word or sentence units, not granularity {granularity.value!r}")
            if target_granularity is not TargetGranularity.COMPLETE:
                raise InvalidRequestError("search", "'hierarchical' needs target_granularity 'complete'")
            if budget is None:
                budget = DEFAULT_BUDGET
            if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
                raise InvalidRequestError("budget", f"must be an integer, got {type(budget).__name__} {budget!r}")
            budget = int(budget)
            if budget < MIN_BUDGET:
                raise InvalidRequestError("budget", f"must be at least {MIN_BUDGET} forward passes, got {budget}")
        elif budget is not None:
            raise InvalidRequestError("budget", "is only used with search 'hierarchical'")
        image_granularity = self.image_granularity
        if image_granularity is not None:
            image_granularity = _enum(Granularity, image_granularity, "image_granularity")
            if image_granularity.value not in IMAGE_GRANULARITIES:
                raise InvalidRequestError("image_granularity", f"unknown value {image_granularity.value!r}; "
                                                               f"expected one of {', '.join(IMAGE_GRANULARITIES)}")
        return ExplainOptions(
            factor=factor, mode=mode, kappa=kappa, granularity=granularity, delimiter=delimiter,
            spans=spans, target_granularity=target_granularity, postprocessing=post,
            normalize=self.normalize, search=search, budget=budget, image_granularity=image_granularity,
        )

    def to_dict(self) -> dict:
        """The ``options`` object of the JSON contract."""
        d = {
            "factor": self.factor,
            "mode": Mode(self.mode).value,
            "kappa": self.kappa,
            "granularity": Granularity(self.granularity).value,
            "target_granularity": TargetGranularity(self.target_granularity).value,
            "postprocessing": Postprocessing(self.postprocessing).value,
            "normalize": self.normalize,
        }
        if self.delimiter is not None:
            d["delimiter"] = self.delimiter
        if self.spans is not None:
            d["spans"] = [list(s) for s in self.spans]
        if Search(self.search) is not Search.EXHAUSTIVE:  # exhaustive results stay as they always were
            d["search"] = Search(self.search).value
            d["budget"] = self.budget
        if self.image_granularity is not None:  # text-only results stay as they always were
            d["image_granularity"] = Granularity(self.image_granularity).value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ExplainOptions":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InvalidRequestError(sorted(unknown)[0], "unknown option")
        kw = dict(d)
        if kw.get("spans") is not None:
            kw["spans"] = tuple(tuple(s) for s in kw["spans"])
        return cls(**kw).validated()
