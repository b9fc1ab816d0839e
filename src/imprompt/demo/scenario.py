"""`imprompt demo`: the article's switching scenario on the demo model pack.

Base -> Base ViT-G -> Base -> Plus -> Full Face -> Plus Face -> Light -> Base + Base ViT-G, in one process. In
the tools the article describes, the second step already fails with `mat1 and mat2 shapes cannot be multiplied
(2x1024 and 1280x3072)`; here each step says which encoder served it and whether it was loaded or reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import ImpromptError
from .pack import DEMO_WEIGHTS, SD15_MODEL, build_demo_pack

SCENARIO = [["Base"], ["Base ViT-G"], ["Base"], ["Plus"], ["Full Face"], ["Plus Face"], ["Light"], ["Base", "Base ViT-G"]]
REFERENCE = "red-circle.png"


def run_demo(models: Path, out: Path, steps: int = 20, seed: int = 7, echo=print,
             weights: Path | None = DEMO_WEIGHTS) -> list[dict]:  # fmt: skip
    """The scenario with an empty prompt, so what the picture shows comes from the reference (scale 1, shared
    equally when two adapters are combined; CFG 1.5, where the trained pack draws best, docs/demo-pack.md).
    `weights` None: the random-weight pack."""
    from ..engine import Engine

    models, out = Path(models), Path(out)
    build_demo_pack(models, weights=weights)
    out.mkdir(parents=True, exist_ok=True)
    reference = Image.open(models / "images" / REFERENCE).convert("RGB")
    engine = Engine(models)
    rows, images = [], []
    for number, adapters in enumerate(SCENARIO, start=1):
        units = [{"adapter": a, "images": [reference], "scale": 1 / len(adapters)} for a in adapters]
        started = time.perf_counter()
        result = engine.generate(model=SD15_MODEL, prompt="", seed=seed, steps=steps, cfg_scale=1.5, ip_adapters=units)
        seconds = time.perf_counter() - started
        name = f"{number:02d}-" + "+".join(a.lower().replace(" ", "-") for a in adapters) + ".png"
        result.save(out / name)
        images.append(result.images[0])
        for unit in result.info["ip_adapters"]:
            rows.append(
                {
                    "step": number,
                    "adapters": " + ".join(adapters),
                    "adapter": unit["adapter"],
                    "needs": f"{unit['consumes']}[{unit['embed_dim']}]",
                    "encoder": unit["encoder"],
                    "encoder_source": unit["encoder_source"],
                    "embedding": ",".join(unit["embeddings"]),
                    "seconds": round(seconds, 3),
                    "image": name,
                }
            )
    refusal = _refused_pairing(engine, reference)
    table = _markdown_table(rows)
    if weights is None:
        weights_note = "tiny, random weights: the pictures are noise, the plumbing is real"
    else:
        weights_note = ("tiny, trained on flat shapes; Base, Base ViT-G and Plus were trained with it and draw the "
                        "reference, the other adapters have random weights and only show the switching")  # fmt: skip
    report = (
        "# imprompt demo: switching IP-Adapters in one process\n\n"
        f"Reference image: `{REFERENCE}`; empty prompt; model `{SD15_MODEL}` ({weights_note}).\n\n"
        f"{table}\n\nA wrong pairing is refused before any compute:\n\n> {refusal}\n"
    )
    (out / "demo-report.md").write_text(report)
    (out / "demo-report.json").write_text(json.dumps(rows, indent=2))
    _contact_sheet(reference, images).save(out / "demo-grid.png")
    echo(table)
    echo(f"\nwrong pairing refused: {refusal}")
    echo(f"\nimages, demo-grid.png and demo-report.md written to {out}")
    return rows


def _refused_pairing(engine, reference) -> str:
    """Forcing the ViT-H encoder onto Base ViT-G: the pairing that broke other tools, refused with a fix."""
    try:
        engine.generate(
            model=SD15_MODEL,
            steps=1,
            ip_adapters=[{"adapter": "Base ViT-G", "images": [reference], "encoder": "IP-Adapter/models/image_encoder"}],
        )
    except ImpromptError as exc:
        return str(exc)
    raise AssertionError("the demo expected Base ViT-G with a ViT-H encoder to be refused")


ENCODER_SOURCE = {
    "loaded": "loaded from disk",
    "cache": "reused (in memory)",
    "not needed": "not needed (embedding cached)",
}


def _markdown_table(rows: list[dict]) -> str:
    header = "| step | request | unit | needs | encoder | encoder was | embedding | request time (s) |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['adapters']} | {r['adapter']} | {r['needs']} | {r['encoder']} | "
            f"{ENCODER_SOURCE[r['encoder_source']]} | {r['embedding']} | {r['seconds']} |"
        )
    return "\n".join(lines)


def _contact_sheet(reference: Image.Image, images: list[Image.Image], cell: int = 128) -> Image.Image:
    """The reference, then one cell per scenario step, each labelled with its step and adapter(s), so the picture
    explains itself without the table."""
    labels = ["reference"] + [f"{n}. {' + '.join(adapters)}" for n, adapters in enumerate(SCENARIO, start=1)]
    font = ImageFont.load_default(size=13)
    band = 40
    sheet = Image.new("RGB", (cell * len(labels), cell + band), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip([reference, *images], labels)):
        sheet.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (i * cell, 0))
        words, lines = label.split(" "), [""]
        for word in words:  # wrap to the cell's width
            candidate = f"{lines[-1]} {word}".strip()
            if lines[-1] and draw.textlength(candidate, font=font) > cell - 6:
                lines.append(word)
            else:
                lines[-1] = candidate
        draw.multiline_text((i * cell + 3, cell + 3), "\n".join(lines[:2]), fill="black", font=font, spacing=2)
    return sheet
