"""What both worker-side attention backends share: where a step's key biases ride, and what they refuse."""

from __future__ import annotations

# Attribute on a step's attention metadata: dict[batch row -> KeyBiasCSR of that one sequence].
BATCH_BIAS_ATTR = "atman_bias"
# What both backends' impls call on their stock base class, as they call it.
IMPL_FORWARD_PARAMS = ("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output", "output_scale",
                       "output_block_scale")
IMPL_INIT_PARAMS = ("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window")


def check_stock_impl(impl_cls: type) -> None:
    """The stock attention impl a backend subclasses has the methods it overrides, as they are called."""
    from .seams import expect_function

    expect_function("backend", impl_cls, "forward", IMPL_FORWARD_PARAMS)
    expect_function("backend", impl_cls, "__init__", IMPL_INIT_PARAMS)


def refuse_unsupported_features(impl, *, windowed: bool, quantised_kv: bool) -> None:
    """Refuse, when the engine builds its attention layers, model features the biased
    recomputation would get wrong (it implements plain causal softmax attention).

    Raised at start-up rather than in a step: a step that raises stops the engine
    for every user. Decoder self-attention only; other layers never get a bias.
    """
    from vllm.v1.attention.backend import AttentionType

    if getattr(impl, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
        return
    unsupported = {
        "sliding-window attention": windowed,
        "ALiBi": getattr(impl, "alibi_slopes", None) is not None,
        "attention sinks": getattr(impl, "sinks", None) is not None,
        "logits soft-cap": bool(getattr(impl, "logits_soft_cap", None)),
        "a quantised KV cache": quantised_kv,
    }
    found = [name for name, on in unsupported.items() if on]
    if found:
        raise NotImplementedError(
            f"atman-vllm cannot perturb attention with {', '.join(found)}: this model or KV-cache setting is not "
            "supported (run without the atman plugin, e.g. VLLM_PLUGINS='', to serve it stock)")
