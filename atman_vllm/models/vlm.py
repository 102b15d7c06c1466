"""A tiny Idefics3 (SmolVLM's architecture), built locally, that transformers and vLLM load.

``build_tiny_vlm(out_dir, seed=0, **sizes)`` writes a Hugging Face model
directory: ``config.json`` and float32 ``model.safetensors`` of an
``Idefics3ForConditionalGeneration`` (a SigLIP-style vision tower, a pixel
shuffle connector, a Llama decoder) with random weights, deterministic by
seed, and its processor (``Idefics3Processor``: the word-level tokenizer of
the shapes task with the image special tokens, the PIL image processor, a
chat template). vLLM 0.32.0 loads it on CPU without torchvision (its LLaVA
module needs torchvision; Idefics3's does not). ``train_vlm`` trains the same
architecture into the shipped ``tiny-shapes-vlm``.

    python -m atman_vllm.models.vlm /tmp/tiny-vlm

**How an image becomes decoder tokens.** The image processor (with
``do_image_splitting=False``) first resizes the image so its longest edge is
``image_size`` (64) keeping the aspect ratio, then resizes *that* to
``image_size × image_size``: a non-square image is **stretched** to the
square, never padded or cropped (``Idefics3ImageProcessorPil._preprocess``;
padding only evens out images of different sizes in one batch, and every
image is square by then). Pixel (x, y) of a W×H original therefore lands at
(x·64/W, y·64/H): a rectangle in [0, 1] image coordinates is the same
rectangle of the model's input. LANCZOS resampling; a 64×64 image passes
unchanged. The vision tower cuts the 64×64 input into 8×8 patches of 8×8
pixels (row-major); the connector's pixel shuffle (scale factor 2) merges each
2×2 block of patches into one decoder token, so the image becomes
``image_seq_len = 16`` decoder tokens, row-major over a **4×4 grid**: token k
covers the pixel rectangle rows ``16·(k // 4) … +16``, columns
``16·(k % 4) … +16``, i.e. ``{left: (k % 4)/4, top: (k // 4)/4, width: 1/4,
height: 1/4}`` of the original image. In the prompt (transformers and vLLM
alike) the placeholder ``<image>`` expands to
``<fake_token_around_image><global-img>`` + 16 × ``<image>`` +
``<fake_token_around_image>``; the 16 ``<image>`` positions carry the image
embeddings in that order.

**vLLM.** ``vllm_kwargs()`` gives what ``LLM(...)`` needs beyond the model
path: ``limit_mm_per_prompt={"image": n}`` and
``mm_processor_kwargs={"do_image_splitting": False}``. A prompt is
``{"prompt": "Question: What colour is the triangle? <image> Answer:",
"multi_modal_data": {"image": pil_image}}`` (the shapes task's form: the
question before the image, ``quality.scenes.PLAIN_PROMPT``).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from .factory import cached_build, init_random_weights, word_level_tokenizer

# Bumped whenever the build changes what it writes, so cached dirs rebuild.
_BUILD_FORMAT = 1
_BUILD_INFO = "atman_tiny_vlm.json"  # written last: its presence marks a complete build

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
IMAGE_SPECIAL_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, END_OF_UTTERANCE)

# SmolVLM's template, reduced: "User:" + the message's parts in order (an
# image part becomes "<image>") + "<end_of_utterance>\n"; the generation
# prompt is "Assistant:". train_vlm trains on exactly this form (and on the
# plain "Question: ... <image> Answer:" form).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass(frozen=True)
class TinyVLMSpec:
    """Everything that determines a build; equal specs give identical files."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 8
    scale_factor: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 256
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    head_dim: int = 32  # a head size vLLM's CPU attention supports (32, 64, 80, 96, 112, 128, ...)
    intermediate: int = 512
    max_position: int = 512
    build_format: int = _BUILD_FORMAT

    @property
    def grid(self) -> int:
        """Side of the grid of decoder image tokens (patches per side / scale factor)."""
        return self.image_size // self.patch_size // self.scale_factor

    @property
    def image_seq_len(self) -> int:
        return self.grid * self.grid

    def check(self) -> None:
        if self.image_size % (self.patch_size * self.scale_factor):
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of "
                             f"patch_size * scale_factor ({self.patch_size} * {self.scale_factor})")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden ({self.vision_hidden}) must be a multiple of vision_heads")


def build_tokenizer():
    """The shapes task's word-level tokenizer with Idefics3's image special tokens."""
    from atman_vllm.quality.scenes import vocabulary_text

    return word_level_tokenizer(vocabulary_text(), extra_special=IMAGE_SPECIAL_TOKENS)


def build_processor(spec: TinyVLMSpec, tokenizer=None):
    """``Idefics3Processor``: tokenizer, PIL image processor (no splitting, 64 px), chat template."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    # The PIL backend by name: the default class needs torchvision, which does not load here.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": spec.image_size},
        max_image_size={"longest_edge": spec.image_size},
    )
    return Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        image_seq_len=spec.image_seq_len, chat_template=CHAT_TEMPLATE,
    )


def model_config(spec: TinyVLMSpec, tokenizer):
    from transformers import Idefics3Config

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
            num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
            image_size=spec.image_size, patch_size=spec.patch_size,
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=spec.hidden,
            intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads, num_key_value_heads=spec.heads, head_dim=spec.head_dim,
            max_position_embeddings=spec.max_position, rms_norm_eps=1e-5, tie_word_embeddings=False, **ids,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        scale_factor=spec.scale_factor,
        tie_word_embeddings=False,
        **ids,
    )
    config.dtype = "float32"
    return config


def new_model(spec: TinyVLMSpec, tokenizer):
    """A freshly initialised ``Idefics3ForConditionalGeneration`` (float32, seeded)."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    spec.check()
    torch.manual_seed(spec.seed)
    model = Idefics3ForConditionalGeneration(model_config(spec, tokenizer))
    init_random_weights(model, spec.seed, spec.hidden)
    return model


def build_tiny_vlm(out_dir, seed: int = 0, **sizes) -> Path:
    """Build (or reuse) a random-weight tiny Idefics3 in ``out_dir``; return the dir.

    ``sizes``: any field of ``TinyVLMSpec`` (``vision_hidden``, ``layers``,
    ``head_dim``, ...). Calling again with the same arguments on a complete
    build is a no-op.
    """
    spec = TinyVLMSpec(seed=seed, **sizes)
    spec.check()
    def build(out: Path) -> None:
        processor = build_processor(spec)
        save(new_model(spec, processor.tokenizer).eval(), processor, out)

    return cached_build(out_dir, _BUILD_INFO, asdict(spec), build)


def save(model, processor, out: Path) -> None:
    """Model and processor files in ``out`` (what transformers and vLLM load)."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))


def load_processor(model_dir):
    """The directory's ``Idefics3Processor`` (PIL image backend)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir), backend="pil")


def vllm_kwargs(max_images: int = 1) -> dict:
    """What ``vllm.LLM(model=dir, ...)`` needs for this model beyond the usual arguments."""
    return dict(limit_mm_per_prompt={"image": max_images}, mm_processor_kwargs={"do_image_splitting": False})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random-weight Idefics3 model directory.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_vlm(args.out_dir, seed=args.seed))


if __name__ == "__main__":
    main()
