"""Train the shipped ``tiny-shapes-vlm``: a tiny Idefics3 that answers "What colour is the triangle?".

    python -m atman_vllm.models.train_vlm --out atman_vllm/models/shapes_vlm --seed 0

The model is ``vlm.TinyVLMSpec``'s architecture (``build_tiny_vlm``'s, so
everything tested on the random model holds for it) trained from scratch on
``quality.scenes``: 64×64 images with 2–4 shapes of distinct shapes and
colours, one question about one shape, a one-word colour answer. To answer
it must find the asked shape in the image and read its colour there; a scene
with the asked object painted over (``Scene.without_target``) leaves it
guessing among the other colours, which the report measures.

Each step draws a fresh batch of scenes (no fixed training set, so no
memorising) in one of the two prompt forms (plain
``Question: ... <image> Answer:`` or the chat template's
``User:...<image><end_of_utterance>\\nAssistant:``: the question comes
before the image, so the image tokens can attend to it); every prompt of a form
has the same length, so batches need no padding. The loss is the
cross-entropy of the answer word and of the end-of-sequence token after it,
with label smoothing 0.1 (as the demo model, so an explanation's
perturbations move the target's log-probability visibly). AdamW, warmup, a
cosine decay at the end (``train_demo.lr_at``). One torch thread: the
machine is shared, and it makes a run reproducible to the bit for a seed.

Held-out scenes (seed ``HELD_OUT_SEED``) never come from the training stream.

**Measured (this machine, 2026-12-03, 2 cores, partly shared with a test
run): the defaults below with seed 0 train the shipped model in 12.9 minutes
(5,000 steps): held-out accuracy 0.994 (500 scenes; 0.994 in the chat form),
0.004 with the asked object painted over** — it reads the asked shape's
colour from the image, nowhere else. The weights in ``models/shapes_vlm``
are that run's output (``training_report.json`` beside them holds the
curve). What it took: the tied auxiliary head and 3 decoder layers at lr
1e-3; without the head, runs sat at "a colour of the scene" (0.34–0.43 ≈ 1 /
objects per scene, 2–3 layers, image first or last); with it, 2,500 steps
reached 0.845 and 5,000 steps 0.95 at step 4,000 and 1.0 (200 scenes) at
4,500.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from atman_vllm.models.train_demo import TrainingClock, adamw, lr_at, run_training_cli
from atman_vllm.models.vlm import TinyVLMSpec, build_processor, new_model, save
from atman_vllm.quality.scenes import COLOURS, SHAPES, Scene, generate_scene, generate_scenes, tile_mask

HELD_OUT_SEED = 20_001


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    decay_frac: float = 0.3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    aux_weight: float = 1.0  # weight of the per-cell shape/colour loss on the connector's output (see cell_labels)
    layers: int = 3  # decoder layers; the rest of the architecture is TinyVLMSpec's defaults
    vision_layers: int = 2
    threads: int = 1
    eval_every: int = 500
    eval_n: int = 500
    max_minutes: float = 60.0  # safety stop; the report says when it triggered

    def spec(self) -> TinyVLMSpec:
        return TinyVLMSpec(seed=self.seed, layers=self.layers, vision_layers=self.vision_layers)


def pixel_batch(processor, scenes: list[Scene], hide_target: bool = False) -> torch.Tensor:
    """``pixel_values`` [B, 1, 3, 64, 64] as the model's image processor makes them."""
    images = [[(s.without_target() if hide_target else s).image()] for s in scenes]
    return torch.as_tensor(np.asarray(processor.image_processor(images)["pixel_values"]))


def prompt_ids(processor, scene: Scene, chat: bool) -> list[int]:
    """Token ids of the scene's prompt, the image placeholder expanded as the processor does it."""
    expanded = (processor.fake_image_token + processor.global_image_tag
                + processor.image_token * processor.image_seq_len + processor.fake_image_token)
    return processor.tokenizer(scene.prompt(chat).replace(processor.image_token, expanded))["input_ids"]


def cell_labels(scene: Scene, grid: int) -> np.ndarray:
    """[grid*grid, shapes + colours] 0/1: which shapes and colours have pixels in each image-token cell.

    The target of the training-only auxiliary head on the connector's output
    (the decoder's image tokens). Without it the answer loss alone sat at
    "some colour of the scene" (34% held out after 3,000 steps, measured):
    the vision tower never learnt to tell the shapes apart.
    """
    colours = sorted(COLOURS)
    out = np.zeros((grid * grid, len(SHAPES) + len(colours)), dtype=np.float32)
    for obj in scene.objects:
        cells = tile_mask(obj.mask(), grid).reshape(-1)
        out[cells, SHAPES.index(obj.shape)] = 1.0
        out[cells, len(SHAPES) + colours.index(obj.colour)] = 1.0
    return out


