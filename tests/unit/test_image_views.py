"""Image inputs outside the core (decoding, limits) and the views of image tiles (heatmap PNG, terminal, CLI errors)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from atman_vllm.cli import main
from atman_vllm.core import ExplainOptions, InvalidRequestError
from atman_vllm.core.images import Rect
from atman_vllm.core.results import ExplainResult, ExplainStats, ExplanationForTarget, SpanScore, TargetToken, TextSpan
from atman_vllm.imaging import prompt_image
from atman_vllm.view import heatmap_png, heatmap_sheet
from atman_vllm.view.scale import POSITIVE_RGB, NEGATIVE_RGB


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_images_from_pil_arrays_and_bytes_are_one_image():
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a, b, c = prompt_image(arr), prompt_image(Image.fromarray(arr)), prompt_image(png(arr))
    assert a == b == c and (a.width, a.height) == (30, 20)
    assert prompt_image(arr[:, :, 0]).digest != a.digest  # grey is another image


@pytest.mark.parametrize("value, message", [
    (b"not an image", "is not an image"),
    (np.zeros((4, 4), dtype=np.float32), "must be uint8"),
    ("scene.png", "must be a PIL image"),
    (np.zeros((0, 4, 3), dtype=np.uint8), "is empty"),
])
def test_bad_images_name_the_field(value, message):
    with pytest.raises(InvalidRequestError) as e:
        prompt_image(value, "images[1]")
    assert e.value.field == "images[1]" and message in e.value.message


def test_huge_images_are_refused_from_the_header_before_decoding():
    data = png(np.zeros((300, 400, 3), dtype=np.uint8))
    with pytest.raises(InvalidRequestError) as e:
        prompt_image(data, max_pixels=100 * 100)
    assert "400x300 pixels" in e.value.message
    with pytest.raises(InvalidRequestError) as e:
        prompt_image(data, max_bytes=100)
    assert "bytes" in e.value.message


def result_with_tiles(scores):
    tiles = tuple(SpanScore(0, 7, "<image>", v, image=0, rect=Rect((k % 2) / 2, (k // 2) / 2, 0.5, 0.5))
                  for k, v in enumerate(scores))
    text = (SpanScore(8, 2, "Q?", 0.1),)
    exp = ExplanationForTarget(TextSpan(0, 2, " A"), tiles + text)
    return ExplainResult("<image> Q?", " A", (TargetToken(" A", 0, 2, -1.0),), (exp,), ExplainOptions(),
                         ExplainStats(5, 6, 60, 0, 0.1))


def test_heatmap_tints_each_tile_where_its_rectangle_is():
    image = Image.new("RGB", (64, 32), (128, 128, 128))  # not square: rectangles are fractions of each side
    sheet = heatmap_sheet(result_with_tiles([1.0, 0.0, -1.0, 0.5]), [image])
    assert sheet.size == (512, 256)  # enlarged to a 256-pixel short side
    px = np.asarray(sheet).astype(int)
    top_left, top_right, bottom_left, bottom_right = px[60, 120], px[60, 400], px[200, 120], px[200, 400]
    assert top_right.tolist() == [128, 128, 128]  # score 0: the image as it is
    assert np.linalg.norm(top_left - POSITIVE_RGB) < np.linalg.norm([128, 128, 128] - np.array(POSITIVE_RGB)) / 2
    assert np.linalg.norm(bottom_left - NEGATIVE_RGB) < np.linalg.norm([128, 128, 128] - np.array(NEGATIVE_RGB)) / 2
    # Half the score, about half the tint.
    assert 0 < np.abs(bottom_right - 128).sum() < np.abs(top_left - 128).sum()
    assert Image.open(io.BytesIO(heatmap_png(result_with_tiles([1, 0, 0, 0]), [image]))).format == "PNG"


def test_terminal_view_lists_tiles_and_highlights_only_text():
    from rich.console import Console

    from atman_vllm.view import explanation_group

    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(explanation_group(result_with_tiles([1.0, 0.0, -1.0, 0.5])))
    out = console.file.getvalue()
    assert "image 0 x 0.00+0.50 y 0.00+0.50" in out and "<image> Q?" in out


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_refuses_bad_images_before_loading_a_model(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no png")
    base = ["explain", "--model", str(tmp_path), "--prompt", "Q?", "--target", " A"]
    assert run(capsys, *base, "--image", str(tmp_path / "missing.png"))[::2] == \
        (2, f"error: --image: cannot read {tmp_path / 'missing.png'}: No such file or directory\n")
    code, _, err = run(capsys, *base, "--image", str(bad))
    assert code == 2 and err.startswith(f"error: --image: {bad} is not an image")
    assert run(capsys, *base, "--heatmap", str(tmp_path / "out.png"))[::2] == \
        (2, "error: --heatmap: draws the relevance of image tiles; give --image\n")
    code, _, err = run(capsys, *base, "--image-granularity", "custom")
    assert code == 2 and "--image-granularity: unknown value 'custom'" in err
