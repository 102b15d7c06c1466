"""`atman-vllm explain --backend vllm --json` end to end: a real console script,
a real multiprocess engine, output that validates against the contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema

from atman_vllm.core import EXPLAIN_RESULT_SCHEMA


def test_cli_explain_with_vllm_backend_prints_the_contract(tiny_models):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    cmd = [sys.executable, "-m", "atman_vllm.cli", "explain", "--model", str(tiny_models["llama"]),
           "--prompt", "Ben likes to eat burgers and", "--target", " fries", "--granularity", "word",
           "--backend", "vllm", "--json", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
           "--kv-cache-space-gib", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout holds the JSON alone: vLLM's logs go to stderr
    jsonschema.validate(result, EXPLAIN_RESULT_SCHEMA)
    assert [s["text"] for s in result["explanations"][0]["prompt_scores"]] == ["Ben", "likes", "to", "eat", "burgers", "and"]
    assert result["stats"]["forward_passes"] == 7


def test_cli_explains_an_image_and_draws_its_heatmap(tmp_path):
    """The issue's command on the shipped model, by name: `atman-vllm explain --model tiny-shapes-vlm
    --image scene.png --heatmap out.png` (a multiprocess engine)."""
    import numpy as np
    from PIL import Image

    from atman_vllm.quality.scenes import generate_scenes

    scene = generate_scenes(1, seed=0)[0]
    scene.image().save(tmp_path / "scene.png")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    cmd = [sys.executable, "-m", "atman_vllm.cli", "explain", "--model", "tiny-shapes-vlm",
           "--image", str(tmp_path / "scene.png"), "--prompt", scene.prompt(),
           "--target", " " + scene.answer, "--granularity", "word", "--image-granularity", "token",
           "--heatmap", str(tmp_path / "out.png"), "--json", "--enforce-eager", "--max-model-len", "256",
           "--kv-cache-space-gib", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    jsonschema.validate(result, EXPLAIN_RESULT_SCHEMA)
    assert result["prompt"] == scene.prompt()  # the image goes where the prompt's <image> is
    scores = result["explanations"][0]["prompt_scores"]
    tiles = [s for s in scores if "image" in s]
    assert len(tiles) == 16 and [s["text"] for s in scores if "image" not in s][:3] == ["Question:", "What", "colour"]
    heatmap = Image.open(tmp_path / "out.png")
    assert heatmap.format == "PNG" and heatmap.size == (256, 256)
    # The strongest tile is tinted with its colour on the explanation's scale (text units included),
    # exactly inside its rectangle.
    from atman_vllm.view.heatmap import OPACITY
    from atman_vllm.view.scale import mixed_rgb, strength

    best = max(tiles, key=lambda s: abs(s["score"]))
    scale = max(abs(s["score"]) for s in scores)
    alpha = round(255 * OPACITY * strength(best["score"], scale)) / 255
    assert alpha > 0.2
    r = best["rect"]
    box = (slice(round(r["top"] * 256), round((r["top"] + r["height"]) * 256)),
           slice(round(r["left"] * 256), round((r["left"] + r["width"]) * 256)))
    original = np.asarray(scene.image().resize((256, 256), Image.NEAREST)).astype(float)[box]
    expected = original * (1 - alpha) + np.array(mixed_rgb(best["score"], scale), dtype=float) * alpha
    assert np.abs(np.asarray(heatmap).astype(float)[box] - expected).max() <= 1.5
