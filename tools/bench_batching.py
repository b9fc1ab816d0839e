"""`python -m tools.bench_batching`: concurrent HTTP clients on one model, request batching off vs on (and a compiled step), side by side in one run.

Each mode starts the real server, `imprompt serve` as a process of its own on 127.0.0.1 (stopped by its PID), with
its batching flags (`--batch-wait 0`: one request at a time; `--batch-wait S --batch-max N`: waiting requests that
can share a pipeline call run as one), then:
1. a warm-up: up to `--warmup` clients' adapter mixes once, one after another (a sequence of switching requests,
   other reference images, 1 step; Base + Plus first), so the model, the encoder and the adapters are loaded and, with `--compile`, the step compiled;
2. the measured load: `--clients` clients (httpx async, one connection each) send `--requests` txt2img requests
   each, one after another, all starting at once. Each client has its own adapter mix (Base and Plus IP-Adapter
   units at their own scales, two units, or none), prompt and seed, and each request its own reference image, so
   every request encodes a new image. Same model, size, steps, sampler and CFG scale: what a batch must share.
Reported per mode: images per second (images / wall time of the load), p50 / p95 / max latency (request sent to
answer read), the batches the server ran (its `batch` events), and each image's largest pixel difference from the
same request in the first mode (batching promises <= 1/255 against alone). Ratios against the first mode.

`--compile` adds a mode `on+compile` (the same clients, batching on, the server started with `--compile`) when
`imprompt serve` has that flag, and records the compile counters the server reports (`GET /v1/cache`'s "compiled"
key: graphs made, calls run eager) after the warm-up and after the load, and the server log's compile lines: the
recompiles the load caused after the switching warm-up. Where the
server has no `--compile`, the mode is skipped and the report says so. Each finished mode's numbers are written to
`<out>.partial.json` at once, so that a mode that does not finish leaves the others' behind.

Models: `--family sd15` (SD 1.5) or `sdxl`. Without `--models`, real-size random-weight files (speed does not depend
on the weights' values) are built once under `--cache`: the `make bench` pack's SD 1.5 pipeline (tools/bench.py),
or SDXL from imprompt's shipped configs, with a real-size CLIP ViT-H-14 image encoder and h94-layout Base and Plus
adapters at their real widths. `--models DIR --model NAME` runs on a pack of your own (the smoke test: the demo
pack's tiny models). Writes `--out` (.md) and the raw numbers beside it (.json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .bench import build_models, machine
from .bench_controlnet import busy_seconds, picture

ADAPTERS = {"sd15": ("Base", "Plus"), "sdxl": ("Base ViT-H SDXL", "Plus ViT-H SDXL")}
ADAPTER_FILES = {"sd15": ("models/ip-adapter_sd15.safetensors", "models/ip-adapter-plus_sd15.safetensors"),
                 "sdxl": ("sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
                          "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors")}  # fmt: skip
# each client's units: (0 = Base / 1 = Plus, scale); several units, and none, among them
MIXES = ([(0, 0.6)], [(1, 0.5)], [], [(0, 0.8), (1, 0.4)], [(1, 0.7)], [], [(0, 0.3)], [(1, 0.9), (0, 0.5)])
WARMUP = (3, 0, 1, 2, 4, 5, 6, 7)  # the warm-up's clients, in order: Base + Plus first (loads both), then switching
PROMPTS = ("a red fox in snow", "a lighthouse at dusk", "a bowl of ramen", "a city street in rain",
           "a cat on a sofa", "mountains over a lake", "a vintage car", "a field of sunflowers")  # fmt: skip
MODES = {"off": {"batch_wait": 0.0, "compile": False}, "on": {"batch_wait": None, "compile": False},
         "off+compile": {"batch_wait": 0.0, "compile": True}, "on+compile": {"batch_wait": None, "compile": True}}  # fmt: skip
LABELS = {"off": "batching off (`--batch-wait 0`)", "on": "batching on (`--batch-wait {wait:g} --batch-max {max}`)",
          "off+compile": "batching off, `--compile`", "on+compile": "batching on, `--compile`"}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the models


def build_real(cache: Path, family: str) -> tuple[Path, str]:
    """Real-size random-weight files, built once: the pipeline, ViT-H-14 and the family's Base and Plus adapters.
    Returns (models root, model name)."""
    root = Path(cache) / "batching" / f"real-{family}"
    if (root / "done").is_file():
        return root, family
    import json as json_
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from imprompt.demo.tiny_models import build_clip_vision, cross_attention_widths, write_adapter
    from imprompt.models import catalog
    from imprompt.models.single_file import CONFIGS

    print(f"bench-batching: writing real-size {family} files under {root} (once) ...", file=sys.stderr, flush=True)
    pipeline = root / "diffusers" / family
    if family == "sd15":  # the `make bench` pack's SD 1.5, linked (no second copy on disk)
        source = build_models(cache, "real", adapters=False) / "diffusers" / "sd15"
        shutil.rmtree(pipeline, ignore_errors=True)
        shutil.copytree(source, pipeline, copy_function=os.link)
    elif not (pipeline / "model_index.json").is_file():
        build_real_sdxl(pipeline)
    with torch.device("meta"):  # the widths only
        unet = UNet2DConditionModel.from_config(json_.loads((CONFIGS / family / "unet" / "config.json").read_text()))
    widths, cross = cross_attention_widths(unet), unet.config.cross_attention_dim
    h = catalog.VIT_H
    sub = "models" if family == "sd15" else "sdxl_models"
    build_clip_vision(root / "IP-Adapter" / sub / "image_encoder", hidden_size=h.hidden_size,
                      projection_dim=h.projection_dim, num_layers=h.num_layers, heads=h.num_attention_heads, seed=1,
                      intermediate_size=h.intermediate_size)  # fmt: skip
    base, plus = ADAPTER_FILES[family]
    write_adapter(root / "IP-Adapter" / base, "base", h.projection_dim, widths, cross, seed=10)
    # Plus: the Resampler over ViT-H's 1280-wide hidden states, at its real width (768 for SD 1.5, 1280 for SDXL)
    write_adapter(root / "IP-Adapter" / plus, "plus", h.hidden_size, widths, cross, seed=12,
                  resampler_dim=768 if family == "sd15" else 1280)  # fmt: skip
    (root / "done").write_text("")
    return root, family


def build_real_sdxl(folder: Path) -> None:
    """SDXL base at real size from imprompt's shipped configs, random weights, saved in float16 as distributed."""
    import json as json_

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from imprompt.demo.tiny_models import write_tokenizer
    from imprompt.models.single_file import CONFIGS

    configs = CONFIGS / "sdxl"
    for name in ("tokenizer", "tokenizer_2"):
        write_tokenizer(folder / name, clip_vocabulary=True)
    torch.manual_seed(0)
    pipeline = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_config(json_.loads((configs / "vae" / "config.json").read_text())),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json")),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(configs / "text_encoder_2" / "config.json")),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        unet=UNet2DConditionModel.from_config(json_.loads((configs / "unet" / "config.json").read_text())),
        scheduler=EulerDiscreteScheduler.from_config(json_.loads((configs / "scheduler" / "scheduler_config.json").read_text())),
    )  # fmt: skip
    pipeline.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def unet_tflops(family: str, size: int) -> float:
    """TFLOPs of one guided UNet step (2 rows: CFG) of the family's real-size UNet at `size` px, counted on the meta
    device (nothing computed): how a run at one size or family scales to another."""
    import json as json_

    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from imprompt.models.single_file import CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json_.loads((CONFIGS / family / "unet" / "config.json").read_text()))
        latents, t = torch.randn(2, 4, size // 8, size // 8), torch.tensor([10, 10])
        text = torch.randn(2, 77, unet.config.cross_attention_dim)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}} if family == "sdxl" else {}
        with FlopCounterMode(display=False) as counter:
            unet(latents, t, text, **extra)
    return counter.get_total_flops() / 1e12


