"""`make bench-controlnet` (`python -m tools.bench_controlnet`): what switching ControlNets, the preprocessor cache
and a ControlNet's denoising step cost, measured side by side in one run.

Real SD 1.5 size, random weights (speed does not depend on their values): the `make bench` pack's pipeline
(`tools.bench.build_models`), two ControlNets made by `ControlNetModel.from_unet` of its UNet with random (not
zero) zero convs, saved as diffusers folders (fp16, as the pipeline's files) in `.bench-cache/real-controlnets/`,
and Depth Anything v2 ViT-L (the published `depth_anything_v2_vitl` layout: DINOv2-L, 24 blocks of 1024, DPT head
256/512/1024/1024, fused at 256) in `.bench-cache/annotators/`. Built once. Each part runs in a process of its own:

1. `switch`: requests alternating ControlNet A, B, A, B, 1 step at 64 px so that the switch dominates.
   imprompt: both ControlNets resident (`controlnet_cache_budget` for two); the ControlNet part of a request is
   `info["timings"]["by_kind"]["controlnets"]` prepare (the model from the cache) + apply (the ControlNet
   pipeline built over the resident modules); the whole request is `info["timings"]["total"]`.
   diffusers' usual path: drop the current ControlNet, `ControlNetModel.from_pretrained` of the next one from
   disk, `StableDiffusionControlNetPipeline.from_pipe(base, controlnet=...)` (the base pipeline stays loaded).
   The strongest baseline, a diffusers expert's script: both ControlNets loaded once and kept, `from_pipe` with
   the next one. The switch is the time to a pipeline ready to run; the whole request adds the 1-step call.
   The three share one process (about 16 GB at fp32) and take turns over --rounds rounds (in one order, then the
   other), so that slow drifts of a shared machine hit them alike.
2. `preprocess`: a preprocessor run on a new image vs its cache hit (the same image again): canny and
   depth_anything_v2 at processor_res 512 on a 768x512 image, through the engine (`by_kind.controlnets.prepare`
   of a 1-step 64 px request) and through `imprompt.preprocess.detect` with a cache. DWPose is not measured: its
   real weights are two ONNX graphs (YOLOX-L, RTMPose-L) whose architectures would have to be written out to
   build them at real size with random values.
3. `steps`: seconds per denoising step at 512x512 (batch 2 with CFG), no ControlNet vs one unit (module none),
   taking turns round by round.
Writes `docs/controlnet-benchmark.json` (raw numbers, the machine, the load average before and after) and
`docs/controlnet-benchmark.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .bench import MODELS, _peak_rss, build_models, diffusers_pipeline, machine

NETS = ("cn-a", "cn-b")
DEPTH_FILE = "depth_anything_v2_vitl.safetensors"
# Depth Anything v2 Large as published (transformers' Depth-Anything-V2-Large config)
DEPTH_VITL = dict(hidden=1024, layers=24, mlp=4096, neck=[256, 512, 1024, 1024], features=256, head=32)
PREPROCESSORS = ("canny", "depth_anything_v2")
PARTS = ("switch", "preprocess", "steps")


# ------------------------------------------------------------------------------------------------ the models


def build_controlnets(cache: Path, root: Path) -> Path:
    """Two real-size SD 1.5 ControlNets (diffusers folders, fp16) under `<cache>/real-controlnets/controlnet/`."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    folder = cache / "real-controlnets"
    if (folder / "done").is_file():
        return folder
    unet = UNet2DConditionModel.from_pretrained(root / "diffusers" / MODELS["real"] / "unet", dtype=torch.float32)
    for seed, name in enumerate(NETS, start=1):
        net = ControlNetModel.from_unet(unet)
        torch.manual_seed(seed)
        with torch.no_grad():  # the zero convs not zero, as a trained ControlNet's
            for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
                for p in module.parameters():
                    p.normal_(0.0, 0.02)
        net.to(torch.float16).save_pretrained(folder / "controlnet" / name, safe_serialization=True)
        del net
    (folder / "done").write_text("")
    return folder


