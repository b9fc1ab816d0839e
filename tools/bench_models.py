"""`make bench-models` (`python -m tools.bench_models`): switching base models, resident vs reloaded, in one run.

Two SD 1.5 checkpoints at real size (the `make bench` pack's random-weight `sd15`, and `sd15-b`: the same
components but its own copy of the UNet file, so nothing is shared), alternated A, B, A, B, ... Compared:
- imprompt with room for both (`pipeline_cache_budget`): after the first load of each, a switch finds it resident;
- imprompt with room for one: every switch unloads one and loads the other (imprompt before resident pipelines);
- on a GPU, imprompt with room for one on the device and the other waiting in CPU memory (`offload_budget`): a
  switch moves one model off the device and the other back, instead of reading it from disk;
- diffusers reloading on every change, `StableDiffusionPipeline.from_pretrained` of the next model after dropping
  the current one: what SD.Next and the A1111 webui do on a checkpoint change (with their checkpoint cache off,
  its default).
The switch is timed from the request to a pipeline ready on the device (imprompt: the result's `load` timing, with
no IP-Adapter unit, so nothing else is loaded; diffusers: dropping the current pipeline and collecting, as SD.Next
does, then `from_pretrained` and `.to(device)`). Each
system runs in a process of its own (peak RSS its own); the first load of each model is reported apart.
Results: docs/model-switch-benchmark.md and .json (the previous run's numbers are kept beside the new ones).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .bench import _peak_rss, build_models, machine

SYSTEMS = ("imprompt_resident", "imprompt_offloaded", "imprompt_one_at_a_time", "diffusers_reload")
LABELS = {
    "imprompt_resident": "imprompt, both resident (model budget for two)",
    "imprompt_offloaded": "imprompt, budget for one on the GPU, the other waiting in CPU memory (offload tier)",
    "imprompt_one_at_a_time": "imprompt, model budget for one (reload on every switch)",
    "diffusers_reload": "diffusers `from_pretrained` on every change (SD.Next / A1111 approach)",
}


def second_model(root: Path, first: str) -> str:
    """`<first>-b`: the first model's folder with its own copy of the UNet weights (other files linked)."""
    source, target = root / "diffusers" / first, root / "diffusers" / f"{first}-b"
    if not (target / "done").is_file():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for item in source.iterdir():
            if item.name == "unet":
                shutil.copytree(item, target / "unet")
            else:
                (target / item.name).symlink_to(item.resolve())
        (target / "done").write_text("")
    return target.name


def switches(models: list[str], count: int) -> list[str]:
    return [models[i % 2] for i in range(count + 2)]  # the first two are first loads


def systems(device: str) -> tuple[str, ...]:
    """The offload tier exists on CUDA devices only (on the CPU the pipelines already live in CPU memory)."""
    return SYSTEMS if device.startswith("cuda") else tuple(s for s in SYSTEMS if s != "imprompt_offloaded")


def run_imprompt(root: Path, models: list[str], args, budget: str, offload_budget: str) -> dict:
    from imprompt import Engine

    engine = Engine(root, device=args.device, dtype=args.dtype, pipeline_cache_budget=budget,
                    offload_budget=offload_budget)  # fmt: skip
    seconds, events = [], []
    for model in switches(models, args.switches):
        result = engine.generate(model=model, prompt="a shape", steps=1, width=64, height=64, seed=1)
        seconds.append(result.info["timings"]["load"])
        events += [e["event"] for e in result.info["events"]]
    counts = {name: events.count(name) for name in ("model_loaded", "model_offloaded", "model_restored", "model_reused")}
    return {"first_loads_s": seconds[:2], "switch_s": seconds[2:], "events": counts}


def run_diffusers(root: Path, models: list[str], args) -> dict:
    from diffusers import StableDiffusionPipeline

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    pipe, seconds = None, []
    for model in switches(models, args.switches):
        started = time.perf_counter()
        del pipe  # SD.Next unloads the current model (and collects) before it loads the next
        gc.collect()
        pipe = StableDiffusionPipeline.from_pretrained(root / "diffusers" / model, dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False).to(args.device)  # fmt: skip
        seconds.append(time.perf_counter() - started)
        pipe.set_progress_bar_config(disable=True)
        pipe("a shape", num_inference_steps=1, width=64, height=64)
    return {"first_loads_s": seconds[:2], "switch_s": seconds[2:]}


