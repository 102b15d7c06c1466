"""Images for the backends: the caller's images as ``PromptImage``s, and how an Idefics3 processor sees them.

Outside the core (it needs PIL, and transformers for the vision tower). Both
backends use it: the reference (transformers) and the vLLM front end, so both
tokenize and tile an image the same way.

- ``prompt_image``: a PIL image, a numpy array (H × W × 3 or H × W, uint8) or
  encoded bytes (PNG, JPEG, ...) -> ``PromptImage`` (RGB pixels, their
  sha256, the original size). Limits are checked before decoding: at most
  ``MAX_IMAGE_BYTES`` encoded bytes and ``MAX_IMAGE_PIXELS`` pixels (read
  from the header), so a huge or malicious image fails alone with a
  field-named error instead of exhausting memory.
- ``Idefics3Vision``: the core's ``VisionModel`` for an ``Idefics3Processor``
  without image splitting: the placeholder ``<image>`` expands to
  ``<fake_token_around_image><global-img>`` + ``image_seq_len`` ×
  ``<image>`` + ``<fake_token_around_image>``, the cells are a
  √seq × √seq grid (row-major, the connector's pixel-shuffle order), and the
  processor stretches every image to its square input (content = the whole
  square: see core/images.py). Cell embeddings (for κ) are the connector's
  output, the decoder input embeddings at the cell positions.
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from atman_vllm.core import ImageLayout, InvalidRequestError, PromptImage
from atman_vllm.core.images import FULL

MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def _check_size(width: int, height: int, field: str, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise InvalidRequestError(field, f"is empty ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise InvalidRequestError(field, f"is {width}x{height} pixels; at most {max_pixels} pixels are taken")


def prompt_image(value: Any, field: str = "images", *, max_pixels: int = MAX_IMAGE_PIXELS,
                 max_bytes: int = MAX_IMAGE_BYTES) -> PromptImage:
    """The caller's image (PIL image, numpy array, or encoded bytes) as a core ``PromptImage`` (RGB)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, PromptImage):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if len(data) > max_bytes:
            raise InvalidRequestError(field, f"is {len(data)} bytes; at most {max_bytes} are taken")
        try:
            with Image.open(io.BytesIO(data)) as im:
                _check_size(im.width, im.height, field, max_pixels)  # from the header, before decoding
                im.load()
                image = im.convert("RGB")
        except InvalidRequestError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise InvalidRequestError(field, f"is not an image PIL can read ({exc})") from None
    elif isinstance(value, np.ndarray):
        arr = value
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
            raise InvalidRequestError(field, f"an array image must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); "
                                             f"got {arr.dtype} {arr.shape}")
        _check_size(arr.shape[1], arr.shape[0], field, max_pixels)
        image = Image.fromarray(arr).convert("RGB")
    elif isinstance(value, Image.Image):
        _check_size(value.width, value.height, field, max_pixels)
        image = value.convert("RGB")
    else:
        raise InvalidRequestError(field, f"must be a PIL image, a numpy array or image bytes, got {type(value).__name__}")
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
    return PromptImage(digest, image.width, image.height, data=image)


def prompt_images(values: Sequence, field: str = "images") -> tuple[PromptImage, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidRequestError(field, "must be a list of images")
    return tuple(prompt_image(v, f"{field}[{i}]" if len(values) > 1 else field) for i, v in enumerate(values))


ImageFeatures = Callable[[Any], Any]  # pixel_values [n, 3, H, W] (torch) -> [n, cells, d] features (torch)


class Idefics3Vision:
    """``VisionModel`` (core/images.py) of an Idefics3 processor without image splitting."""

    def __init__(self, processor, features: ImageFeatures | None = None):
        image_processor = processor.image_processor
        if getattr(image_processor, "do_image_splitting", False):
            raise ValueError("only Idefics3 processors without image splitting are supported "
                             "(do_image_splitting=False): a split image's tiles are not one grid")
        self.processor = processor
        self.placeholder = processor.image_token
        seq = int(processor.image_seq_len)
        side = math.isqrt(seq)
        if side * side != seq:
            raise ValueError(f"image_seq_len {seq} is not a square grid")
        self.rows = self.cols = side
        self.cell_token_id = int(processor.tokenizer.convert_tokens_to_ids(processor.image_token))
        fake = processor.fake_image_token
        self.expansion = fake + processor.global_image_tag + processor.image_token * seq + fake
        self._features = features
        self._cache: dict[str, np.ndarray] = {}

    def image_layout(self, image: PromptImage) -> ImageLayout:
        return ImageLayout(self.expansion, self.cell_token_id, self.rows, self.cols, FULL)

    def pixel_values(self, images: Sequence[PromptImage]):
        """[n, 3, H, W] float32 pixels as the processor prepares them (torch)."""
        out = self.processor.image_processor([[im.data] for im in images], do_image_splitting=False,
                                             return_tensors="pt")
        pv = out["pixel_values"]
        return pv.reshape(-1, *pv.shape[-3:])

    def cell_embeddings(self, image: PromptImage) -> np.ndarray | None:
        if self._features is None:
            return None
        if image.digest not in self._cache:
            import torch

            with torch.no_grad():
                feats = self._features(self.pixel_values([image]))
            self._cache[image.digest] = feats.reshape(-1, feats.shape[-1]).double().numpy()
        return self._cache[image.digest]


def idefics3_features_from_checkpoint(model_dir: str | Path) -> ImageFeatures:
    """The vision tower and connector of an Idefics3 checkpoint, loaded alone (not the decoder), as
    ``pixel_values -> features``: what the front end needs for κ over image cells."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer

    config = AutoConfig.from_pretrained(str(model_dir))
    config.vision_config._attn_implementation = "eager"
    vision, connector = Idefics3VisionTransformer(config.vision_config), Idefics3Connector(config)
    prefixes = {"model.vision_model.": vision, "model.connector.": connector}
    states: dict[str, dict] = {p: {} for p in prefixes}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for key, tensor in load_file(str(path)).items():
            for prefix in prefixes:
                if key.startswith(prefix):
                    states[prefix][key[len(prefix):]] = tensor
    for prefix, module in prefixes.items():
        module.load_state_dict(states[prefix])
        module.to(torch.float32).eval()

    def features(pixel_values):
        hidden = vision(pixel_values=pixel_values.to(torch.float32)).last_hidden_state
        return connector(hidden)

    return features
