"""Does the reference steer the picture? The trained demo pack's adapters judged on held-out reference images.

    python -m tools.evaluation [--weights DIR] [--count 100] [--report docs/demo-pack.json]
                                  [--grid docs/images/demo-pack-grid.png]

For each held-out scene (drawn by `shapes`, never seen in training) and each trained adapter, one picture with
the adapter (scale 1) and one with the same adapter at scale 0, same seed, empty prompt; `classify` reads
shape, colour and background from each, and the counts say how often they match the reference. Scale 0 is the
no-adapter baseline: what the model draws when the image has no say.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imprompt.demo import shapes
from imprompt.demo.pack import DEMO_WEIGHTS, SD15_MODEL

ADAPTERS = {"Base": "ViT-H", "Base ViT-G": "ViT-bigG", "Plus": "ViT-H"}  # the trained ones, and their encoder
HELD_OUT_SEED = 1000  # training draws with seed 0
GRID_SCENES = [
    shapes.Scene("circle", "red", "blue"),
    shapes.Scene("square", "yellow", "green"),
    shapes.Scene("triangle", "white", "black"),
    shapes.Scene("star", "blue", "yellow"),
    shapes.Scene("circle", "green", "white"),
    shapes.Scene("star", "black", "red"),
]
SETTINGS = {"prompt": "", "steps": 20, "cfg_scale": 1.5, "scale": 1.0}  # CFG: see docs/demo-pack.md


# ------------------------------------------------------------------------------------------------ the classifier


def classify(image: Image.Image) -> shapes.Scene:
    """What a picture shows. shape "none" when nothing stands out from the background.

    Drawing is exact (PIL polygons on a flat background), so no learning is needed: the background is the colour
    of the border (just inside the edge), the shape is what differs from it, its colour is the nearest palette
    colour, and its kind is the template that best covers its outline."""
    pixels = np.asarray(image.convert("RGB")).astype(np.float32)
    rim = max(1, pixels.shape[0] // 32)  # decoders leave a dark rim at the picture's edge; scenes keep clear of it
    pixels = pixels[rim:-rim, rim:-rim]
    size = pixels.shape[0]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=2) > 60
    background_name = _nearest_colour(background)
    if mask.sum() < 0.03 * size * size:
        return shapes.Scene("none", "none", background_name)
    colour = _nearest_colour(np.median(pixels[mask], axis=0))
    return shapes.Scene(_best_template(mask), colour, background_name)


def _nearest_colour(rgb) -> str:
    return min(shapes.PALETTE, key=lambda name: float(np.sum((np.asarray(shapes.PALETTE[name], np.float32) - rgb) ** 2)))


def _best_template(mask: np.ndarray) -> str:
    """The shape whose drawing, stretched over the mask's bounding box, overlaps the mask best (intersection
    over union inside the box)."""
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    inside = mask[top:bottom, left:right]
    scores = {}
    for shape, template in _templates().items():
        drawn = np.asarray(template.resize(inside.shape[::-1], Image.Resampling.BOX)) > 127
        scores[shape] = (drawn & inside).sum() / max((drawn | inside).sum(), 1)
    return max(scores, key=scores.get)


_TEMPLATES: dict[str, Image.Image] = {}


def _templates() -> dict[str, Image.Image]:
    """Each shape drawn large and cropped to its own bounding box."""
    if not _TEMPLATES:
        for shape in shapes.SHAPES:
            canvas = Image.new("L", (260, 260), 0)
            shapes.draw_shape(ImageDraw.Draw(canvas), shape, (2, 2, 257, 257), 255)
            _TEMPLATES[shape] = canvas.crop(canvas.getbbox())
    return _TEMPLATES


# ------------------------------------------------------------------------------------------------ the evaluation


def generate(engine, scene: shapes.Scene, adapter: str, scale: float, seed: int, settings=SETTINGS) -> Image.Image:
    reference = shapes.draw(scene)
    result = engine.generate(
        model=SD15_MODEL, prompt=settings["prompt"], seed=seed, steps=settings["steps"],
        cfg_scale=settings["cfg_scale"], ip_adapters=[{"adapter": adapter, "images": [reference], "scale": scale}],
    )  # fmt: skip
    return result.images[0]


def score(engine, scenes: list[shapes.Scene], adapters=tuple(ADAPTERS), settings=SETTINGS) -> dict:
    """How often the picture matches the reference (shape, colour, background, all three): with each adapter at
    `settings["scale"]`, and at scale 0, where an adapter adds exactly nothing, so one set of scale-0 pictures
    (made through the first adapter) is every adapter's baseline."""

    def counts(adapter, scale):
        tally = {"shape": 0, "colour": 0, "background": 0, "all": 0}
        for seed, scene in enumerate(scenes):
            seen = classify(generate(engine, scene, adapter, scale, seed, settings))
            tally["shape"] += seen.shape == scene.shape
            tally["colour"] += seen.colour == scene.colour
            tally["background"] += seen.background == scene.background
            tally["all"] += seen.matches(scene)
        return tally

    return {
        "count": len(scenes),
        "settings": dict(settings),
        "adapters": {adapter: counts(adapter, settings["scale"]) for adapter in adapters},
        "scale 0": counts(adapters[0], 0.0),
    }