def run_system(name: str, root: Path, models: list[str], args) -> dict:
    started = time.perf_counter()
    if name == "diffusers_reload":
        result = run_diffusers(root, models, args)
    else:
        budget, offload = {"imprompt_resident": ("64GiB", "1"), "imprompt_offloaded": ("1", "64GiB"),
                           "imprompt_one_at_a_time": ("1", "1")}[name]  # fmt: skip
        result = run_imprompt(root, models, args, budget, offload)
    gpu = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    return {"system": name, "result": result, "wall_s": time.perf_counter() - started, "peak_rss_bytes": _peak_rss(),
            "peak_gpu_bytes": gpu, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def render(results: dict, previous: dict | None, args, info: dict) -> str:
    def ms(seconds: float) -> str:  # the engine's timings are rounded to 0.1 ms
        return "< 0.1 ms" if seconds < 1e-4 else f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"

    lines = [
        "# Switching base models: resident pipelines vs reloading", "",
        f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), {info['memory_gib']} GiB RAM; "
        f"Python {info['python']}, torch {info['torch']}, device: {args.device}, dtype {args.dtype}.", "",
        f"Command: `python -m tools.bench_models --size {args.size} --switches {args.switches} --device {args.device} "
        f"--dtype {args.dtype}` (two SD 1.5 models, "
        f"random weights, alternated; each system in its own process). Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
    ]  # fmt: skip
    gpu = args.device.startswith("cuda")
    lines += ["| system | switch p50 | min | max | first load of each | peak RSS |" + (" peak GPU memory |" if gpu else ""),
              "|---|---|---|---|---|---|" + ("---|" if gpu else "")]  # fmt: skip
    for name in systems(args.device):
        r = results[name]["result"]
        lines.append(f"| {LABELS[name]} | {ms(statistics.median(r['switch_s']))} | {ms(min(r['switch_s']))} | "
                     f"{ms(max(r['switch_s']))} | {', '.join(ms(s) for s in r['first_loads_s'])} | "
                     f"{results[name]['peak_rss_bytes'] / 2**30:.2f} GiB |"
                     + (f" {results[name]['peak_gpu_bytes'] / 2**30:.2f} GiB |" if gpu else ""))  # fmt: skip
    resident = statistics.median(results["imprompt_resident"]["result"]["switch_s"])
    reload = statistics.median(results["diffusers_reload"]["result"]["switch_s"])
    one = statistics.median(results["imprompt_one_at_a_time"]["result"]["switch_s"])
    faster = f"{reload / resident:.0f}x" if resident >= 1e-4 else f"more than {reload / 1e-4:.0f}x"
    lines += ["", f"A switch to a resident model is **{faster}** faster than diffusers' "
                  f"reload (p50 over p50); imprompt reloading one at a time takes {one / reload:.2f}x diffusers' "
                  f"reload. Holding both costs their memory: the peak RSS column. The first loads are not "
                  f"comparable across rows: the first system to run reads the files from disk, later ones find "
                  f"them in the page cache (imprompt's first load also imports diffusers' pipeline classes)."]  # fmt: skip
    if "imprompt_offloaded" in results:
        offloaded = statistics.median(results["imprompt_offloaded"]["result"]["switch_s"])
        lines += ["", f"Moving a model back from CPU memory (the offload tier) takes {ms(offloaded)}, "
                      f"{reload / max(offloaded, 1e-4):.1f}x faster than diffusers' reload from disk."]  # fmt: skip
    if previous:  # kept beside the new numbers, so that a regression shows
        before = [f"{n} {ms(statistics.median(previous['results'][n]['result']['switch_s']))}"
                  for n in SYSTEMS if n in previous.get("results", {})]  # fmt: skip
        lines += ["", f"Previous run ({previous.get('measured_at', '?')}), switch p50: {', '.join(before)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_models", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--switches", type=int, default=6, help="measured switches per system (after the first loads)")
    parser.add_argument("--quick", action="store_true", help="2 switches per system: a fast check at real size")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("docs/model-switch-benchmark.md"))
    parser.add_argument("--system", help=argparse.SUPPRESS)  # internal: run one system in this process
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.switches = 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    root = build_models(args.cache, args.size, adapters=False)
    first = "sd15" if args.size == "real" else "tiny-sd15"
    models = [first, second_model(root, first)]
    if args.system:
        from imprompt.cli import quiet_libraries

        quiet_libraries()
        args.json_out.write_text(json.dumps(run_system(args.system, root, models, args)))
        return 0
    results = {}
    for name in systems(args.device):
        out = args.cache / f"{args.size}-models-{name}.json"
        print(f"bench-models: {name} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "tools.bench_models", *(argv if argv is not None else sys.argv[1:]),
                        "--system", name, "--json-out", str(out)], check=True)  # fmt: skip
        results[name] = json.loads(out.read_text())
    raw = args.out.with_suffix(".json")
    previous = json.loads(raw.read_text()) if raw.is_file() else None
    info = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = render(results, previous, args, info)
    raw.write_text(json.dumps({"machine": info, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                               "previous": previous and {k: previous[k] for k in ("measured_at", "results")}}, indent=2))  # fmt: skip
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
