"""Request -> forward passes -> result: the one code path every backend shares.

``plan_explanation`` tokenizes, segments and builds one ``ForkJob`` per unit
(jobs[0] is the unperturbed run); a backend runs the jobs; ``ExplainPlan.finish``
scores the returned cross-entropies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from .correlation import CosineSimilarity, correlated_factors
from .hierarchical import SearchLevel, search_levels
from .images import VisionModel
from .options import ExplainOptions, Granularity, InvalidRequestError, Mode, Search
from .jobs import ForkJob, ForkResult, KeyBias
from .requests import ExplainRequest
from .results import ExplainResult, ExplainStats, SpanScore, TargetToken
from .scoring import raw_deltas, score_explanations
from .tokens import EncodedInput, Tokenizer, encode_input, encode_with_images, encode_with_target_ids
from .units import PromptRegion, Unit, chat_regions, in_messages, region_units, segment_regions, target_units, text_regions

# Input-embedding rows [n, d] for the given token ids; None when the backend cannot provide them.
EmbeddingRows = Callable[[Sequence[int]], "np.ndarray | None"]
# Polled while planning; True stops it with PlanCancelled (the caller went away or ran out of time).
CancelCheck = Callable[[], bool]


class PlanCancelled(Exception):
    """Planning stopped because its ``cancelled`` check said so."""


@dataclass(frozen=True)
class Limit:
    value: int
    source: str = ""  # where the limit is set, for the message (e.g. "the server's --max-units")


@dataclass(frozen=True)
class PlanLimits:
    """What one explanation may cost, each checked before the work it bounds.

    Prompt characters before tokenizing; tokens (prompt + target) before
    segmentation; units before correlated suppression and the fork plans. So
    no request can make planning run long or allocate much, whatever its size.
    """

    prompt_chars: Limit | None = None
    tokens: Limit | None = None
    units: Limit | None = None
    images: Limit | None = None  # images per prompt

    def check_chars(self, request: ExplainRequest) -> None:
        self.check_text("messages" if request.chat is not None else "prompt", request.prompt)
        self.check_text("target", request.target)
        self.check_images(len(request.images))

    def check_images(self, num_images: int) -> None:
        limit = self.images
        if limit is not None and num_images > limit.value:
            raise InvalidRequestError("images", f"the prompt has {num_images} images; at most {limit.value} are "
                                                f"taken here{_from(limit)}")

    def check_text(self, field: str, text) -> None:
        """A text of at most ``prompt_chars`` characters (before anything tokenizes it)."""
        limit = self.prompt_chars
        if limit is not None and isinstance(text, str) and len(text) > limit.value:
            raise InvalidRequestError(field, f"is {len(text)} characters; at most {limit.value} are taken "
                                             f"here{_from(limit)}")

    def check_tokens(self, num_tokens: int) -> None:
        limit = self.tokens
        if limit is not None and num_tokens > limit.value:
            raise InvalidRequestError("prompt", f"prompt + target are {num_tokens} tokens; at most {limit.value} "
                                                f"are explained here{_from(limit)}")

    def check_units(self, num_units: int) -> None:
        limit = self.units
        if limit is not None and num_units > limit.value:
            raise InvalidRequestError("granularity", f"the request has {num_units} units; at most {limit.value} "
                                                     f"are allowed{_from(limit)}: choose a coarser granularity")


def _from(limit: Limit) -> str:
    return f" ({limit.source})" if limit.source else ""


class TokenSimilarity:
    """Cosine similarity of the input embeddings of a sequence's tokens, by position.

    Rows are kept once per distinct token id (a sequence repeats ids a lot), so
    equal ids are exactly 1.0 similar; similarities are computed per call,
    so memory is O(distinct ids · d), never O(L²). ``position_rows`` give the
    input embedding of positions whose embedding is not their id's row: an
    image's cells (all one id) carry the projected vision features there.
    """

    def __init__(self, token_ids: Sequence[int], embedding_rows: EmbeddingRows | None, field: str = "kappa",
                 position_rows: dict[int, np.ndarray] | None = None):
        position_rows = position_rows or {}
        distinct = sorted({t for p, t in enumerate(token_ids) if p not in position_rows})
        rows = embedding_rows(distinct) if embedding_rows is not None else None
        if rows is None:
            raise InvalidRequestError(field, "correlated suppression needs the input embeddings, "
                                             "which this backend cannot provide; leave kappa unset")
        rows = np.asarray(rows, dtype=np.float64).reshape(len(distinct), -1)
        if rows.ndim != 2 or rows.shape[0] != len(distinct):
            raise ValueError(f"embedding_rows returned shape {rows.shape} for {len(distinct)} token ids")
        index = {t: i for i, t in enumerate(distinct)}
        row_of_position = [index.get(t, -1) for t in token_ids]
        extra = []
        for p in sorted(position_rows):
            row = np.asarray(position_rows[p], dtype=np.float64).reshape(-1)
            if distinct and row.shape[0] != rows.shape[1]:
                raise ValueError(f"position {p}'s embedding has {row.shape[0]} values, the token rows {rows.shape[1]}")
            row_of_position[p] = len(distinct) + len(extra)
            extra.append(row)
        if extra:
            rows = np.concatenate([rows, np.stack(extra)]) if distinct else np.stack(extra)
        self._sim = CosineSimilarity(rows)
        self._row_of_position = np.array(row_of_position)

    def between(self, positions_a: Sequence[int], positions_b: Sequence[int]) -> np.ndarray:
        """[len(a), len(b)] similarities."""
        ra, rb = self._row_of_position[list(positions_a)], self._row_of_position[list(positions_b)]
        return self._sim.block(ra, rb)


def unit_bias(
    unit_positions: Sequence[int],
    factor: float,
    mode: Mode,
    kappa: float | None = None,
    similarity: TokenSimilarity | None = None,
    candidate_positions: Sequence[int] = (),
) -> KeyBias:
    """The per-key factors that suppress one unit (with correlated suppression when kappa is set)."""
    if kappa is None:
        factors = {p: factor for p in unit_positions}
    else:
        sim = similarity.between(unit_positions, candidate_positions)
        factors = correlated_factors(unit_positions, candidate_positions, sim, kappa, factor)
    positions = tuple(sorted(factors))
    return KeyBias(positions, tuple(factors[p] for p in positions), Mode(mode))


@dataclass(frozen=True)
class ExplainPlan:
    request: ExplainRequest
    encoded: EncodedInput
    units: tuple[Unit, ...]  # prompt units, in text order
    target_units: tuple[Unit, ...]  # target tokens as units (target granularity "token" only)
    options: ExplainOptions  # validated and resolved (no "auto")
    jobs: list[ForkJob]  # jobs[0]: unperturbed; then one per unit, prompt units then target units
    # search "hierarchical": the coarser levels searched above ``units``, coarsest first (core/hierarchical.py);
    # () for exhaustive search, or when the exhaustive search fits in the budget.
    levels: tuple[SearchLevel, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.encoded.token_ids)

    @property
    def num_units(self) -> int:
        return len(self.jobs) - 1

    def finish(self, results: Sequence[ForkResult], elapsed_s: float) -> ExplainResult:
        """Score the backend's results (one per job, same order) into the JSON-contract result."""
        if len(results) != len(self.jobs):
            raise ValueError(f"got {len(results)} results for {len(self.jobs)} jobs")
        ce = np.stack([np.asarray(r.target_ce, dtype=np.float64).reshape(-1) for r in results])
        return self.score(ce[0], ce[1:], results, elapsed_s)

    def score(self, base_ce: np.ndarray, unit_ce: np.ndarray, results: Sequence[ForkResult], elapsed_s: float,
              inherited: Sequence[str | None] | None = None, unperturbed_runs: int = 1) -> ExplainResult:
        """The result from the unperturbed [T] and per-unit [n, T] cross-entropies (units, then target
        units), with ``results`` (every pass run) for the stats. ``inherited`` (hierarchical search):
        per prompt unit, None if it had its own fork, else the granularity whose score it inherits;
        ``unperturbed_runs``: how many of ``results`` are the unperturbed pass (one per search round)."""
        num_targets = self.encoded.num_targets
        base_ce = np.asarray(base_ce, dtype=np.float64).reshape(1, -1)
        unit_ce = np.asarray(unit_ce, dtype=np.float64).reshape(-1, base_ce.shape[1])
        ce = np.concatenate([base_ce, unit_ce])
        if ce.shape[1] != num_targets:
            raise ValueError(f"results have {ce.shape[1]} target cross-entropies, expected {num_targets}")
        if not np.all(np.isfinite(ce)):
            raise ValueError("backend returned a non-finite target cross-entropy")
        opts, target = self.options, self.encoded.target
        explanations = score_explanations(
            self.units, self.target_units, target, self.encoded.target_offsets, self.encoded.target_start,
            raw_deltas(ce[0], ce[1:]), opts.target_granularity, opts.postprocessing, opts.normalize,
        )
        if inherited is not None:
            explanations = tuple(replace(e, prompt_scores=_marked(e.prompt_scores, inherited)) for e in explanations)
        target_tokens = tuple(
            TargetToken(target[s:e], s, e - s, float(-ce[0, t])) for t, (s, e) in enumerate(self.encoded.target_offsets)
        )
        stats = ExplainStats(
            perturbations=len(results) - unperturbed_runs,
            forward_passes=len(results),
            computed_tokens=int(sum(r.computed_tokens for r in results)),
            cached_tokens=int(sum(r.cached_tokens for r in results)),
            elapsed_s=float(elapsed_s),
        )
        chat = self.request.chat
        return ExplainResult(self.request.prompt, target, target_tokens, explanations, opts, stats,
                             self.encoded.boundary, None if chat is None else chat.messages, self.request.images)


