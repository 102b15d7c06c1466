"""AtMan on a plain transformers Idefics3 (image + text prompts): the definition the vLLM path is tested against.

The same explainer as for text (``ReferenceExplainer``: every fork a full
forward pass with the per-key bias in every decoder layer and head); only
the decoder's input differs: each image's cells carry the connector's output
(the projected vision features), exactly as ``Idefics3Model.inputs_merger``
puts them, computed once per image outside the bias scope. The bias applies
to the decoder only: the vision tower runs eager attention, untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from atman_vllm.core import ExplainRequest, HFTokenizer, InvalidRequestError
from atman_vllm.core.images import EncodedImage
from atman_vllm.imaging import Idefics3Vision, prompt_images

from .attention import ATTENTION_NAME
from .explainer import ReferenceExplainer


class ReferenceVLMExplainer(ReferenceExplainer):
    """AtMan over a float32 ``Idefics3ForConditionalGeneration`` and its processor (no image splitting)."""

    def __init__(self, model_dir: str | Path, *, batch_size: int = 16):
        from transformers import AutoProcessor, Idefics3ForConditionalGeneration

        model_dir = str(model_dir)
        model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32,
                                                                 attn_implementation="eager")
        model.model.text_model.set_attn_implementation(ATTENTION_NAME)  # the decoder only
        if model.config.text_config._attn_implementation != ATTENTION_NAME:
            raise ValueError("the decoder cannot use the AtMan attention function")
        self.model = model.eval()
        self.processor = AutoProcessor.from_pretrained(model_dir, backend="pil")  # the torchvision backend fails here
        self.tokenizer = HFTokenizer(self.processor.tokenizer)
        self.batch_size = batch_size
        self.vision = Idefics3Vision(self.processor, self._image_features)

    @torch.no_grad()
    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values[:, None])  # [n, 1, 3, H, W]: one image per row
        return out.pooler_output

    def prompt_images(self, images: Sequence) -> tuple:
        return prompt_images(images)

    def _input_embeds(self, input_ids: torch.Tensor, images: tuple[EncodedImage, ...]) -> torch.Tensor:
        embeds = self.model.get_input_embeddings()(input_ids)
        if images:
            feats = self._image_features(self.vision.pixel_values([im.image for im in images]))
            for im, f in zip(images, feats):
                embeds[:, list(im.cell_positions)] = f.to(embeds.dtype)
        return embeds

    def _forward(self, input_ids: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        hidden = self.model.model.text_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden)

    def embedding_rows(self, token_ids: Sequence[int]):
        weight = self.model.get_input_embeddings().weight
        return weight.detach()[torch.tensor(list(token_ids), dtype=torch.long)].double().numpy()

    def generate_target_ids(self, request: ExplainRequest, max_tokens: int) -> tuple[int, ...]:
        raise InvalidRequestError("target", "the reference explains given targets only; pass one")