def build_depth_anything(cache: Path) -> Path:
    """Depth Anything v2 ViT-L with random weights, in the original checkpoint's names (as the ControlNet extension
    downloads it), at `<cache>/annotators/` (found from the models' roots: imprompt's own annotators folder)."""
    path = cache / "annotators" / DEPTH_FILE
    if path.is_file():
        return path
    from safetensors.torch import save_file
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    from imprompt.preprocess.depth import out_indices

    from .annotator_pack import original_depth_keys

    t = DEPTH_VITL
    backbone = Dinov2Config(hidden_size=t["hidden"], num_hidden_layers=t["layers"], num_attention_heads=t["hidden"] // 64,
                            mlp_ratio=t["mlp"] // t["hidden"], patch_size=14, image_size=518, layerscale_value=1.0,
                            out_indices=out_indices(t["layers"], 2), apply_layernorm=True, reshape_hidden_states=False)  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=t["hidden"],
                                 neck_hidden_sizes=t["neck"], fusion_hidden_size=t["features"],
                                 head_hidden_size=t["head"], depth_estimation_type="relative")  # fmt: skip
    torch.manual_seed(3)
    model = DepthAnythingForDepthEstimation(config).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(original_depth_keys(model.state_dict()), str(path))
    return path


def busy_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat), to tell other work's share."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def picture(seed: int, width: int = 768, height: int = 512):
    """A photo-like test picture: random shapes over a gradient (a new seed: a new image for the caches)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)
    image = Image.fromarray(np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(24):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, 120))
        box = (x - r, y - r, x + r, y + r)
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return image.filter(ImageFilter.GaussianBlur(1.5))


def unit(net: str, image, **fields) -> dict:
    return {"model": net, "image": image, **fields}


def tiny_request(controlnets: list, seed: int = 1) -> dict:
    return {"model": MODELS["real"], "prompt": "a shape", "seed": seed, "steps": 1, "width": 64, "height": 64,
            "controlnets": controlnets}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- parts


def part_switch(root: Path, nets: Path, args) -> dict:
    """imprompt (both resident), diffusers reloading, and the expert's script (both kept), in one process, taking
    turns round by round (imprompt, reload, expert; then the other way round), each request switching."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from imprompt import Engine

    control = picture(0).resize((64, 64))
    folder = nets / "controlnet"
    engine = Engine([root, nets], controlnet_cache_budget="8GiB")  # room for both (1.4 GB each in fp32)
    base = diffusers_pipeline(root, MODELS["real"])  # diffusers' base pipeline, loaded once, as a webui keeps it

    def load(name: str):
        return ControlNetModel.from_pretrained(folder / name, dtype=torch.float32).eval()

    def call(pipe) -> None:
        pipe.set_progress_bar_config(disable=True)
        pipe("a shape", image=control, num_inference_steps=1, width=64, height=64,
             generator=torch.Generator().manual_seed(1))  # fmt: skip

    def imprompt(i: int) -> tuple[float, float]:
        result = engine.generate(tiny_request([unit(NETS[i % 2], control)]))
        part = result.info["timings"]["by_kind"]["controlnets"]
        for event in result.info["events"]:
            events[event["event"]] = events.get(event["event"], 0) + 1
        return part["prepare"] + part["apply"], result.info["timings"]["total"]

    current = {"net": None}

    def reload(i: int) -> tuple[float, float]:
        started = time.perf_counter()
        current["net"] = None  # the usual path: drop the current ControlNet (and collect) before loading the next
        gc.collect()
        current["net"] = load(NETS[i % 2])
        pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=current["net"])
        ready = time.perf_counter()
        call(pipe)
        return ready - started, time.perf_counter() - started

    kept = {name: load(name) for name in NETS}

    def expert(i: int) -> tuple[float, float]:
        started = time.perf_counter()
        pipe = StableDiffusionControlNetPipeline.from_pipe(base, controlnet=kept[NETS[i % 2]])
        ready = time.perf_counter()
        call(pipe)
        return ready - started, time.perf_counter() - started

    ways = {"imprompt": imprompt, "diffusers_reload": reload, "diffusers_expert": expert}
    events: dict[str, int] = {}
    count = dict.fromkeys(ways, 0)
    out: dict = {name: {"controlnet_s": [], "request_s": [], "round": []} for name in ways}
    out["imprompt"]["first_loads"] = []
    for name, run in ways.items():  # imprompt's first use of each loads it; diffusers' first calls warm its paths
        for _ in range(2):
            part, total = run(count[name])
            count[name] += 1
            if name == "imprompt":
                out[name]["first_loads"].append({"controlnet_s": part, "request_s": total})
    for round_ in range(args.rounds):
        for name in list(ways) if round_ % 2 == 0 else list(ways)[::-1]:
            for _ in range(args.switches):
                part, total = ways[name](count[name])
                count[name] += 1
                out[name]["controlnet_s"].append(part)
                out[name]["request_s"].append(total)
                out[name]["round"].append(round_)
    out["imprompt"]["events"] = events
    return out