def encode_request(request: ExplainRequest, tokenizer: Tokenizer, vision: VisionModel | None = None) -> EncodedInput:
    """The request's token sequence: prompt and target together, or the prompt then the given target ids;
    a prompt's images expanded into their tokens (``vision``: the backend's image processing)."""
    add_bos = request.chat is None  # a rendered chat prompt is tokenized as it is, as vLLM does
    if request.images:
        if vision is None:
            raise InvalidRequestError("images", "this model takes no images")
        return encode_with_images(tokenizer, request.prompt, request.target, request.images, vision,
                                  add_bos=add_bos, target_ids=request.target_token_ids)
    if request.target_token_ids is not None:
        return encode_with_target_ids(tokenizer, request.prompt, request.target_token_ids, add_bos=add_bos)
    return encode_input(tokenizer, request.prompt, request.target, add_bos=add_bos)


def prompt_regions(request: ExplainRequest, encoded: EncodedInput) -> list[PromptRegion]:
    """Where units come from: each chat message's content (its text pieces between its images), each
    text piece of a prompt between its images, or the whole prompt."""
    chat = request.chat
    if chat is not None:
        return chat_regions(encoded.prompt_offsets, encoded.prompt_start, chat.content_starts,
                            [m.content for m in chat.messages], encoded.images)
    if encoded.images:
        return text_regions(request.prompt, encoded.prompt_offsets, encoded.prompt_start, encoded.images)
    return [PromptRegion(request.prompt, encoded.prompt_offsets, encoded.prompt_start)]