def markdown(report: dict) -> str:
    n = report["count"]
    lines = ["| | shape | colour | background | all three |", "|---|---|---|---|---|"]
    rows = [(f"{adapter} ({ADAPTERS.get(adapter, '?')} encoder)", tally) for adapter, tally in report["adapters"].items()]
    for label, tally in rows + [("no adapter (scale 0)", report["scale 0"])]:
        cells = " | ".join(f"{100 * tally[k] / n:.0f} %" for k in ("shape", "colour", "background", "all"))
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def grid(engine, scenes=GRID_SCENES, cell: int = 128, settings=SETTINGS) -> Image.Image:
    """References in the top row; below, what each adapter drew from them, then the scale-0 baseline."""
    rows = [("reference", [shapes.draw(scene) for scene in scenes])]
    for adapter, encoder in ADAPTERS.items():
        rows.append((f"{adapter}\n({encoder})", [generate(engine, s, adapter, 1.0, i, settings) for i, s in enumerate(scenes)]))
    rows.append(("no adapter\n(scale 0)", [generate(engine, s, "Base", 0.0, i, settings) for i, s in enumerate(scenes)]))
    label = 120
    sheet = Image.new("RGB", (label + cell * len(scenes), cell * len(rows)), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=16)
    for r, (name, images) in enumerate(rows):
        draw.multiline_text((8, r * cell + cell // 2 - 18), name, fill="black", font=font)
        for c, image in enumerate(images):
            sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (label + c * cell, r * cell))
    return sheet


def main(argv: list[str] | None = None) -> int:
    from imprompt.cli import quiet_libraries
    from imprompt.demo.pack import build_demo_pack
    from imprompt.engine import Engine

    parser = argparse.ArgumentParser(prog="python -m tools.evaluation", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=DEMO_WEIGHTS, help="trained weights (default: %(default)s)")
    parser.add_argument("--models", type=Path, default=Path("demo-models-trained"),
                        help="where the pack with those weights is built (default: %(default)s)")  # fmt: skip
    parser.add_argument("--count", type=int, default=100, help="held-out reference images")
    parser.add_argument("--report", type=Path, default=Path("docs/demo-pack.json"))
    parser.add_argument("--grid", type=Path, default=Path("docs/images/demo-pack-grid.png"))
    args = parser.parse_args(argv)
    quiet_libraries()
    engine = Engine(build_demo_pack(args.models, weights=args.weights))
    report = score(engine, shapes.scenes(args.count, HELD_OUT_SEED))
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2) + "\n")
    args.grid.parent.mkdir(parents=True, exist_ok=True)
    grid(engine).save(args.grid)
    print(markdown(report))
    print(f"\nreport: {args.report}, grid: {args.grid}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
