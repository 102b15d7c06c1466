"""Prompts shared by the engine tests."""

SHORT = "Ben likes to eat burgers and fries. Mira works as a pilot in Lisbon."
# About 120 tokens: several 32-token KV blocks, longer than the 64-token prefill chunk.
LONG = (
    "Otto lives in Lisbon and works as a baker. Mira lives in Oslo. She flies planes for a living. "
    "The quick brown fox jumps over the lazy dog, twice, while the cat sleeps on the warm mat. "
    "Every morning Ben eats burgers with fries and drinks a cup of black coffee before work. "
    "Q: Where does Otto live? A:"
)

_OPTION_SETS = [
    (SHORT, " Lisbon.", dict(granularity="token")),
    (SHORT, " Lisbon", dict(granularity="sentence", mode="multiplicative")),
    (SHORT, " pilot in Lisbon.", dict(granularity="token", kappa=0.6, target_granularity="token")),
    (LONG, " Lisbon.", dict(granularity="word", mode="multiplicative", kappa=0.6)),
    (LONG, " in Lisbon", dict(granularity="sentence", target_granularity="token")),
]
_CHUNKED_SETS = [
    (LONG, " Lisbon.", dict(granularity=g, mode=m))
    for g in ("token", "sentence") for m in ("log-additive", "multiplicative")
]
# (engine, family, prompt, target, options); engine "chunked" is llama with a 64-token prefill chunk.
FIDELITY_CASES = [(f, f, p, t, o) for f in ("llama", "qwen2", "gpt2", "gpt_neox") for p, t, o in _OPTION_SETS]
FIDELITY_CASES += [("chunked", "llama", p, t, o) for p, t, o in _CHUNKED_SETS]
