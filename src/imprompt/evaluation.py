"""Does the reference steer the picture? The trained demo pack's adapters judged on held-out reference images.

    python -m imprompt.evaluation [--weights DIR] [--count 100] [--report docs/demo-pack.json]
                                  [--grid docs/images/demo-pack-grid.png]

For each held-out scene (drawn by `shapes`, never seen in training) and each trained adapter, one picture with
the adapter (scale 1) and one with the same adapter at scale 0, same seed, empty prompt; `shapes.classify` reads
shape, colour and background from each, and the counts say how often they match the reference. Scale 0 is the
no-adapter baseline: what the model draws when the image has no say.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from . import shapes
from .pack import DEMO_WEIGHTS, SD15_MODEL

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
            seen = shapes.classify(generate(engine, scene, adapter, scale, seed, settings))
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
    from .cli import quiet_libraries
    from .engine import Engine
    from .pack import build_demo_pack

    parser = argparse.ArgumentParser(prog="python -m imprompt.evaluation", description=__doc__.splitlines()[0])
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