def training_batch(rng: random.Random, processor, cfg: TrainConfig):
    """(input_ids, pixel_values, answer position, cell labels): prompt + answer word + EOS, one prompt form per batch."""
    chat = rng.random() < 0.5
    scenes = [generate_scene(rng) for _ in range(cfg.batch_size)]
    tok = processor.tokenizer
    seqs = [prompt_ids(processor, s, chat) + tok(" " + s.answer, add_special_tokens=False)["input_ids"]
            + [tok.eos_token_id] for s in scenes]
    grid = int(round(processor.image_seq_len ** 0.5))
    labels = torch.as_tensor(np.stack([cell_labels(s, grid) for s in scenes]))
    return torch.tensor(seqs), pixel_batch(processor, scenes), len(seqs[0]) - 2, labels


@torch.no_grad()
def answer_ids(model, processor, scenes: list[Scene], chat: bool = False, hide_target: bool = False,
               batch_size: int = 50) -> list[int]:
    """The greedy first answer token for each scene."""
    model.eval()
    out: list[int] = []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i: i + batch_size]
        ids = torch.tensor([prompt_ids(processor, s, chat) for s in chunk])
        logits = model(input_ids=ids, pixel_values=pixel_batch(processor, chunk, hide_target)).logits[:, -1]
        out.extend(logits.argmax(-1).tolist())
    return out


def accuracy(model, processor, scenes: list[Scene], chat: bool = False, hide_target: bool = False) -> float:
    """Share of scenes whose greedy answer word is the asked object's colour."""
    tok = processor.tokenizer
    want = [tok.convert_tokens_to_ids(s.answer) for s in scenes]
    got = answer_ids(model, processor, scenes, chat, hide_target)
    return sum(int(g == w) for g, w in zip(got, want)) / max(1, len(scenes))


def train(cfg: TrainConfig, out_dir: Path | None, log=print) -> dict:
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    spec = cfg.spec()
    processor = build_processor(spec)
    model = new_model(spec, processor.tokenizer)
    torch.manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"params {n_params} vocab {len(processor.tokenizer)}")
    # Training only (not saved): per image token, which shapes and colours it holds.
    # Tied to the input embeddings of the shape and colour words: a triangle's
    # image tokens are pushed towards the word "triangle", so the question's word
    # can find them by a plain query-key match.
    aux_words = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(SHAPES) + sorted(COLOURS)))
    aux_bias = torch.nn.Parameter(torch.zeros(len(aux_words)))
    embeddings = model.get_input_embeddings()

    def aux_head(x):
        return x @ embeddings.weight[aux_words].T + aux_bias

    image_tokens: list[torch.Tensor] = []
    model.model.connector.register_forward_hook(lambda _m, _i, out: image_tokens.append(out))
    params = list(model.parameters()) + [aux_bias]
    opt = adamw(params, cfg)
    held_out = generate_scenes(cfg.eval_n, seed=HELD_OUT_SEED)
    history = []
    clock = TrainingClock(cfg, opt, log)
    for step in clock.steps():
        model.train()
        ids, pixels, answer_pos, labels = training_batch(rng, processor, cfg)
        image_tokens.clear()
        logits = model(input_ids=ids, pixel_values=pixels).logits
        # Predict the answer word (at answer_pos) and EOS (after it) from the positions before them.
        pred = logits[:, answer_pos - 1: answer_pos + 1]
        loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]),
                                                 ids[:, answer_pos: answer_pos + 2].reshape(-1),
                                                 label_smoothing=cfg.label_smoothing)
        answer_loss = loss
        if cfg.aux_weight:
            aux = aux_head(image_tokens[-1].reshape(labels.shape[0], labels.shape[1], -1))
            loss = loss + cfg.aux_weight * torch.nn.functional.binary_cross_entropy_with_logits(aux, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f} answer {answer_loss.item():.4f} lr {lr_at(step, cfg):.2e} t {clock.elapsed:.0f}s")
        if (step + 1) % cfg.eval_every == 0:
            acc = accuracy(model, processor, held_out[:200])
            history.append({"step": step + 1, "seconds": round(clock.elapsed, 1), "held_out_accuracy_200": acc})
            log(f"EVAL step {step + 1} held-out accuracy {acc:.3f} t {clock.elapsed:.0f}s")
    train_seconds = clock.elapsed
    report = {
        "seed": cfg.seed,
        "config": asdict(cfg),
        "spec": asdict(spec),
        "parameters": n_params,
        "train_seconds": round(train_seconds, 1),
        "steps_run": clock.steps_run,
        "stopped_early": clock.stopped_early,
        "torch_threads": cfg.threads,
        "torch_version": torch.__version__,
        "held_out_seed": HELD_OUT_SEED,
        "held_out_scenes": len(held_out),
        "held_out_accuracy": accuracy(model, processor, held_out),
        "held_out_accuracy_chat": accuracy(model, processor, held_out, chat=True),
        "target_hidden_accuracy": accuracy(model, processor, held_out, hide_target=True),
        "history": history,
    }
    log(json.dumps({k: v for k, v in report.items() if k not in ("config", "spec", "history")}, indent=1))
    if out_dir is not None:
        save(model.eval(), processor, out_dir)
        (out_dir / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    return run_training_cli(__doc__.split("\n")[0], TrainConfig, train,
                            lambda report: report["held_out_accuracy"] >= 0.9, argv)


if __name__ == "__main__":
    sys.exit(main())
