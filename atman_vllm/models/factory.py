"""Tiny random-weight models, built locally, for tests and benchmarks.

``build_tiny_model(family, out_dir)`` writes a Hugging Face model directory
(``config.json``, float32 ``model.safetensors``, a byte-level BPE tokenizer)
that both transformers and vLLM load without any download. Weights are random
but deterministic by seed, scaled so attention and logits are not flat.

    python -m atman_vllm.models.factory llama /tmp/tiny-llama
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .corpus import tiny_corpus

FAMILIES = ("llama", "qwen2", "gpt_neox", "gpt2")

# Bumped whenever the build changes what it writes, so cached dirs rebuild.
_BUILD_FORMAT = 1
_BUILD_INFO = "atman_tiny_model.json"  # written last: its presence marks a complete build

SPECIAL_TOKENS = ("<unk>", "<bos>", "<eos>", "<pad>")  # ids 0..3, Llama's order


@dataclass(frozen=True)
class TinyModelSpec:
    """Everything that determines a build; equal specs give identical files."""

    family: str
    seed: int
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    max_position: int
    build_format: int = _BUILD_FORMAT


def build_tiny_model(
    family: str,
    out_dir,
    seed: int = 0,
    *,
    vocab_size: int = 1024,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    head_dim: int = 32,
    intermediate: int | None = None,
    max_position: int = 2048,
) -> Path:
    """Build (or reuse) a tiny model of ``family`` in ``out_dir``; return the dir.

    ``kv_heads`` defaults to ``heads // 2`` for the GQA families (llama,
    qwen2) and must equal ``heads`` for gpt_neox / gpt2. ``head_dim`` must be
    a head size vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...);
    for gpt_neox / gpt2 it must equal ``hidden // heads``. Calling again with
    the same arguments on a complete build is a no-op.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    gqa = family in ("llama", "qwen2")
    if kv_heads is None:
        kv_heads = max(1, heads // 2) if gqa else heads
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not gqa and kv_heads != heads:
        raise ValueError(f"{family} has no grouped-query attention: kv_heads must equal heads")
    if not gqa and hidden != heads * head_dim:
        raise ValueError(f"{family}: hidden ({hidden}) must equal heads * head_dim ({heads} * {head_dim})")
    if intermediate is None:
        intermediate = 3 * hidden if gqa else 4 * hidden
    spec = TinyModelSpec(family, seed, vocab_size, hidden, layers, heads, kv_heads, head_dim, intermediate, max_position)

    def build(out: Path) -> None:
        _build_tokenizer(spec, out)
        _build_model(spec, out)

    return cached_build(out_dir, _BUILD_INFO, asdict(spec), build)


def cached_build(out_dir, marker: str, spec: dict, build: Callable[[Path], None]) -> Path:
    """``build(out_dir)`` unless the directory holds a complete build of the same ``spec``.

    The ``marker`` file says what the directory holds: ``spec`` once the build is complete
    (written last), a placeholder while it runs. A directory with files but no marker is
    someone else's (a prepared or trained checkpoint given by mistake) and is never written to.
    """
    out = Path(out_dir)
    info_path = out / marker
    if info_path.exists():
        try:
            if json.loads(info_path.read_text()) == spec:
                return out
        except ValueError:
            pass  # a damaged marker: rebuild
    elif out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} holds files but no {marker}: it is not a build of this kind, "
                              "so it is not overwritten (give an empty or new directory)")
    out.mkdir(parents=True, exist_ok=True)
    info_path.write_text('{"complete": false}\n')
    build(out)
    info_path.write_text(json.dumps(spec, indent=2) + "\n")
    return out


def load_tokenizer(model_dir):
    """The core ``HFTokenizer`` adapter around the directory's AutoTokenizer."""
    from transformers import AutoTokenizer

    from atman_vllm.core.tokens import HFTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(model_dir)))


# --- tokenizer -------------------------------------------------------------


