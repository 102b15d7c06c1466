"""Synthetic scenes with known object masks: the image task of the shipped VLM.

A scene is a 64×64 RGB image on a grey background holding 2–4 shapes
(triangle, square, circle, cross), each of a different shape and a different
colour, at random non-overlapping places; the question asks the colour of one
shape ("What colour is the triangle?") and the answer is one word ("red").
The asked object's pixel mask is known exactly (shapes are drawn without
anti-aliasing), so an explanation's image map can be scored against it:
``Scene.tile_mask(grid)`` says which cells of a ``grid × grid`` partition of
the image hold any pixel of the object — ``grid=4`` is the tiny VLM's 4×4
grid of image tokens, ``grid=8`` its vision patches.

Everything is deterministic by seed (``generate_scenes(n, seed)``).
``Scene.without_target()`` paints the asked object with the background: a
model that really looks cannot answer it any more.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (128, 128, 128)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 190),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "orange": (250, 140, 20),
}
SHAPES = ("triangle", "square", "circle", "cross")
MIN_OBJECTS, MAX_OBJECTS = 2, 4
MIN_SIZE, MAX_SIZE = 14, 20  # side of an object's bounding box, pixels
_GAP = 2  # pixels kept free between two objects' boxes

# The prompt formats the model is trained on; the image goes where "<image>" is.
# The question comes before the image: then each image token can already
# compare its shape with the asked one (causal attention), and the answer
# position only has to collect the flagged tokens' colour. With the image first
# the same model stayed at "some colour of the scene" (34-43% after 3,000
# steps, measured), the question having to be bound to the image in one hop.
QUESTION = "What colour is the {shape}?"
PLAIN_PROMPT = "Question: " + QUESTION + " <image> Answer:"
CHAT_PROMPT = "User:" + QUESTION + "<image><end_of_utterance>\nAssistant:"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive), pixels

    def mask(self, size: int = IMAGE_SIZE) -> np.ndarray:
        """Boolean [size, size] mask of the object's pixels."""
        img = Image.new("L", (size, size), 0)
        _draw(ImageDraw.Draw(img), self.shape, self.box, 255)
        return np.asarray(img) > 0


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    target: int  # index into objects of the asked object
    hidden: tuple[int, ...] = ()  # objects painted with the background (see without_target)

    @property
    def asked(self) -> SceneObject:
        return self.objects[self.target]

    @property
    def question(self) -> str:
        return QUESTION.format(shape=self.asked.shape)

    @property
    def answer(self) -> str:
        return self.asked.colour

    def prompt(self, chat: bool = False) -> str:
        """The text prompt with one ``<image>`` placeholder; the target is ``" " + answer``."""
        return (CHAT_PROMPT if chat else PLAIN_PROMPT).format(shape=self.asked.shape)

    def image(self) -> Image.Image:
        img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for i, obj in enumerate(self.objects):
            if i not in self.hidden:
                _draw(draw, obj.shape, obj.box, COLOURS[obj.colour])
        return img

    def mask(self) -> np.ndarray:
        """Pixel mask of the asked object."""
        return self.asked.mask()

    def tile_mask(self, grid: int = 4) -> np.ndarray:
        """Boolean [grid, grid]: cells of an even grid over the image that hold any pixel of the asked object."""
        return tile_mask(self.mask(), grid)

    def without_target(self) -> "Scene":
        """The same scene and question with the asked object painted with the background."""
        return replace(self, hidden=tuple(sorted(set(self.hidden) | {self.target})))


def tile_mask(mask: np.ndarray, grid: int) -> np.ndarray:
    """Boolean [grid, grid]: which cells of an even grid over ``mask`` hold any True pixel."""
    h, w = mask.shape
    if h % grid or w % grid:
        raise ValueError(f"a {h}×{w} mask does not split into a {grid}×{grid} grid")
    return mask.reshape(grid, h // grid, grid, w // grid).any(axis=(1, 3))


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    left, top, right, bottom = box
    r, b = right - 1, bottom - 1  # PIL's shape coordinates are inclusive
    if shape == "square":
        draw.rectangle((left, top, r, b), fill=fill)
    elif shape == "circle":
        draw.ellipse((left, top, r, b), fill=fill)
    elif shape == "triangle":
        draw.polygon([((left + r) / 2, top), (r, b), (left, b)], fill=fill)
    elif shape == "cross":
        w = (right - left) // 3
        draw.rectangle((left + w, top, r - w, b), fill=fill)
        draw.rectangle((left, top + w, r, b - w), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def generate_scene(rng: random.Random) -> Scene:
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(sorted(COLOURS), n)
    boxes: list[tuple[int, int, int, int]] = []
    while len(boxes) < n:
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        left, top = rng.randint(0, IMAGE_SIZE - size), rng.randint(0, IMAGE_SIZE - size)
        box = (left, top, left + size, top + size)
        if all(_apart(box, other) for other in boxes):
            boxes.append(box)
        elif rng.random() < 0.02:  # a crowded layout: start it again
            boxes.clear()
    objects = tuple(SceneObject(s, c, b) for s, c, b in zip(shapes, colours, boxes))
    return Scene(objects=objects, target=rng.randrange(n))


def _apart(a, b) -> bool:
    return a[2] + _GAP <= b[0] or b[2] + _GAP <= a[0] or a[3] + _GAP <= b[1] or b[3] + _GAP <= a[1]


def generate_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes, the same for the same seed."""
    rng = random.Random(seed)
    return [generate_scene(rng) for _ in range(n)]


def vocabulary_text() -> list[str]:
    """Every word the scene prompts and answers use (the VLM's tokenizer is trained on it)."""
    prompts = [f.replace("<image>", "").replace("<end_of_utterance>", " ").format(shape=shape)
               for f in (PLAIN_PROMPT, CHAT_PROMPT) for shape in SHAPES]
    return prompts + [" ".join(COLOURS)]


def answer_rate(answers: Sequence[str], scenes: Sequence[Scene]) -> float:
    """Share of ``answers`` that equal their scene's answer (whitespace ignored)."""
    return sum(a.strip() == s.answer for a, s in zip(answers, scenes)) / max(1, len(scenes))
