"""What an AtMan request carries to the engine, and how each side reads it.

The front end puts one small dict under ``SamplingParams.extra_args["atman"]``;
the scheduler (block hashing) and the worker (attention bias, target scoring)
parse it back with ``AtmanRequestInfo.from_extra_args``. Plain Python on both
sides, so this module imports nothing from vLLM.

The payload is the engine's trust boundary: a perturbation changes what every
layer computes and which prefix-cache blocks a request may share. So only
payloads built in this process enter the engine: each carries a seal (an HMAC
under a key that never leaves the process), and the admission check
(``admission.py``, in vLLM's input processing) refuses any payload without a
valid seal — whichever route or client it came through — and checks the
invariants of the sealed ones against the request's tokens, where a bad
request can still be failed alone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass

from atman_vllm.core.options import Mode
from atman_vllm.core.jobs import KeyBias

EXTRA_ARGS_KEY = "atman"
_SEAL_FIELD = "seal"
# Never written anywhere: a client cannot know it, so it cannot forge a payload.
_SEAL_KEY = secrets.token_bytes(32)
_INFO_ATTR = "_atman_info"  # the parsed payload, kept on vLLM's request object
_MISSING = object()
log = logging.getLogger(__name__)


class InvalidPayload(ValueError):
    """An AtMan payload that is malformed or breaks an invariant."""


class UnsealedPayload(InvalidPayload):
    """An AtMan payload this process did not build: it came from a client."""

    def __init__(self):
        super().__init__("is reserved for the server's own requests")


def _seal(fields: dict) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hmac.new(_SEAL_KEY, canonical.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class AtmanRequestInfo:
    """Per-request AtMan data, parsed once per process and request.

    ``bias``: per-key factors applied in every layer (None: stock attention).
    ``target_start``: when set, the worker returns the cross-entropies of the
    tokens ``[target_start, num_prompt_tokens)`` and those positions are never
    read from the prefix cache. ``nonce`` keeps the scoring blocks of two
    identical requests apart.
    """

    bias: KeyBias | None
    target_start: int | None = None
    nonce: str = ""

    def to_json(self) -> str:
        """The payload as JSON text: what ``vllm_xargs`` of an OpenAI-compatible request can carry."""
        return json.dumps(self.to_extra_args()[EXTRA_ARGS_KEY])

    def to_extra_args(self) -> dict:
        d: dict = {}
        if self.bias is not None:
            d["bias"] = self.bias.to_wire()
        if self.target_start is not None:
            d["target_start"] = self.target_start
            d["nonce"] = self.nonce
        d[_SEAL_FIELD] = _seal(d)
        return {EXTRA_ARGS_KEY: d}

    @staticmethod
    def _payload(extra_args: dict | None) -> dict | None:
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            return None
        d = extra_args[EXTRA_ARGS_KEY]
        if isinstance(d, str):  # OpenAI-compatible requests carry it as JSON text in vllm_xargs
            try:
                d = json.loads(d)
            except (json.JSONDecodeError, RecursionError):
                raise InvalidPayload("is not a JSON object") from None
        if not isinstance(d, dict):
            raise InvalidPayload(f"must be an object, got {type(d).__name__}")
        return d

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "AtmanRequestInfo | None":
        """The parsed payload (None: no AtMan data); InvalidPayload if it is malformed."""
        d = cls._payload(extra_args)
        if d is None:
            return None
        try:
            bias = KeyBias.from_wire(d["bias"]) if d.get("bias") else None
            target_start = d.get("target_start")
            if target_start is not None and (not isinstance(target_start, int) or isinstance(target_start, bool)):
                raise TypeError("target_start must be an integer")
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidPayload(f"is malformed: {exc}") from None
        if bias is not None and bias.is_identity:
            bias = None  # factor 1 everywhere is the stock computation; share the cache freely
        if bias is None and target_start is None:
            return None
        return cls(bias=bias, target_start=target_start, nonce=str(d.get("nonce", "")))

    @classmethod
    def admitted(cls, extra_args: dict | None, num_prompt_tokens: int) -> "AtmanRequestInfo | None":
        """``from_extra_args`` for a request entering the engine: sealed here, and fitting its tokens.

        Raises UnsealedPayload (the client's fault) or InvalidPayload (ours);
        after this the scheduler's and the worker's parse of the same payload
        cannot fail.
        """
        try:
            d = cls._payload(extra_args)
        except InvalidPayload:
            raise UnsealedPayload() from None  # ours always parse
        if d is None:
            return None
        fields = {k: v for k, v in d.items() if k != _SEAL_FIELD}
        seal = d.get(_SEAL_FIELD)
        try:
            sealed = isinstance(seal, str) and hmac.compare_digest(seal, _seal(fields))
        except (TypeError, ValueError):  # not JSON-serialisable, or a non-ASCII seal
            sealed = False
        if not sealed:
            raise UnsealedPayload()
        info = cls.from_extra_args(extra_args)
        if info is None:
            return None
        if info.bias is not None and not 0 <= info.bias.positions[0] <= info.bias.positions[-1] < num_prompt_tokens:
            raise InvalidPayload(f"bias positions {info.bias.positions[0]}..{info.bias.positions[-1]} lie outside "
                                 f"the request's {num_prompt_tokens} prompt tokens")
        if info.target_start is not None and not 1 <= info.target_start < num_prompt_tokens:
            raise InvalidPayload(f"target_start {info.target_start} lies outside 1..{num_prompt_tokens - 1}")
        return info

    def bias_digest(self, start: int = 0, end: int | None = None) -> str:
        """Identifies the perturbation's entries at positions [start, end) (default: all of them);
        "" when there are none. Equal entries give equal KV in that range, given equal earlier KV."""
        b = self.bias
        if b is None:
            return ""
        entries = [(p, float(f).hex()) for p, f in zip(b.positions, b.factors)
                   if start <= p and (end is None or p < end)]
        if not entries:
            return ""
        payload = repr((Mode(b.mode).value, tuple(entries)))
        return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()

    def block_hash_keys(self, start: int, end: int) -> tuple:
        """Extra prefix-cache keys for the block of token positions [start, end).

        Block hashes are chained, so a block only needs the bias entries that
        fall inside it: every later block inherits them through its parent,
        and attention is causal, so entries after the block cannot change its
        KV. Two perturbations that agree up to a block's end therefore share
        it: the same document unit suppressed under two different questions
        (correlated suppression adds entries in each question's own tokens,
        which lie in later blocks). Blocks before the first perturbed position
        get no key and are shared with the unperturbed run. Blocks holding a
        position whose logits score the target get a per-request nonce: they
        must always be computed.
        """
        keys: list = []
        digest = self.bias_digest(start, end)
        if digest:
            keys.append(("atman-bias", digest, start))
        if self.target_start is not None and end > self.target_start - 1:
            keys.append(("atman-score", self.nonce))
        return tuple(keys)


def request_info(holder) -> AtmanRequestInfo | None:
    """The payload of ``holder.sampling_params``, parsed once per object and kept on it.

    ``holder`` is whatever vLLM keeps per request where the payload is read
    (the scheduler's ``Request``, the runner's ``CachedRequestState``).
    Admission (``admission.py``) already parsed and checked this payload, so
    this cannot fail; if it ever did, raising here would stop the engine for
    everyone, so the request runs unperturbed and, if it scores a target,
    returns no scores (its caller gets an error).
    """
    cached = holder.__dict__.get(_INFO_ATTR, _MISSING)
    if cached is _MISSING:
        params = getattr(holder, "sampling_params", None)
        try:
            cached = AtmanRequestInfo.from_extra_args(params.extra_args if params else None)
        except InvalidPayload as exc:
            log.error("atman: ignoring the payload of request %s that admission let through: %s",
                      getattr(holder, "req_id", getattr(holder, "request_id", "?")), exc)
            cached = None
        holder.__dict__[_INFO_ATTR] = cached
    return cached