def part_preprocess(root: Path, nets: Path, args) -> dict:
    """A new image vs a cache hit, through the engine (its first request, which loads everything, apart) and
    through `detect` with a cache of its own (the detector already loaded by the engine's first request)."""
    from imprompt import Engine, preprocess
    from imprompt.util.cache import ByteLRU

    engine = Engine([root, nets], controlnet_cache_budget="8GiB")
    cache = ByteLRU("detections", 2**30)
    out: dict = {}
    seed = iter(range(100, 10_000))
    for name in PREPROCESSORS:
        pre = preprocess.find(name)
        weights = preprocess.locate_weights(pre, [root, nets])

        def through_engine(image) -> float:
            result = engine.generate(tiny_request([unit(NETS[0], image, module=name, processor_res=args.processor_res)]))
            return result.info["timings"]["by_kind"]["controlnets"]["prepare"]

        def direct(image) -> float:
            started = time.perf_counter()
            preprocess.detect(pre, image, args.processor_res, weights=weights, cache=cache)
            return time.perf_counter() - started

        warm = picture(next(seed))
        first = through_engine(warm)  # loads the pipeline, the ControlNet, the detector's weights
        runs = {f"{way}/{kind}": [] for way in ("engine", "detect") for kind in ("new image", "cache hit")}
        for round_ in range(args.rounds):  # a new image, then a hit (the engine: the warm one; detect: this one)
            image = picture(next(seed))
            steps = [("engine/new image", through_engine, image), ("engine/cache hit", through_engine, warm),
                     ("detect/new image", direct, image), ("detect/cache hit", direct, image)]  # fmt: skip
            if round_ % 2:  # the engine's pair and detect's pair in the other order (each new before its hit)
                steps = steps[2:] + steps[:2]
            for key, run, picture_ in steps:
                runs[key].append(run(picture_))
        for way in ("engine", "detect"):
            out[f"{name}/{way}"] = {"first_s": first if way == "engine" else None,
                                    "new image": runs[f"{way}/new image"], "cache hit": runs[f"{way}/cache hit"]}  # fmt: skip
    return out


