"""train_vlm: the auxiliary cell labels and a short run's determinism (no shipped weights needed)."""

from __future__ import annotations

import random

from atman_vllm.models.train_vlm import TrainConfig, cell_labels, train, training_batch
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
