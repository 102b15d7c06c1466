"""Explanation quality on images (the paper's Table 2): rank image tiles against the asked object.

For each held-out scene (``quality.scenes``) the prompt is the question with
the image, the target the answer word. Every method scores the image's
**tiles**: the cells of the model's grid of image tokens (4 × 4 for the
shapes VLM: one cell = one decoder image token = 16 × 16 pixels). A tile is
*positive* if any pixel of the asked object lies in it
(``Scene.tile_mask``); AP and recall@k per scene and their means (mAP, mAR)
come from ``metrics.score_example`` exactly as for text units (a tile is the
span ``(k, k + 1)`` of its row-major index).

Methods (baselines on plain transformers, eager attention):

- ``grad-x-input``: Captum ``InputXGradient`` of log p(target) on the pixel
  values, summed over the tile's pixels and channels.
- ``integrated-gradients``: Captum ``IntegratedGradients`` on the pixels from
  the scene's background (every object painted over) to the scene,
  ``baselines.IG_STEPS`` steps, summed per tile.
- ``attention-rollout``: rollout over the decoder's layers (``baselines.
  attention_rollout``) from the row that predicts the target to the image
  tokens (one per tile).
- ``ablation``: Captum ``FeatureAblation`` with one feature per tile: the
  tile's pixels painted with the background colour; score = log p(target) −
  log p(target | tile painted over).
- ``random``: a seeded uniform score per tile (chance level).
- AtMan variants (``harness.ATMAN_VARIANTS``: log-additive / multiplicative,
  κ off / on, factor 0.1) through the project's explain API on images
  (``AtmanLLM.explain_many`` on the vLLM engine, image granularity "token":
  one tile per cell; its tile scores are matched to the grid through their
  rectangles).

Costs as in the text harness (``baselines.Cost``): forward and backward passes
through the decoder's final norm per scene, wall time, peak extra memory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .baselines import IG_BATCH, IG_STEPS, Cost, PassCounter, PeakMemory, attention_rollout
from .metrics import ExampleScore, Summary, score_example, summarize
from .scenes import Scene, generate_scenes

SHIPPED_VLM_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes_vlm"
HELD_OUT_SEED = 30_001  # neither the training stream nor train_vlm's held-out set
BASELINE_METHODS = ("grad-x-input", "integrated-gradients", "attention-rollout", "ablation", "random")


@dataclass(frozen=True)
class PreparedScene:
    index: int
    scene: Scene
    input_ids: tuple[int, ...]  # [BOS] prompt (image expanded) target
    target_start: int
    image_positions: tuple[int, ...]  # the image tokens' positions, row-major over the grid
    positives: np.ndarray  # bool [grid * grid]: tiles holding the asked object


class VLMModel:
    """The VLM under explanation on plain transformers (eager attention: weights visible)."""

    def __init__(self, model_dir: str | Path, threads: int | None = None, ig_steps: int = IG_STEPS):
        import torch
        from transformers import Idefics3ForConditionalGeneration

        from atman_vllm.models.vlm import load_processor

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = str(model_dir)
        self.ig_steps = ig_steps
        self.model = Idefics3ForConditionalGeneration.from_pretrained(
            self.model_dir, dtype=torch.float32, attn_implementation="eager").eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = load_processor(self.model_dir)
        self.tokenizer = self.processor.tokenizer
        self.grid = int(round(self.processor.image_seq_len ** 0.5))
        self.image_token_id = self.model.config.image_token_id

    @property
    def decoder_norm(self):
        return self.model.model.text_model.norm

    def prepare(self, scenes: Sequence[Scene]) -> list[PreparedScene]:
        out = []
        for i, scene in enumerate(scenes):
            prompt = self.processor(text=[scene.prompt()], images=[[scene.image()]])["input_ids"][0]
            target = self.tokenizer(" " + scene.answer, add_special_tokens=False)["input_ids"]
            ids = tuple(int(t) for t in prompt) + tuple(target)
            positions = tuple(p for p, t in enumerate(ids) if t == self.image_token_id)
            if len(positions) != self.grid * self.grid:
                raise ValueError(f"scene {i}: {len(positions)} image tokens, expected {self.grid ** 2}")
            out.append(PreparedScene(i, scene, ids, len(prompt), positions, scene.tile_mask(self.grid).reshape(-1)))
        return out

    def pixels(self, scene: Scene, background_only: bool = False):
        """``pixel_values`` [1, 1, 3, H, W] of the scene (or of its background: every object painted over)."""
        import torch

        image = Scene(scene.objects, scene.target, tuple(range(len(scene.objects)))).image() if background_only \
            else scene.image()
        return torch.as_tensor(np.asarray(self.processor.image_processor([[image]])["pixel_values"]))

    def target_logprob_fn(self, ex: PreparedScene) -> Callable:
        """pixels [B, 1, 3, H, W] -> log p(target | prompt, image) [B] (the target's tokens summed)."""
        import torch

        ids = torch.tensor([ex.input_ids])
        tgt = ids[0, ex.target_start:]
        rows = torch.arange(ex.target_start - 1, len(ex.input_ids) - 1)

        def f(pixels):
            logits = self.model(input_ids=ids.expand(pixels.shape[0], -1), pixel_values=pixels).logits
            logp = torch.log_softmax(logits[:, rows].float(), -1)
            return logp[:, torch.arange(len(tgt)), tgt].sum(-1)

        return f

    def tile_sums(self, pixel_scores) -> np.ndarray:
        """Pixel attributions [1, 1, C, H, W] summed per tile of the grid -> [grid * grid] row-major."""
        a = pixel_scores.detach().double().sum(dim=(0, 1, 2)).numpy()  # [H, W]
        h, w = a.shape
        g = self.grid
        return a.reshape(g, h // g, g, w // g).sum(axis=(1, 3)).reshape(-1)

    def tile_feature_mask(self):
        """[1, 1, 3, H, W] long: each pixel's tile index (Captum's feature mask)."""
        import torch

        size = self.processor.image_processor.max_image_size["longest_edge"]
        cell = size // self.grid
        rows = torch.arange(size) // cell
        tiles = rows[:, None] * self.grid + rows[None, :]
        return tiles.expand(1, 1, 3, size, size).clone()


# --------------------------------------------------------------------------- methods


def _grad_x_input(vlm: VLMModel, ex: PreparedScene) -> np.ndarray:
    from captum.attr import InputXGradient

    return vlm.tile_sums(InputXGradient(vlm.target_logprob_fn(ex)).attribute(vlm.pixels(ex.scene)))


def _integrated_gradients(vlm: VLMModel, ex: PreparedScene) -> np.ndarray:
    from captum.attr import IntegratedGradients

    res = IntegratedGradients(vlm.target_logprob_fn(ex)).attribute(
        vlm.pixels(ex.scene), baselines=vlm.pixels(ex.scene, background_only=True), n_steps=vlm.ig_steps,
        internal_batch_size=IG_BATCH)
    return vlm.tile_sums(res)


def _ablation(vlm: VLMModel, ex: PreparedScene) -> np.ndarray:
    from captum.attr import FeatureAblation

    pixels = vlm.pixels(ex.scene)
    background = vlm.pixels(ex.scene, background_only=True)
    res = FeatureAblation(vlm.target_logprob_fn(ex)).attribute(
        pixels, baselines=background, feature_mask=vlm.tile_feature_mask())
    # Every pixel of a tile carries the tile's score: read one per tile.
    cell = pixels.shape[-1] // vlm.grid
    return res[0, 0, 0, ::cell, ::cell].detach().double().numpy().reshape(-1)


def _attention_rollout(vlm: VLMModel, ex: PreparedScene) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = vlm.model(input_ids=torch.tensor([ex.input_ids]), pixel_values=vlm.pixels(ex.scene),
                        output_attentions=True)
    rows = range(ex.target_start - 1, len(ex.input_ids) - 1)
    scores = attention_rollout([a[0].double() for a in out.attentions], rows)
    return scores[list(ex.image_positions)]


def _random(vlm: VLMModel, ex: PreparedScene, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([seed, ex.index]).random(vlm.grid * vlm.grid)


_METHODS: dict[str, Callable[[VLMModel, PreparedScene], np.ndarray]] = {
    "grad-x-input": _grad_x_input,
    "integrated-gradients": _integrated_gradients,
    "attention-rollout": _attention_rollout,
    "ablation": _ablation,
    "random": _random,
}


def run_baseline(name: str, vlm: VLMModel, prepared: Sequence[PreparedScene]) -> tuple[list[np.ndarray], Cost]:
    """Tile scores of one baseline on every scene, and its cost."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(_METHODS)}")
    fn = _METHODS[name]
    scores: list[np.ndarray] = []
    cost = Cost(examples=len(prepared))
    counter = PassCounter(vlm.model, norm=vlm.decoder_norm)
    try:
        with PeakMemory() as mem:
            started = time.perf_counter()
            for ex in prepared:
                scores.append(np.asarray(fn(vlm, ex), dtype=np.float64))
            cost.wall_s = time.perf_counter() - started
        cost.peak_memory_bytes = mem.peak_bytes
        cost.forward_passes, cost.backward_passes = counter.forward, counter.backward
    finally:
        counter.close()
    return scores, cost


# --------------------------------------------------------------------------- AtMan


def atman_tile_scores(result, grid: int) -> np.ndarray:
    """An AtMan result's scores of the (single) image's cells, row-major, matched through their rectangles."""
    out = np.full(grid * grid, np.nan)
    for s in result.explanations[0].prompt_scores:
        if s.image is None:
            continue
        r, c = int(round(s.rect.top * grid)), int(round(s.rect.left * grid))
        if s.rect.width * grid > 1.001 or s.rect.height * grid > 1.001:
            raise ValueError(f"a tile {s.rect.to_dict()} larger than one cell: ask for image granularity 'token'")
        out[r * grid + c] = s.score
    if np.isnan(out).any():
        raise ValueError(f"AtMan scored {int((~np.isnan(out)).sum())} of the image's {grid * grid} cells")
    return out


def atman_explain_many(explainer) -> Callable[[Sequence[PreparedScene], object], list]:
    """``explain_many(scenes, options)`` through an ``AtmanLLM`` (the project's explain API on images)."""
    def explain_many(scenes: Sequence[PreparedScene], options) -> list:
        return explainer.explain_many([
            explainer.explain_request(ex.scene.prompt(), " " + ex.scene.answer, options, images=[ex.scene.image()])
            for ex in scenes])

    return explain_many


def load_atman(model_dir: str | Path):
    """The vLLM AtMan backend for the harness (in-process engine, the text harness's settings)."""
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from atman_vllm.api import AtmanLLM

    from .harness import VLLM_ENGINE_ARGS

    return AtmanLLM(str(model_dir), **VLLM_ENGINE_ARGS)


def run_atman(explain_many: Callable[[Sequence[PreparedScene], object], list], variant, vlm: VLMModel,
              prepared: Sequence[PreparedScene]) -> tuple[list[np.ndarray], Cost, dict]:
    """Tile scores of one AtMan variant (``harness.AtmanVariant``) on every scene.

    ``explain_many(scenes, options)`` runs the project's explain API on the
    scenes' prompts with their images and returns one ``ExplainResult`` each.
    """
    from .harness import timed_explanations

    options = variant.options("token")
    return timed_explanations(lambda part: explain_many(part, options), prepared,
                              lambda _scene, res: atman_tile_scores(res, vlm.grid))


# --------------------------------------------------------------------------- evaluation


@dataclass
class ImageRow:
    method: str
    backend: str
    summary: Summary
    cost: dict

    def to_dict(self) -> dict:
        return {"method": self.method, "backend": self.backend, "summary": self.summary.to_dict(), "cost": self.cost}


def score_tiles(prepared: Sequence[PreparedScene], scores: Sequence[np.ndarray]) -> Summary:
    per: list[ExampleScore | None] = []
    for ex, s in zip(prepared, scores, strict=True):
        spans = [(k, k + 1) for k in range(len(s))]
        evidence = [(int(k), int(k) + 1) for k in np.flatnonzero(ex.positives)]
        per.append(score_example(spans, s, evidence, ex.scene.asked.shape))
    return summarize(per)


@dataclass
class ImageReport:
    model_dir: str
    n_scenes: int
    seed: int
    accuracy: float  # the model's greedy accuracy on the scenes (all are scored, answered or not)
    rows: list[ImageRow]

    def to_dict(self) -> dict:
        return {"model_dir": self.model_dir, "n_scenes": self.n_scenes, "seed": self.seed,
                "accuracy": self.accuracy, "rows": [r.to_dict() for r in self.rows]}


def greedy_accuracy(vlm: VLMModel, prepared: Sequence[PreparedScene]) -> float:
    import torch

    hits = 0
    for ex in prepared:
        with torch.no_grad():
            logits = vlm.model(input_ids=torch.tensor([ex.input_ids[:ex.target_start]]),
                               pixel_values=vlm.pixels(ex.scene)).logits[0, -1]
        hits += int(int(logits.argmax()) == ex.input_ids[ex.target_start])
    return hits / max(1, len(prepared))


def evaluate(n_scenes: int = 100, *, model_dir: str | Path = SHIPPED_VLM_DIR, seed: int = HELD_OUT_SEED,
             methods: Sequence[str] = BASELINE_METHODS, atman_variants: Sequence[str] = (), explainer=None,
             threads: int | None = None, log: Callable[[str], None] = print) -> ImageReport:
    """Score every baseline in ``methods`` and every AtMan variant (``harness.ATMAN_VARIANTS`` names) on
    fresh scenes; AtMan through ``explainer`` (default: ``load_atman(model_dir)``)."""
    from .harness import ATMAN_VARIANTS

    unknown = [m for m in methods if m not in _METHODS] + [v for v in atman_variants if v not in ATMAN_VARIANTS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}")
    atman = []
    if atman_variants:
        explain_many = atman_explain_many(explainer if explainer is not None else load_atman(model_dir))
        atman = [(ATMAN_VARIANTS[v], explain_many) for v in atman_variants]
    vlm = VLMModel(model_dir, threads=threads)
    prepared = vlm.prepare(generate_scenes(n_scenes, seed))
    accuracy = greedy_accuracy(vlm, prepared)
    log(f"{len(prepared)} scenes, model accuracy {accuracy:.3f}")
    rows: list[ImageRow] = []
    for variant, explain_many in atman:
        explain_many(prepared[:1], variant.options("token"))  # warm-up, not charged
        scores, cost, tokens = run_atman(explain_many, variant, vlm, prepared)
        rows.append(ImageRow(variant.name, "vllm", score_tiles(prepared, scores), {**cost.per_example(), **tokens}))
        log(f"{variant.name}: mAP {rows[-1].summary.mAP:.3f}")
    vlm.target_logprob_fn(prepared[0])(vlm.pixels(prepared[0].scene))  # warm-up
    for name in methods:
        scores, cost = run_baseline(name, vlm, prepared)
        rows.append(ImageRow(name, "transformers", score_tiles(prepared, scores), cost.per_example()))
        log(f"{name}: mAP {rows[-1].summary.mAP:.3f}")
    return ImageReport(str(model_dir), len(prepared), seed, accuracy, rows)


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


def markdown_table(report: ImageReport) -> str:
    lines = ["| method | backend | mAP | mAR | IQM mAP | IQM mAR | fwd/ex | bwd/ex | wall s/ex | peak MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        s, c = r.summary, r.cost
        lines.append(f"| {r.method} | {r.backend} | {_fmt(s.mAP)} | {_fmt(s.mAR)} | {_fmt(s.iqm_AP)} | "
                     f"{_fmt(s.iqm_AR)} | {c['forward_passes_per_example']:.1f} | "
                     f"{c['backward_passes_per_example']:.1f} | {c['wall_s_per_example']:.4f} | "
                     f"{c['peak_memory_bytes'] / (1 << 20):.1f} |")
    return "\n".join(lines)


def write_outputs(report: ImageReport, markdown_path: Path, json_path: Path, preamble: str = "") -> None:
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(preamble + markdown_table(report) + "\n")
    json_path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
