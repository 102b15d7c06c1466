"""The tiny Idefics3 builder: the directory loads in transformers and in vLLM and both read the image."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from atman_vllm.models.vlm import IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN, build_tiny_vlm, load_processor
from atman_vllm.quality.scenes import generate_scenes
from tolerances import assert_close

N_SCENES = 3


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm", seed=0)


@pytest.fixture(scope="module")
def hf_vlm(vlm_dir):
    import torch
    from transformers import Idefics3ForConditionalGeneration

    torch.set_num_threads(2)
    model = Idefics3ForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()
    return model, load_processor(vlm_dir)


def test_build_is_deterministic_and_cached(vlm_dir, tmp_path):
    other = build_tiny_vlm(tmp_path / "again", seed=0)
    assert (other / "model.safetensors").read_bytes() == (vlm_dir / "model.safetensors").read_bytes()
    stamp = (other / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_vlm(other, seed=0) == other and (other / "model.safetensors").stat().st_mtime_ns == stamp
    reseeded = build_tiny_vlm(tmp_path / "seed1", seed=1)
    assert (reseeded / "model.safetensors").read_bytes() != (vlm_dir / "model.safetensors").read_bytes()


def test_image_expands_to_16_tokens_between_markers(hf_vlm):
    _, processor = hf_vlm
    scene = generate_scenes(1, seed=5)[0]
    enc = processor(text=[scene.prompt()], images=[[scene.image()]])
    tokens = processor.tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    start = tokens.index(FAKE_IMAGE_TOKEN)  # where the prompt's "<image>" was
    assert tokens[0] == "<s>" and tokens[start + 1] == GLOBAL_IMAGE_TOKEN
    assert tokens[start + 2:start + 18] == [IMAGE_TOKEN] * 16 and tokens[start + 18] == FAKE_IMAGE_TOKEN
    assert tokens.count(IMAGE_TOKEN) == 16
    assert processor.tokenizer.unk_token not in tokens
    # A 64×64 image passes unchanged (rescaled to [-1, 1]).
    pixels = np.asarray(enc["pixel_values"])[0, 0].transpose(1, 2, 0)
    # float32 on both sides: the processor's rescale (x * 1/255) and normalize ((x - 0.5) / 0.5), ours
    # x / 127.5 - 1: at most 8 roundings of values in [-1, 1].
    assert_close(pixels, np.asarray(scene.image(), dtype=np.float32) / 127.5 - 1.0, np.float32, scale=1.0, ops=8,
                 what="pixel values")


def test_non_square_image_is_stretched_not_padded(hf_vlm):
    _, processor = hf_vlm
    wide = np.zeros((32, 128, 3), dtype=np.uint8)  # H 32, W 128: left half red, right half blue
    wide[:, :64] = (255, 0, 0)
    wide[:, 64:] = (0, 0, 255)
    enc = processor(text=["<image>Question:"], images=[[Image.fromarray(wide)]])
    pixels = np.asarray(enc["pixel_values"])[0, 0]  # [3, 64, 64]
    assert pixels.shape == (3, 64, 64)
    assert np.asarray(enc["pixel_attention_mask"]).all()  # no padded pixel
    # Every row is red on the left and blue on the right (away from the seam): stretched to the square.
    assert (pixels[0, :, :28] > 0.9).all() and (pixels[2, :, :28] < -0.9).all()
    assert (pixels[2, :, 36:] > 0.9).all() and (pixels[0, :, 36:] < -0.9).all()


def _hf_greedy(model, processor, scenes, n_new=2):
    import torch

    out = []
    for scene in scenes:
        enc = processor(text=[scene.prompt()], images=[[scene.image()]], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        first = torch.log_softmax(gen.logits[0][0].float(), -1)
        token = int(first.argmax())
        out.append({"tokens": gen.sequences[0, enc["input_ids"].shape[1]:].tolist(), "logprob": float(first[token]),
                    "prompt_ids": enc["input_ids"][0].tolist()})
    return out


def test_transformers_generation_reads_the_image(hf_vlm):
    import torch

    model, processor = hf_vlm
    scene = generate_scenes(1, seed=7)[0]
    logits = []
    for image in (scene.image(), scene.without_target().image()):
        enc = processor(text=[scene.prompt()], images=[[image]], return_tensors="pt")
        with torch.no_grad():
            logits.append(model(**enc).logits[0, -1])
    assert float((logits[0] - logits[1]).abs().max()) > 1e-3  # the image reaches the last position
    assert len(_hf_greedy(model, processor, [scene])[0]["tokens"]) == 2


_VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from atman_vllm.models.vlm import vllm_kwargs
from atman_vllm.quality.scenes import generate_scenes

model_dir, n = sys.argv[1], int(sys.argv[2])
llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True,
          kv_cache_memory_bytes=64 << 20, **vllm_kwargs())
scenes = generate_scenes(n, seed=11)
outs = llm.generate([{"prompt": s.prompt(), "multi_modal_data": {"image": s.image()}} for s in scenes],
                    SamplingParams(max_tokens=2, temperature=0.0, logprobs=1))
rows = []
for o in outs:
    c = o.outputs[0]
    rows.append({"tokens": list(c.token_ids), "logprob": c.logprobs[0][c.token_ids[0]].logprob,
                 "prompt_ids": list(o.prompt_token_ids)})
print("RESULT " + json.dumps(rows))
"""


def test_vllm_loads_and_matches_transformers(vlm_dir, hf_vlm):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _VLLM_SCRIPT, str(vlm_dir), str(N_SCENES)], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    model, processor = hf_vlm
    want = _hf_greedy(model, processor, generate_scenes(N_SCENES, seed=11))
    for g, w in zip(got, want, strict=True):
        assert g["prompt_ids"] == w["prompt_ids"]  # same image expansion in both
        assert g["tokens"] == w["tokens"]
        assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
