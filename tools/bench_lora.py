"""`make bench-lora` (`python -m tools.bench_lora`): what switching LoRA sets and denoising with a LoRA cost, side by side.

At real SD 1.5 size (the random-weight pipeline `tools.bench` builds into `.bench-cache`) with two random-weight
kohya LoRAs of rank 32 on every attention projection of the UNet and the text encoder, measured in one process:
- a switch: imprompt's per-request activation (the LoRA set of the next request: `set_adapters` on adapters kept
  loaded; the engine's `attach` timing, with no IP-Adapter unit so that it is the LoRA switch alone), against the
  reload path (`unload_lora_weights` + `load_lora_weights` of the next file + `set_adapters`), and against
  diffusers with both kept loaded and `set_adapters` called by hand (what imprompt does; the strongest baseline);
- a denoising step at 512 px with LoRA A at 0.8: imprompt, diffusers unfused (the same PEFT layers), diffusers
  fused (`fuse_lora`, weights merged into the base layers), the three taking turns round by round.
Writes `docs/lora-benchmark.md` and `.json`. Speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from .bench import MODELS, build_models, diffusers_pipeline, machine
from .extra_models import kohya_lora, write


def switch_imprompt(root: Path, loras: Path, switches: int) -> list[float]:
    from imprompt import Engine

    engine = Engine([root, loras])
    seconds = []
    for i in range(switches + 2):
        name = "lora-a" if i % 2 == 0 else "lora-b"
        result = engine.generate(model=MODELS["real"], prompt=f"a cat <lora:{name}:0.8>", steps=1, width=64, height=64, seed=1)
        if i >= 2:  # both loaded once; from here on every request switches
            seconds.append(result.info["timings"]["by_kind"]["loras"]["apply"])
    return seconds


def switch_reload(root: Path, loras: Path, switches: int) -> list[float]:
    pipe = diffusers_pipeline(root, MODELS["real"])
    seconds = []
    for i in range(switches + 1):
        name = "lora-a" if i % 2 == 0 else "lora-b"
        started = time.perf_counter()
        pipe.unload_lora_weights()
        pipe.load_lora_weights(str(loras), weight_name=f"{name}.safetensors", adapter_name=name.replace("-", "_"))
        pipe.set_adapters([name.replace("-", "_")], [0.8])
        if i >= 1:
            seconds.append(time.perf_counter() - started)
    return seconds


def switch_kept(root: Path, loras: Path, switches: int) -> list[float]:
    pipe = diffusers_pipeline(root, MODELS["real"])
    for name in ("lora-a", "lora-b"):
        pipe.load_lora_weights(str(loras), weight_name=f"{name}.safetensors", adapter_name=name.replace("-", "_"))
    seconds = []
    for i in range(switches):
        started = time.perf_counter()
        pipe.set_adapters(["lora_a" if i % 2 == 0 else "lora_b"], [0.8])
        seconds.append(time.perf_counter() - started)
    return seconds


def steps(root: Path, loras: Path, size: int, count: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per denoising step (batch 2 with CFG) with LoRA A at 0.8, the three ways taking turns."""
    from imprompt import Engine

    engine = Engine([root, loras])
    unfused = diffusers_pipeline(root, MODELS["real"])
    unfused.load_lora_weights(str(loras), weight_name="lora-a.safetensors", adapter_name="lora_a")
    unfused.set_adapters(["lora_a"], [0.8])
    fused = diffusers_pipeline(root, MODELS["real"])
    fused.load_lora_weights(str(loras), weight_name="lora-a.safetensors", adapter_name="lora_a")
    fused.fuse_lora(lora_scale=0.8)
    fused.unload_lora_weights()  # the merged weights stay; the LoRA layers go

    def timed(run) -> list[float]:
        marks = []
        run(lambda: marks.append(time.perf_counter()))
        return [b - a for a, b in zip(marks, marks[1:])]

    def imprompt_run(mark):
        engine.generate(model=MODELS["real"], prompt="a cat <lora:lora-a:0.8>", steps=count + 1, width=size,
                        height=size, seed=1, on_step=lambda step, total: mark())  # fmt: skip

    def diffusers_run(pipe):
        def run(mark):
            pipe("a cat", num_inference_steps=count + 1, width=size, height=size, guidance_scale=7.0,
                 generator=torch.Generator().manual_seed(1), callback_on_step_end=lambda p, i, t, k: (mark(), k)[1])  # fmt: skip

        return run

    ways = {"imprompt": imprompt_run, "diffusers unfused": diffusers_run(unfused), "diffusers fused": diffusers_run(fused)}
    out: dict[str, list[float]] = {name: [] for name in ways}
    for name, run in ways.items():  # warm each once
        timed(run)
    for round_ in range(rounds):
        order = list(ways) if round_ % 2 == 0 else list(ways)[::-1]
        for name in order:
            out[name] += timed(ways[name])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_lora", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--switches", type=int, default=20)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--step-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/lora-benchmark.md"))
    parser.add_argument("--switch-only", action="store_true",
                        help="measure the switches again; keep the step table of the last run (its date is shown)")
    args = parser.parse_args(argv)
    from imprompt.cli import quiet_libraries

    quiet_libraries()
    root = build_models(args.cache, "real")
    loras = args.cache / f"loras-rank{args.rank}"
    if not (loras / "lora-b.safetensors").is_file():
        pipe = diffusers_pipeline(root, MODELS["real"])
        for seed, name in ((1, "lora-a"), (2, "lora-b")):
            write(loras / f"{name}.safetensors", {k: v.half() for k, v in kohya_lora(pipe, seed, rank=args.rank).items()})
    results = {
        "switch": {"imprompt": switch_imprompt(root, loras, args.switches),
                   "diffusers reload (unload + load_lora_weights)": switch_reload(root, loras, args.switches),
                   "diffusers, both kept loaded, set_adapters": switch_kept(root, loras, args.switches)},  # fmt: skip
    }
    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.switch_only else None
    results["step"] = previous["raw"]["step"] if previous else steps(root, loras, args.step_size, args.steps, args.rounds)
    step_date = previous["step_date"] if previous else time.strftime("%Y-%m-%d %H:%M")
    summary = {kind: {name: statistics.median(values) for name, values in ways.items()} for kind, ways in results.items()}
    file_mb = (loras / "lora-a.safetensors").stat().st_size / 1e6
    report = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "lora_file_mb": file_mb,
              "raw": results, "p50": summary, "step_date": step_date,
              "switch_date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    args.out.write_text(render(summary, args, file_mb, report))
    print(args.out.read_text())
    return 0