def _build_tokenizer(spec: TinyModelSpec, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> ever
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer)
    if tok.get_vocab_size() != spec.vocab_size:
        # Model and tokenizer vocabularies must match exactly, or vLLM can
        # sample ids the tokenizer cannot decode.
        raise ValueError(
            f"the built-in corpus yields {tok.get_vocab_size()} tokens, fewer than vocab_size={spec.vocab_size}"
        )
    bos_id = tok.token_to_id("<bos>")
    # Like Llama, every encoded text starts with <bos> (offset (0, 0)); it
    # gives attention a sink that no AtMan unit ever suppresses.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=True),
        processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
        model_max_length=spec.max_position,
    )
    fast.save_pretrained(str(out))


def word_level_tokenizer(texts, *, bos: str = "<s>", eos: str = "</s>", unk: str = "<unk>", pad: str = "<pad>",
                         extra_special: tuple[str, ...] = (), model_max_length: int = 512):
    """A WordLevel tokenizer over the words and punctuation of ``texts``, with BOS and char offsets.

    Ids: ``pad, bos, eos, unk``, then ``extra_special`` (matched whole in any
    text, never split), then the words. Made for small task vocabularies (the
    demo model, the shapes VLM): one token per word, and since leading spaces
    never matter, ``tokenize(prompt + target) == tokenize(prompt) + tokenize(target)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=unk))
    # \w+|[^\w\s]+ : "Lisbon." -> "Lisbon", "."
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[pad, bos, eos, unk, *extra_special], min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    # Joins words with spaces and drops the space before punctuation on decode.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        model_max_length=model_max_length)


# --- model -----------------------------------------------------------------


def _config(spec: TinyModelSpec):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if spec.family in ("llama", "qwen2"):
        cls = LlamaConfig if spec.family == "llama" else Qwen2Config  # Qwen2: q/k/v projections carry biases
        return cls(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
            head_dim=spec.head_dim, max_position_embeddings=spec.max_position, tie_word_embeddings=False,
            rms_norm_eps=1e-6, **ids,
        )
    if spec.family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers, num_attention_heads=spec.heads, max_position_embeddings=spec.max_position,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
            **ids,
        )
    return GPT2Config(
        vocab_size=spec.vocab_size, n_embd=spec.hidden, n_layer=spec.layers, n_head=spec.heads,
        n_inner=spec.intermediate, n_positions=spec.max_position, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, **ids,
    )


def init_random_weights(model, seed: int, hidden: int) -> None:
    """Seeded init that keeps attention and next-token distributions non-flat.

    Linear maps get std 1/sqrt(fan_in) (unit-variance outputs, so q·k/sqrt(d)
    scores have std ~1), embeddings and the output head std 2/sqrt(hidden)
    (logits std ~2 after the final norm), biases and norm gains small noise
    so biased projections (Qwen2 q/k/v, GPT-NeoX) are really exercised.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(seed)
    fan_in = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_in[f"{name}.weight"] = module.in_features
        elif isinstance(module, Conv1D):  # GPT-2 stores weights as [in, out]
            fan_in[f"{name}.weight"] = module.weight.shape[0]
    out_embeddings = model.get_output_embeddings().weight
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1:
                base = 0.0 if name.endswith("bias") else 1.0
                p.copy_(base + 0.1 * noise)
            elif name in fan_in and p is not out_embeddings:
                p.copy_(noise / math.sqrt(fan_in[name]))
            else:  # token / position embeddings, output head
                p.copy_(noise * (2.0 / math.sqrt(hidden)))


def _build_model(spec: TinyModelSpec, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(spec)
    config.dtype = "float32"
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_random_weights(model, spec.seed, spec.hidden)
    model.eval()
    model.save_pretrained(str(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight model directory.")
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_model(args.family, args.out_dir, seed=args.seed)
    print(path)


if __name__ == "__main__":
    main()
