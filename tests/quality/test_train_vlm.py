"""train_vlm: the auxiliary cell labels, a short run's determinism, and the shipped model it trained."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

from atman_vllm.models import resolve_model
from atman_vllm.models.train_vlm import HELD_OUT_SEED, TrainConfig, accuracy, cell_labels, train, training_batch
from atman_vllm.models.vlm import build_processor
from atman_vllm.quality.scenes import generate_scenes


def test_cell_labels_mark_the_objects_cells():
    scene = generate_scenes(1, seed=3)[0]
    labels = cell_labels(scene, 4)
    assert labels.shape == (16, 12)
    assert (labels[:, :4].any(axis=1) == labels[:, 4:].any(axis=1)).all()  # a cell with a shape has its colour
    assert labels[:, :4].sum() >= len(scene.objects)


def test_short_training_run_is_deterministic(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, eval_every=1000, eval_n=8)
    a = train(cfg, tmp_path / "a", log=lambda _msg: None)
    b = train(cfg, tmp_path / "b", log=lambda _msg: None)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a["held_out_accuracy"] == b["held_out_accuracy"]
    processor = build_processor(cfg.spec())
    ids, pixels, answer_pos, labels = training_batch(random.Random(0), processor, cfg)
    assert ids.shape[0] == pixels.shape[0] == labels.shape[0] == 4
    assert (ids[:, answer_pos + 1] == processor.tokenizer.eos_token_id).all()


def test_shipped_model_reads_the_asked_objects_colour_from_the_image():
    """``tiny-shapes-vlm`` (the package's weights) was trained by the default recipe and answers
    held-out scenes; with the asked object painted over it is left guessing."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from atman_vllm.models.vlm import load_processor

    model_dir = resolve_model("tiny-shapes-vlm")
    report = json.loads((Path(model_dir) / "training_report.json").read_text())
    assert report["config"] == asdict(TrainConfig())  # `python -m atman_vllm.models.train_vlm` reproduces it
    model = Idefics3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = load_processor(model_dir)
    scenes = generate_scenes(100, seed=HELD_OUT_SEED + 1)  # not the report's own held-out scenes
    assert accuracy(model, processor, scenes) >= 0.9
    assert accuracy(model, processor, scenes, chat=True) >= 0.9
    assert accuracy(model, processor, scenes, hide_target=True) <= 0.2