def render(summary: dict, args, file_mb: float, report: dict) -> str:
    machine_info = report["machine"]
    switch, step = summary["switch"], summary["step"]
    reload_key = "diffusers reload (unload + load_lora_weights)"
    lines = [
        "# LoRA switching and per-step cost",
        "",
        f"Written by `python -m tools.bench_lora` (real SD 1.5 size, random weights; two kohya LoRAs of rank {args.rank} "
        f"on every attention projection of the UNet and the text encoder, {file_mb:.0f} MB each in fp16; fp32 compute "
        f"on {machine_info.get('cpu', 'this CPU')}). All in one process, side by side.",
        "",
        f"## Switching between two LoRA sets (p50 of {args.switches} switches; run of {report['switch_date']})",
        "",
        "| path | p50 per switch | vs imprompt |",
        "|---|---|---|",
    ]
    for name, value in switch.items():
        lines.append(f"| {name} | {value * 1000:.1f} ms | {value / switch['imprompt']:.1f}x |")
    lines += [
        "",
        f"imprompt vs the reload path: **{switch[reload_key] / switch['imprompt']:.0f}x faster**. imprompt does what a",
        "diffusers expert keeping both LoRAs loaded does (`set_adapters`), plus the request's checks.",
        "",
        f"## A denoising step at {args.step_size} px with LoRA A at 0.8 (batch 2 with CFG; p50 of "
        f"{args.steps * args.rounds} steps each, the three taking turns; run of {report['step_date']})",
        "",
        "| path | p50 per step | vs diffusers unfused |",
        "|---|---|---|",
    ]
    for name, value in step.items():
        lines.append(f"| {name} | {value:.2f} s | {value / step['diffusers unfused']:.3f}x |")
    lines += ["", "imprompt runs the same PEFT layers as diffusers unfused (equal within noise). Fused is faster per "
              "step (the LoRA is merged into the weights: no extra matmuls), but switching a fused LoRA means "
              "unfusing, which subtracts what was added: in floating point the weights do not come back exactly, so "
              "the next request's pixels would depend on the LoRAs before it. imprompt keeps the layers unfused, for "
              "pixels that depend on the request alone and switches that cost a `set_adapters` call.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