# ---------------------------------------------------------------------------------------------- the clients


def png64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def payload(family: str, client: int, index: int, args, steps: int | None = None, image_seed: int = 0) -> dict:
    """Client `client`'s request `index` (SD.Next txt2img): its own prompt, seed, units and a reference image of
    its own (`image_seed` shifts the images: the warm-up's are not the load's)."""
    mix = MIXES[client % len(MIXES)]
    units = [{"adapter": ADAPTERS[family][kind], "scale": scale,
              "images": [png64(picture(image_seed + 1000 * client + 10 * index + u, 512, 512))]}
             for u, (kind, scale) in enumerate(mix)]  # fmt: skip
    return {"prompt": PROMPTS[client % len(PROMPTS)], "negative_prompt": "blurry", "seed": 1000 + 100 * client + index,
            "steps": steps or args.steps, "cfg_scale": 7.0, "width": args.size, "height": args.size,
            "sampler_name": "Euler a", "ip_adapter": units}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_help() -> str:
    done = subprocess.run([sys.executable, "-m", "imprompt.cli", "serve", "--help"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    return done.stdout


def start_server(roots: list[Path], model: str, wait: float, batch_max: int, compile_: bool, args, log: Path):
    """`imprompt serve` on a free loopback port with the mode's flags; returns (process, url) once it answers."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "imprompt.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--model", model, "--max-queue", str(max(16, 2 * args.clients)), "--batch-wait", f"{wait:g}"]  # fmt: skip
    for root in roots:
        command += ["--models", str(root)]
    if wait > 0:
        command += ["--batch-max", str(batch_max)]
    if compile_:
        command.append("--compile")
    if args.device:
        command += ["--device", args.device]
    if args.dtype:
        command += ["--dtype", args.dtype]
    errors = log.open("w")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # the model is loaded before the server answers (a real SDXL takes a while)
    while True:
        try:
            httpx.get(url + "/healthz", timeout=2)
            return process, url, command
        except httpx.HTTPError:
            if process.poll() is not None or time.time() > deadline:
                stop_server(process)
                raise RuntimeError(f"the server did not start: {log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def stop_server(process: subprocess.Popen) -> None:
    """Stop the server we started, by its PID (terminate, then kill after 30 s)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def compile_stats(cache: dict):
    """The compiled denoisers' counters from `GET /v1/cache` (its "compiled" key: model -> graphs made, calls run
    eager, compile seconds), or None from a server that compiles nothing."""
    return cache.get("compiled") or cache.get("compile") or None


def compile_lines(log: Path) -> list[str]:
    """The server log's compile lines (a new graph, a call run eager), in order."""
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if "compile:" in line]


def decoded(body: dict):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")).astype(np.int16)


async def load(url: str, payloads: dict[tuple[int, int], dict], clients: int, requests: int) -> dict:
    """`clients` async clients, each with a connection of its own, sending its requests one after another."""
    import httpx

    latencies: dict[str, float] = {}
    images: dict[tuple[int, int], object] = {}
    failures: list[dict] = []
    go = asyncio.Event()

    async def client(c: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(7200.0)) as http:
            await go.wait()
            for i in range(requests):
                started = time.perf_counter()
                response = await http.post("/sdapi/v1/txt2img", json=payloads[c, i])
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    failures.append({"client": c, "request": i, "status": response.status_code,
                                     "detail": response.text[:500]})  # fmt: skip
                    continue
                latencies[f"{c}/{i}"] = elapsed
                images[c, i] = decoded(response.json())

    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    await asyncio.sleep(0.2)  # every client connected and waiting
    started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    return {"wall_s": time.perf_counter() - started, "latency_s": latencies, "failures": failures, "images": images}


def run_mode(name: str, roots: list[Path], model: str, family: str, args, work: Path) -> dict:
    """One server with the mode's flags: warm-up, then the measured load; the server is stopped after."""
    import httpx

    spec = MODES[name]
    wait = args.batch_wait if spec["batch_wait"] is None else spec["batch_wait"]
    log = work / f"server-{name}.log"
    started = time.perf_counter()
    process, url, command = start_server(roots, model, wait, args.batch_max, spec["compile"], args, log)
    try:
        startup = time.perf_counter() - started
        warm_started = time.perf_counter()
        with httpx.Client(base_url=url, timeout=7200) as http:  # switching: each mix once, other images, 1 step
            for c in [c for c in WARMUP if c < args.clients][: args.warmup]:
                response = http.post("/sdapi/v1/txt2img", json=payload(family, c, 0, args, steps=1, image_seed=500_000))
                if response.status_code != 200:
                    raise RuntimeError(f"warm-up request {c} failed: {response.status_code} {response.text[:1000]}")
            warm = time.perf_counter() - warm_started
            before = compile_stats(http.get("/v1/cache").json())
            logged = len(compile_lines(log))
            since = time.time()
        print(f"bench-batching: {name}: started in {startup:.1f} s, warm-up {warm:.1f} s; the load ...",
              file=sys.stderr, flush=True)  # fmt: skip
        payloads = {(c, i): payload(family, c, i, args) for c in range(args.clients) for i in range(args.requests)}
        measured = asyncio.run(load(url, payloads, args.clients, args.requests))
        with httpx.Client(base_url=url, timeout=60) as http:
            after = compile_stats(http.get("/v1/cache").json())
            compile_log = {"warmup": compile_lines(log)[:logged], "load": compile_lines(log)[logged:]}
            events = http.get("/v1/events", params={"since": since}).json()
        times = psutil.Process(process.pid).cpu_times()  # the server's CPU, to tell other work's share
        server_cpu = times.user + times.system
    finally:
        stop_server(process)
    batches = [{"size": e["size"], "rows": e["rows"]} for e in events if e["event"] == "batch"]
    fallbacks = [e for e in events if e["event"] == "batch_fallback"]
    return {"mode": name, "command": command[1:], "batch_wait": wait, "compile": spec["compile"], "startup_s": startup,
            "warmup_s": warm, "compile_before": before, "compile_after": after, "compile_log": compile_log, "batches": batches,
            "batch_fallbacks": len(fallbacks), "server_cpu_s": server_cpu, **measured}  # fmt: skip


# ------------------------------------------------------------------------------------------------ reporting


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)  # linear interpolation between the nearest ranks
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(results: dict[str, dict], first: str) -> dict:
    import numpy as np

    s: dict = {}
    for name, r in results.items():
        latencies = list(r["latency_s"].values())
        images = len(r["images"])
        row = {"images": images, "wall_s": r["wall_s"], "images_per_s": images / r["wall_s"] if r["wall_s"] else 0.0,
               "p50_s": quantile(latencies, 0.5) if latencies else None,
               "p95_s": quantile(latencies, 0.95) if latencies else None, "max_s": max(latencies, default=None),
               "failures": len(r["failures"]), "batch_sizes": [b["size"] for b in r["batches"]],
               "compile_before": r["compile_before"], "compile_after": r["compile_after"]}  # fmt: skip
        common = [k for k in r["images"] if k in results[first]["images"]]
        row["max_pixel_diff_vs_first"] = max((int(np.abs(r["images"][k] - results[first]["images"][k]).max())
                                              for k in common), default=None) if name != first else 0  # fmt: skip
        s[name] = row
    base = s[first]
    for row in s.values():
        row["throughput_ratio"] = row["images_per_s"] / base["images_per_s"] if base["images_per_s"] else None
        row["p50_ratio"] = row["p50_s"] / base["p50_s"] if base["p50_s"] and row["p50_s"] else None
        row["p95_ratio"] = row["p95_s"] / base["p95_s"] if base["p95_s"] and row["p95_s"] else None
    return s


