"""What an AtMan request carries to the engine, and how each side reads it.

The front end puts one small dict under ``SamplingParams.extra_args["atman"]``;
the scheduler (block hashing) and the worker (attention bias, target scoring)
parse it back with ``AtmanRequestInfo.from_extra_args``. Plain Python on both
sides, so this module imports nothing from vLLM.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from atman_vllm.core.options import Mode
from atman_vllm.core.plan import KeyBias

EXTRA_ARGS_KEY = "atman"


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
        return {EXTRA_ARGS_KEY: d}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "AtmanRequestInfo | None":
        if not extra_args or EXTRA_ARGS_KEY not in extra_args:
            return None
        d = extra_args[EXTRA_ARGS_KEY]
        if isinstance(d, str):  # OpenAI-compatible requests carry it as JSON text in vllm_xargs
            d = json.loads(d)
        bias = KeyBias.from_wire(d["bias"]) if d.get("bias") else None
        if bias is not None and bias.is_identity:
            bias = None  # factor 1 everywhere is the stock computation; share the cache freely
        target_start = d.get("target_start")
        if bias is None and target_start is None:
            return None
        return cls(bias=bias, target_start=target_start, nonce=str(d.get("nonce", "")))

    @property
    def bias_digest(self) -> str:
        """Identifies the perturbation; two equal perturbations give equal KV."""
        b = self.bias
        if b is None:
            return ""
        payload = repr((Mode(b.mode).value, b.positions, tuple(float(f).hex() for f in b.factors)))
        return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()

    def block_hash_keys(self, start: int, end: int) -> tuple:
        """Extra prefix-cache keys for the block of token positions [start, end).

        Block hashes are chained, so a block only needs the bias entries that
        fall inside it: every later block inherits them through its parent.
        Blocks before the first perturbed position get no key and are shared
        with the unperturbed run. Blocks holding a position whose logits score
        the target get a per-request nonce: they must always be computed.
        """
        keys: list = []
        b = self.bias
        if b is not None and any(start <= p < end for p in b.positions):
            keys.append(("atman-bias", self.bias_digest, start))
        if self.target_start is not None and end > self.target_start - 1:
            keys.append(("atman-score", self.nonce))
        return tuple(keys)

