"""The demo pack's little world: flat shapes in a few colours on coloured backgrounds, and their captions.

The trained demo weights were trained on pictures drawn here, and the demo's reference images are drawn here
(the evaluation in `tools/evaluation.py` reads shape and colours back from generated pictures).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
NEUTRAL_PROMPT = "a shape"


@dataclass(frozen=True)
class Scene:
    """One picture: a `shape` of `colour` on `background`, inside `box` (x0, y0, x1, y1) as fractions of the side."""

    shape: str
    colour: str
    background: str
    box: tuple[float, float, float, float] = (0.2, 0.2, 0.8, 0.8)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    def matches(self, other: "Scene") -> bool:
        """Same shape, colour and background (the box is not compared)."""
        return (self.shape, self.colour, self.background) == (other.shape, other.colour, other.background)


def random_scene(rng: random.Random) -> Scene:
    """Any shape, colour and (different) background; the shape 50-75 % of the side, anywhere it fits."""
    colour, background = rng.sample(sorted(PALETTE), 2)
    extent = rng.uniform(0.5, 0.75)
    x0, y0 = rng.uniform(0.05, 0.95 - extent), rng.uniform(0.05, 0.95 - extent)
    return Scene(rng.choice(SHAPES), colour, background, (x0, y0, x0 + extent, y0 + extent))


def scenes(count: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(count)]


def draw(scene: Scene, size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), PALETTE[scene.background])
    box = tuple(round(v * size) for v in scene.box)
    draw_shape(ImageDraw.Draw(image), scene.shape, box, PALETTE[scene.colour])
    return image


def draw_shape(canvas: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """`shape` filling the square `box` (x0, y0, x1, y1) in pixels."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        canvas.ellipse(box, fill=fill)
    elif shape == "square":
        canvas.rectangle(box, fill=fill)
    elif shape == "triangle":
        canvas.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "star":
        cx, cy, r_out = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        radii = [r_out if i % 2 == 0 else r_out / 2.5 for i in range(10)]
        points = [(cx + r * math.sin(i * math.pi / 5), cy - r * math.cos(i * math.pi / 5)) for i, r in enumerate(radii)]
        canvas.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