def render(report: dict) -> str:
    m, a, s = report["machine"], report["args"], report["summary"]
    device = a["device"] or ("cuda" if m.get("gpu") else "cpu")
    lines = [f"# Request batching: {a['clients']} concurrent clients on one {report['model_label']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; Python {m['python']}, torch {m['torch']}; "
             f"server device {device}, dtype {a['dtype'] or ('float16' if device.startswith('cuda') else 'float32')}. "
             f"Load average (1 min) {report['load_average']['before'][0]:.2f} before, "
             f"{report['load_average']['after'][0]:.2f} after; other processes used "
             f"{report['others_cpu_share']:.2f} cores on average (the machine is shared: noisy).", "",
             f"Command: `{report['command']}`; measured {report['measured_at']}, {report['wall_s'] / 60:.1f} min in "
             f"all. Each mode: a fresh `imprompt serve` on 127.0.0.1, a switching warm-up, then {a['clients']} "
             f"clients x {a['requests']} request(s) at {a['size']} px, {a['steps']} steps, Euler a, CFG 7, each "
             "client its own mix of Base / Plus IP-Adapter units (or none) and each request its own reference "
             "image (see tools/bench_batching.py).", "",
             "| mode | images/s | vs first | p50 latency | p95 | max | batches run (requests each) | "
             "max pixel diff vs first | failures |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, row in s.items():
        label = LABELS[name].format(wait=float(a["batch_wait"]), max=a["batch_max"])
        sizes = ", ".join(str(x) for x in row["batch_sizes"]) or "none (one at a time)"
        lines.append(f"| {label} | {row['images_per_s']:.3f} | {row['throughput_ratio']:.2f}x | {row['p50_s']:.1f} s | "
                     f"{row['p95_s']:.1f} s | {row['max_s']:.1f} s | {sizes} | {row['max_pixel_diff_vs_first']} | "
                     f"{row['failures']} |")  # fmt: skip
    lines.append("")
    if "on" in s and "off" in s:
        on, off = s["on"], s["off"]
        lines += [f"Batching on vs off: **{on['images_per_s'] / off['images_per_s']:.2f}x** the images per second, "
                  f"p50 latency {on['p50_s'] / off['p50_s']:.2f}x, p95 {on['p95_s'] / off['p95_s']:.2f}x "
                  "(below 1: shorter).", ""]  # fmt: skip
    for name in ("off+compile", "on+compile"):
        if name in s:
            row = s[name]
            logged = report["results"][name].get("compile_log", {})
            lines += [f"`{name}`: compile counters (`GET /v1/cache` \"compiled\") after the warm-up "
                      f"{json.dumps(row['compile_before'])}, after the load {json.dumps(row['compile_after'])}"
                      + (f"; the server logged {len(logged['warmup'])} compile line(s) in the warm-up and "
                         f"{len(logged['load'])} in the load (new graphs, calls run eager)" if logged else "")
                      + ".", ""]  # fmt: skip
    if "unet_tflops_per_step" in report:
        flops = ", ".join(f"{k} {v:.2f}" for k, v in report["unet_tflops_per_step"].items())
        lines += [f"UNet TFLOPs per guided step (2 rows, counted on the meta device): {flops}.", ""]
    for note in report["notes"]:
        lines += [note, ""]
    return "\n".join(lines)


def strip_images(results: dict) -> dict:
    return {name: {k: v for k, v in r.items() if k != "images"} | {"images": sorted(f"{c}/{i}" for c, i in r["images"])}
            for name, r in results.items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_batching", description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=tuple(ADAPTERS), default="sd15")
    parser.add_argument("--size", type=int, help="width = height in pixels (default: 512 for sd15, 1024 for sdxl)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2, help="per client, one after another")
    parser.add_argument("--warmup", type=int, default=len(WARMUP),
                        help="warm-up requests (1 step, one after another: Base + Plus, then the other mixes)")
    parser.add_argument("--batch-wait", type=float, default=2.0, help="seconds, for the batching-on modes")
    parser.add_argument("--batch-max", type=int, default=8)
    parser.add_argument("--modes", default="off,on", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--compile", action="store_true", help="add the on+compile mode (the server's --compile)")
    parser.add_argument("--models", type=Path, action="append", help="a models folder (default: real-size files)")
    parser.add_argument("--model", help="the model's name in --models (default: the family's)")
    parser.add_argument("--label", help="what the model is, for the report's title")
    parser.add_argument("--device", help="the server's --device (default: its own: cuda if available)")
    parser.add_argument("--dtype", help="the server's --dtype (default: its own)")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--note", action="append", default=[], help="a paragraph for the report (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("docs/batching-benchmark.md"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still stops its server (finally)
    args.size = args.size or (512 if args.family == "sd15" else 1024)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; known: {', '.join(MODES)}")
    if args.compile and "on+compile" not in modes:
        modes.append("on+compile")
    notes = list(args.note)
    if any(MODES[m]["compile"] for m in modes) and "--compile" not in serve_help():
        skipped = [m for m in modes if MODES[m]["compile"]]
        notes.append(f"Skipped {', '.join(skipped)}: this `imprompt serve` has no `--compile` flag yet; the mode "
                     "runs once it does (same clients, the server started with `--compile`).")  # fmt: skip
        print(f"bench-batching: {notes[-1]}", file=sys.stderr, flush=True)
        modes = [m for m in modes if not MODES[m]["compile"]]
    if args.models:
        roots, model = args.models, args.model or f"tiny-{args.family}"
        label = args.label or f"{model} (from {', '.join(str(r) for r in roots)})"
    else:
        root, model = build_real(args.cache, args.family)
        roots = [root]
        model = args.model or model
        label = args.label or {"sd15": "SD 1.5 (real size, random weights)",
                               "sdxl": "SDXL (real size, random weights)"}[args.family]  # fmt: skip
    work = args.cache / "batching" / "logs"
    work.mkdir(parents=True, exist_ok=True)
    started, before, busy, own = time.perf_counter(), os.getloadavg(), busy_seconds(), time.process_time()
    results = {}
    for name in modes:
        print(f"bench-batching: mode {name} ...", file=sys.stderr, flush=True)
        results[name] = run_mode(name, roots, model, args.family, args, work)
        partial = args.out.with_suffix(".partial.json")  # what is done so far, should a later mode not finish
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(strip_images(results), indent=2, default=str))
    wall = time.perf_counter() - started
    ours = time.process_time() - own + sum(r["server_cpu_s"] for r in results.values())
    others = max(0.0, busy_seconds() - busy - ours) / wall  # core-seconds per second that other work used
    given = argv if argv is not None else sys.argv[1:]
    info = machine()
    report = {"machine": info, "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m tools.bench_batching" + (" " + " ".join(given) if given else ""),
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"models": [str(r) for r in roots]},
              "model": model, "model_label": label, "modes": modes, "wall_s": wall,
              "load_average": {"before": before, "after": os.getloadavg()},
              "others_cpu_share": others, "notes": notes}  # fmt: skip
    report["summary"] = summarise(results, modes[0])
    if not args.models:  # real configs: the step's arithmetic here, at the issue's settings, and SDXL at 1024
        report["unet_tflops_per_step"] = {f"{args.family}@{args.size}": unet_tflops(args.family, args.size),
                                          "sd15@512": unet_tflops("sd15", 512), "sdxl@1024": unet_tflops("sdxl", 1024)}  # fmt: skip
    report["results"] = strip_images(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    text = render(report)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