def part_steps(root: Path, nets: Path, args) -> dict:
    """Seconds per denoising step at --step-size (batch 2 with CFG), no ControlNet vs one unit, in turns."""
    from imprompt import Engine

    engine = Engine([root, nets], controlnet_cache_budget="8GiB")
    control = picture(0).resize((args.step_size, args.step_size))
    configs = {"none": [], "one ControlNet": [unit(NETS[0], control)]}

    def run(controlnets, steps: int) -> list[float]:
        marks: list[float] = []
        engine.generate({**tiny_request(controlnets), "steps": steps, "width": args.step_size, "height": args.step_size},
                        on_step=lambda step, total: marks.append(time.perf_counter()))  # fmt: skip
        return [b - a for a, b in zip(marks, marks[1:])]

    out: dict[str, list[float]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name in list(configs) if round_ % 2 == 0 else list(configs)[::-1]:
            out[name] += run(configs[name], args.steps + 1)  # steps + 1 marks: `steps` whole steps between them
    return out


def run_part(part: str, root: Path, nets: Path, args) -> dict:
    started = time.perf_counter()
    result = {"switch": part_switch, "preprocess": part_preprocess, "steps": part_steps}[part](root, nets, args)
    return {"part": part, "result": result, "wall_s": time.perf_counter() - started, "peak_rss_bytes": _peak_rss(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


# ---------------------------------------------------------------------------------------------------- report


def summarise(results: dict) -> dict:
    p50 = statistics.median
    s: dict = {"wall_s": {k: r["wall_s"] for k, r in results.items()},
               "peak_rss_bytes": {k: r["peak_rss_bytes"] for k, r in results.items()}}
    results = {k: r["result"] for k, r in results.items()}
    if "switch" in results:
        names = {"imprompt": "imprompt (both resident)",
                 "diffusers_reload": "diffusers reload (from_pretrained + from_pipe)",
                 "diffusers_expert": "diffusers expert (both kept, from_pipe)"}  # fmt: skip
        sw = results["switch"]
        s["switch"] = {label: {"controlnet_p50": p50(sw[k]["controlnet_s"]), "controlnet_min": min(sw[k]["controlnet_s"]),
                               "controlnet_max": max(sw[k]["controlnet_s"]), "request_p50": p50(sw[k]["request_s"]),
                               "n": len(sw[k]["controlnet_s"])} for k, label in names.items()}  # fmt: skip

        def in_round(k: str, r: int) -> list[float]:
            return [x for x, rr in zip(sw[k]["controlnet_s"], sw[k]["round"]) if rr == r]

        rounds = sorted(set(sw["imprompt"]["round"]))  # the ratio in each round: the noise of the headline
        s["switch_ratio_per_round"] = [p50(in_round("diffusers_reload", r)) / max(p50(in_round("imprompt", r)), 1e-4)
                                       for r in rounds]  # fmt: skip
    if "preprocess" in results:
        s["preprocess"] = {k: {"first_s": v["first_s"], "new_p50": p50(v["new image"]), "hit_p50": p50(v["cache hit"]),
                               "n": len(v["new image"])} for k, v in results["preprocess"].items()}  # fmt: skip
    if "steps" in results:
        st = {k: p50(v) for k, v in results["steps"].items()}
        s["steps"] = {"none_p50": st["none"], "one_p50": st["one ControlNet"], "ratio": st["one ControlNet"] / st["none"],
                      "n": len(results["steps"]["none"])}  # fmt: skip
    return s


def render(s: dict, report: dict) -> str:
    def t(seconds: float) -> str:  # the engine's timings are rounded to 0.1 ms
        return "< 0.1 ms" if seconds < 1e-4 else f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"

    m, load = report["machine"], report["load_average"]
    lines = ["# ControlNet: switching, the preprocessor cache, a step with a unit", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch thread{'s' if m['threads'] != 1 else ''}), {m['memory_gib']} GiB RAM; "
             f"Python {m['python']}, torch {m['torch']}, CPU, float32. Load average (1 min) {load['before'][0]:.2f} "
             f"before the run, {load['after'][0]:.2f} after it; other work used "
             f"{report['others_cpu_s'] / report['wall_s']:.2f} of the {m['cores']} cores on average during the run"
             + (" (the machine was shared: the numbers are noisier than on an idle one, and the run used "
                f"{m['threads']} torch thread(s) so as not to wait on a descheduled one)."
                if report["others_cpu_s"] / report["wall_s"] > 0.25 else "."),
             "", f"Command: `{report['command']}`; measured {report['measured_at']}, {report['wall_s'] / 60:.1f} min "
             f"in all. Real SD 1.5 size, random weights (see tools/bench_controlnet.py).", ""]  # fmt: skip
    if "switch" in s:
        sw = s["switch"]
        imp = sw["imprompt (both resident)"]
        reload = sw["diffusers reload (from_pretrained + from_pipe)"]
        expert = sw["diffusers expert (both kept, from_pipe)"]
        lines += ["## Switching between two ControlNets (A, B, A, B; 1 step at 64 px)", "",
                  "| system | ControlNet part p50 | min | max | whole request p50 | switches |", "|---|---|---|---|---|---|"]
        for name, v in sw.items():
            lines.append(f"| {name} | {t(v['controlnet_p50'])} | {t(v['controlnet_min'])} | {t(v['controlnet_max'])} | "
                         f"{t(v['request_p50'])} | {v['n']} |")  # fmt: skip
        ratio = reload["controlnet_p50"] / max(imp["controlnet_p50"], 1e-4)
        rounds = ", ".join(f"{r:.0f}x" for r in s["switch_ratio_per_round"])
        lines += ["", f"The ControlNet part of a switch with both resident is **{ratio:.0f}x** faster than diffusers "
                      f"reloading it (p50 over p50; per round: {rounds}); the whole request "
                      f"{reload['request_p50'] / imp['request_p50']:.1f}x. imprompt's part is `by_kind.controlnets` "
                      "prepare (the model from its cache) + apply (the ControlNet pipeline built over the resident "
                      "modules, the control image fitted, the patches installed); diffusers' is from dropping the "
                      "current ControlNet to a pipeline ready to run. The expert's script, which keeps both loaded too "
                      f"and calls `from_pipe` by hand, takes {t(expert['controlnet_p50'])}: imprompt's part is "
                      f"{imp['controlnet_p50'] / max(expert['controlnet_p50'], 1e-4):.1f}x it (imprompt also fits the "
                      "control image and installs the weight/window/mode patches per request).", ""]  # fmt: skip
    if "preprocess" in s:
        lines += [f"## The preprocessor cache (768x512 image, processor_res {report['args']['processor_res']})", "",
                  "| preprocessor / through | first use (loads) | new image p50 | cache hit p50 | ratio | runs |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, v in s["preprocess"].items():
            lines.append(f"| {name.replace('/', ' / ')} | {t(v['first_s']) if v['first_s'] is not None else '-'} | {t(v['new_p50'])} | {t(v['hit_p50'])} | "
                         f"{v['new_p50'] / max(v['hit_p50'], 1e-4):.0f}x | {v['n']} |")  # fmt: skip
        lines += ["", "Through the engine the time is `by_kind.controlnets.prepare` (the detection plus the ControlNet "
                      "from its cache); `detect` is the call alone, with a cache. Depth Anything is v2 ViT-L at real "
                      "size; DWPose is not measured (its real weights are ONNX graphs of YOLOX-L and RTMPose-L that "
                      "would have to be written out layer by layer to build with random values).", ""]  # fmt: skip
    if "steps" in s:
        st = s["steps"]
        lines += [f"## A denoising step at {report['args']['step_size']}x{report['args']['step_size']} (batch 2 with CFG)",
                  "", "| ControlNet units | seconds per step p50 | steps |", "|---|---|---|",
                  f"| none | {st['none_p50']:.2f} s | {st['n']} |",
                  f"| one | {st['one_p50']:.2f} s | {st['n']} |", "",
                  f"One unit costs **{st['ratio']:.2f}x** a step without (the ControlNet's encoder half of a UNet on "
                  "the same batch), the two taking turns round by round.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_controlnet", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--switches", type=int, default=2, help="measured switches per system and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds")
    parser.add_argument("--processor-res", type=int, default=512)
    parser.add_argument("--step-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1, help="measured steps per request (its first step is not measured)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (on a machine shared with other work, 1 avoids waiting on a descheduled thread)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--out", type=Path, default=Path("docs/controlnet-benchmark.json"))
    parser.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part in this process
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from imprompt.cli import quiet_libraries

    quiet_libraries()
    root = build_models(args.cache, "real", adapters=False)
    nets = build_controlnets(args.cache, root)
    build_depth_anything(args.cache)
    if args.part:
        args.json_out.write_text(json.dumps(run_part(args.part, root, nets, args)))
        return 0
    started, before, busy = time.perf_counter(), os.getloadavg(), busy_seconds()
    given = argv if argv is not None else sys.argv[1:]
    results: dict = {}
    for count, part in enumerate(args.parts.split(",")):
        out = args.cache / f"controlnet-{part}-{count}.json"
        print(f"bench-controlnet: {part} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "tools.bench_controlnet", *given, "--part", part, "--json-out", str(out)],
                       check=True)  # fmt: skip
        measured = json.loads(out.read_text())
        results[part] = measured
    report = {"machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m tools.bench_controlnet" + (" " + " ".join(given) if given else ""),
              "args": {k: str(v) for k, v in vars(args).items() if k not in ("part", "json_out")},
              "load_average": {"before": before, "after": os.getloadavg()}, "wall_s": time.perf_counter() - started,
              "others_cpu_s": busy_seconds() - busy - sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]),
              "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))  # the raw numbers first: nothing below can lose them
    report["summary"] = summarise(results)
    args.out.write_text(json.dumps(report, indent=2))
    text = render(report["summary"], report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