def plan_explanation(
    request: ExplainRequest,
    tokenizer: Tokenizer,
    embedding_rows: EmbeddingRows | None = None,
    *,
    vision: VisionModel | None = None,
    limits: PlanLimits = PlanLimits(),
    cancelled: CancelCheck | None = None,
) -> ExplainPlan:
    """Validate, tokenize, segment, and plan the n + 1 forward passes of one explanation.

    ``embedding_rows`` is needed only when ``kappa`` is set; ``vision`` only for
    a prompt with images (and its cell embeddings only with kappa). ``limits`` are
    checked before the work each bounds; ``cancelled`` is polled between
    stages and between units (PlanCancelled when it turns True).
    """
    cancelled = cancelled or (lambda: False)
    options = request.options.validated()
    limits.check_chars(request)
    if request.images and Search(options.search) is Search.HIERARCHICAL:
        raise InvalidRequestError("search", "'hierarchical' refines text units; with images use 'exhaustive'")
    encoded = encode_request(request, tokenizer, vision)
    limits.check_tokens(len(encoded.token_ids))
    if cancelled():
        raise PlanCancelled()
    regions = prompt_regions(request, encoded)
    units, granularity = segment_regions(regions, options, encoded.images)
    if request.chat is not None and encoded.images:
        units = in_messages(units, request.chat.content_starts, [m.content for m in request.chat.messages])
    options = replace(options, granularity=granularity)
    t_units = target_units(encoded.target, encoded.target_offsets, encoded.target_start, options.target_granularity)
    limits.check_units(len(units) + len(t_units))

    similarity, candidates = None, ()
    if options.kappa is not None:
        # Candidates for correlated suppression: every token a unit could hold (the prompt's, or the
        # messages' contents', and the images' cells), and the target's; never the BOS, never a chat
        # template's tokens nor an image's markers.
        region_positions = [r.first_position + i for r in regions for i in range(len(r.offsets))]
        region_positions += [p for im in encoded.images for p in im.cell_positions]
        candidates = tuple(sorted(set(region_positions))) + tuple(range(encoded.target_start, len(encoded.token_ids)))
        similarity = TokenSimilarity(encoded.token_ids, embedding_rows, position_rows=_cell_rows(encoded, vision))

    images = encoded.images
    jobs = [ForkJob(encoded.token_ids, encoded.target_start, None, images)]
    for unit in (*units, *t_units):
        if cancelled():
            raise PlanCancelled()
        bias = unit_bias(unit.positions, options.factor, options.mode, options.kappa, similarity, candidates)
        jobs.append(ForkJob(encoded.token_ids, encoded.target_start, bias, images))
    levels: tuple[SearchLevel, ...] = ()
    if Search(options.search) is Search.HIERARCHICAL:
        def make_job(unit: Unit) -> ForkJob:
            bias = unit_bias(unit.positions, options.factor, options.mode, options.kappa, similarity, candidates)
            return ForkJob(encoded.token_ids, encoded.target_start, bias)

        levels = search_levels(Granularity(granularity), units, options.budget,
                               lambda g: region_units(regions, g, options), make_job)
    return ExplainPlan(request, encoded, tuple(units), tuple(t_units), options, jobs, levels)


def _cell_rows(encoded: EncodedInput, vision: VisionModel | None) -> dict[int, np.ndarray]:
    """The input embedding at each image cell's position: the backend's projected vision features."""
    out: dict[int, np.ndarray] = {}
    for im in encoded.images:
        rows = vision.cell_embeddings(im.image)
        if rows is None:
            raise InvalidRequestError("kappa", "correlated suppression needs the images' embeddings, which this "
                                               "backend cannot provide; leave kappa unset")
        rows = np.asarray(rows)
        if rows.shape[0] != len(im.cell_positions):
            raise ValueError(f"image {im.index}: {rows.shape[0]} cell embeddings for {len(im.cell_positions)} cells")
        out.update(zip(im.cell_positions, rows))
    return out


def _marked(scores: Sequence[SpanScore], inherited: Sequence[str | None]) -> tuple[SpanScore, ...]:
    """Prompt scores with their hierarchical-search marks (refined, or inherited from which level)."""
    if len(scores) != len(inherited):
        raise ValueError(f"{len(inherited)} marks for {len(scores)} prompt scores")
    return tuple(replace(s, refined=g is None, inherited_from=g) for s, g in zip(scores, inherited))
