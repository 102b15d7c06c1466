"""The tiny-model factory: tokenizer behaviour, determinism, caching, configs."""

from __future__ import annotations

import json

import pytest
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoTokenizer

from atman_vllm.core import HFTokenizer
from atman_vllm.models import FAMILIES, build_tiny_model, load_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Alice  found a lamp\n\nin the old library; Q: where? A: there!",
    "Zürich — naïve café, 42 € and 😀 emoji",
    "   leading and trailing spaces   ",
    "tabs\tand\r\nwindows newlines",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text_and_gives_offsets(tiny_models, text):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert tok.decode(ids) == text
    assert len(offsets) == len(ids)
    ends = [e for _, e in offsets]
    assert all(0 <= s <= e <= len(text) for s, e in offsets)
    assert ends == sorted(ends)
    # Every non-whitespace character is covered by some token's span.
    covered = {i for s, e in offsets for i in range(s, e)}
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    if text.isascii():  # one byte per char: each token's span is exactly its text, minus the glued space
        for i, (s, e) in zip(ids, offsets):
            assert tok.decode([i]).strip() == text[s:e].strip()


def test_tokenizer_prepends_bos_and_core_adapter_sees_it(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["gpt2"])
    ids = tok("hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 3, 0)
    adapter = load_tokenizer(tiny_models["gpt2"])
    assert isinstance(adapter, HFTokenizer)
    assert adapter.bos_token_id == 1
    body, offsets = adapter.encode("hello world")
    assert body == ids[1:] and len(offsets) == len(body)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_matches_the_request(tiny_models, family):
    cfg = AutoConfig.from_pretrained(tiny_models[family])
    tok = AutoTokenizer.from_pretrained(tiny_models[family])
    assert cfg.vocab_size == len(tok) == 1024
    assert cfg.dtype in ("float32", None) or str(cfg.dtype).endswith("float32")
    heads = cfg.num_attention_heads
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    assert head_size == 32
    kv_heads = getattr(cfg, "num_key_value_heads", heads)
    assert (kv_heads < heads) == (family in ("llama", "qwen2"))
    weights = load_file(tiny_models[family] / "model.safetensors")
    assert all(w.dtype.name == "float32" for w in weights.values())
    assert sum(w.size for w in weights.values()) < 1_500_000  # "a few MB"
    if family == "qwen2":  # biased q/k/v, and the biases are not all zero
        assert abs(weights["model.layers.0.self_attn.q_proj.bias"]).max() > 0.01


def test_build_is_deterministic_by_seed_and_cached(tmp_path):
    a = build_tiny_model("llama", tmp_path / "a", seed=7, layers=1)
    b = build_tiny_model("llama", tmp_path / "b", seed=7, layers=1)
    c = build_tiny_model("llama", tmp_path / "c", seed=8, layers=1)
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert any((wa[k] != wc[k]).any() for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()

    # Same arguments again: nothing is rewritten.
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model("llama", a, seed=7, layers=1) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    # Different arguments into the same dir: rebuilt.
    build_tiny_model("llama", a, seed=8, layers=1)
    assert json.loads((a / "atman_tiny_model.json").read_text())["seed"] == 8
    assert all((load_file(a / "model.safetensors")[k] == wc[k]).all() for k in wc)
    # An interrupted build (its marker not final yet) is rebuilt, not taken for complete.
    (a / "atman_tiny_model.json").write_text('{"complete": false}\n')
    assert build_tiny_model("llama", a, seed=8, layers=1) == a
    assert json.loads((a / "atman_tiny_model.json").read_text())["seed"] == 8


def test_never_builds_over_another_model(tmp_path):
    """A directory with files but no build marker (a prepared or trained checkpoint given by
    mistake) is refused and left as it was."""
    from atman_vllm.models import build_tiny_vlm

    theirs = tmp_path / "checkpoint"
    theirs.mkdir()
    (theirs / "config.json").write_text('{"model_type": "llama"}')
    for build in (lambda: build_tiny_model("llama", theirs, layers=1), lambda: build_tiny_vlm(theirs)):
        with pytest.raises(FileExistsError, match="not overwritten"):
            build()
    assert [p.name for p in theirs.iterdir()] == ["config.json"]


def test_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="family"):
        build_tiny_model("bert", tmp_path)
    with pytest.raises(ValueError, match="kv_heads"):
        build_tiny_model("gpt2", tmp_path, kv_heads=2)
    with pytest.raises(ValueError, match="hidden"):
        build_tiny_model("gpt_neox", tmp_path, hidden=128, heads=4, head_dim=64)
