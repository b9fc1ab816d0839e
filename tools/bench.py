"""`make bench` (`python -m tools.bench`): what switching, reuse and IP-Adapter steps cost, measured side by side in one run.

Real-size random-weight models are built once, in the real formats, into a cache folder: SD 1.5 (the shipped
configs), OpenCLIP ViT-H-14 and ViT-bigG-14 vision towers, h94-format Base, Plus and Base ViT-G adapters, all
as fp16 files as distributed. Speed does not depend on the weights' values, so the arithmetic is the real one.
Each measurement runs in a process of its own, so its peak RSS is its own; the parent collects the numbers,
computes the ratios and writes `docs/benchmarks.md` and a JSON file of the raw numbers.

Compared, for the same sequences:
- imprompt (encoders and built adapters cached, embeddings cached, adapters swapped by processor shells);
- diffusers' correct path: `unload_ip_adapter()` then `load_ip_adapter(..., image_encoder_folder=...)`;
- the SD.Next approach: keep the encoder unless the next adapter needs another one, then reload it from disk;
- the expert script, the strongest baseline a diffusers expert writes by hand (`ExpertScript`): every adapter
  loaded once in one `load_ip_adapter` call, both encoders kept in memory, each unit's embeddings computed with
  its own encoder and passed as `ip_adapter_image_embeds`, scales set per request (0 for the unused adapters).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

H94 = "IP-Adapter"
MODELS = {"real": "sd15", "tiny": "tiny-sd15"}  # the pipeline's name in the bench pack
# adapter -> (file, encoder folder), in the article's alternation
CYCLE = {
    "Base": ("ip-adapter_sd15.safetensors", "models/image_encoder"),
    "Base ViT-G": ("ip-adapter_sd15_vit-G.safetensors", "sdxl_models/image_encoder"),
    "Plus": ("ip-adapter-plus_sd15.safetensors", "models/image_encoder"),
}
PHASES = (
    "switch_imprompt", "switch_expert", "switch_diffusers", "switch_sdnext", "embeddings", "step_overhead",
    "workload_imprompt", "workload_expert", "workload_diffusers", "workload_sdnext", "workload_small_budget",
    "workload_imprompt_bf16", "encoder_memory",
)  # fmt: skip
# imprompt and the expert script, the strongest baseline, are compared over --rounds alternated trials (A B, B A,
# ...), each in a fresh process, so that slow drifts of the machine and the page cache's state hit both alike.
ALTERNATED = (("switch_imprompt", "switch_expert"), ("workload_imprompt", "workload_expert"))


# ------------------------------------------------------------------------------------------- the model pack


def build_models(root: Path, size: str, adapters: bool = True) -> Path:
    """Real-size (or tiny, for the smoke test) models for the benchmark, built once. `adapters=False` builds the
    SD 1.5 pipeline alone (what `bench_models` needs; the encoders are most of the build's time)."""
    root = Path(root) / size
    if (root / "done.json").is_file():
        return root
    if size == "tiny":
        from imprompt.demo.pack import build_demo_pack

        build_demo_pack(root)
    else:
        if not (root / "pipeline.done").is_file():
            _build_real_pipeline(root)
            (root / "pipeline.done").write_text("")
        if not adapters:
            return root
        _build_real_adapters(root)
    (root / "done.json").write_text(json.dumps({"size": size}))
    return root


def _build_real_pipeline(root: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from imprompt.demo.tiny_models import write_tokenizer
    from imprompt.models.single_file import CONFIGS

    configs = CONFIGS / "sd15"
    folder = root / "diffusers" / MODELS["real"]
    write_tokenizer(folder / "tokenizer", clip_vocabulary=True)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text()))
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text())),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_json_file(configs / "text_encoder" / "config.json")),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=PNDMScheduler.from_config(json.loads((configs / "scheduler" / "scheduler_config.json").read_text())),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.to(torch.float16).save_pretrained(folder, safe_serialization=True)  # fp16 files, as distributed


def _build_real_adapters(root: Path) -> None:
    from diffusers import UNet2DConditionModel

    from imprompt.demo.tiny_models import build_clip_vision, cross_attention_widths, write_adapter
    from imprompt.models import catalog
    from imprompt.models.single_file import CONFIGS

    with torch.device("meta"):  # the widths only
        unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / "sd15" / "unet" / "config.json").read_text()))
    widths = cross_attention_widths(unet)
    for family, sub in ((catalog.VIT_H, "models"), (catalog.VIT_BIGG, "sdxl_models")):
        build_clip_vision(
            root / H94 / sub / "image_encoder", hidden_size=family.hidden_size, projection_dim=family.projection_dim,
            num_layers=family.num_layers, heads=family.num_attention_heads, seed=1,
            intermediate_size=family.intermediate_size,
        )  # fmt: skip
    models = root / H94 / "models"
    write_adapter(models / CYCLE["Base"][0], "base", 1024, widths, 768, seed=10)
    write_adapter(models / CYCLE["Base ViT-G"][0], "base", 1280, widths, 768, seed=11)
    write_adapter(models / CYCLE["Plus"][0], "plus", 1280, widths, 768, seed=12, resampler_dim=768)


# --------------------------------------------------------------------------------------------------- phases


def reference_image(size: int = 512):
    from imprompt.demo.tiny_models import draw_reference

    return draw_reference("circle", (220, 40, 40), (30, 60, 200), size=size)


def request(adapter: str | None, size: int, steps: int, image, model: str) -> dict:
    units = [{"adapter": adapter, "images": [image], "scale": 0.6}] if adapter else []
    return {"model": model, "prompt": "a shape", "seed": 1, "steps": steps, "width": size, "height": size,
            "cfg_scale": 7.0, "ip_adapters": units}  # fmt: skip


def diffusers_pipeline(root: Path, model: str, dtype=torch.float32, device: str = "cpu"):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        root / "diffusers" / model, dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_like(pipe, root: Path, adapter: str, reload_encoder: bool) -> None:
    """diffusers' correct path (reload_encoder=True always) or SD.Next's (only when the encoder changes)."""
    weight, encoder = CYCLE[adapter]
    if reload_encoder:
        pipe.unload_ip_adapter()  # drops the image encoder, so load_ip_adapter loads the right one
    pipe.load_ip_adapter(str(root / H94), subfolder="models", weight_name=weight, image_encoder_folder=encoder)
    pipe.set_ip_adapter_scale(0.6)


class ExpertScript:
    """What a diffusers expert writes by hand for several adapters: everything loaded once, nothing reloaded.
    It cannot tell a wrong pairing before the matmul fails, does not cache embeddings (each request encodes its
    images again) and never frees an encoder or adapter it loaded."""

    def __init__(self, root: Path, args):
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.pipe = diffusers_pipeline(root, args.model, _dtype(args.dtype), args.device)
        started = time.perf_counter()
        self.names = list(CYCLE)
        self.pipe.load_ip_adapter(str(root / H94), subfolder=["models"] * len(self.names),
                                  weight_name=[CYCLE[n][0] for n in self.names], image_encoder_folder=None)  # fmt: skip
        self.encoders = {
            folder: CLIPVisionModelWithProjection.from_pretrained(root / H94 / folder, dtype=_dtype(args.dtype))
            .to(args.device).eval()
            for folder in {encoder for _, encoder in CYCLE.values()}
        }  # fmt: skip
        self.processor = CLIPImageProcessor(size=224, crop_size=224)
        self.device = args.device
        self.setup_s = time.perf_counter() - started  # loading every adapter and encoder, before any request

    @torch.no_grad()
    def embeddings(self, adapter: str, image) -> list[torch.Tensor]:
        """ip_adapter_image_embeds for a request using `adapter` alone: its own encoder's output for it (Plus:
        penultimate hidden states, with an all-zero image's as negative), zeros of the right shape for the others."""
        out = []
        for name in self.names:
            encoder = self.encoders[CYCLE[name][1]]
            hidden = name == "Plus"
            if name == adapter:
                pixels = self.processor(images=image, return_tensors="pt").pixel_values.to(self.device, encoder.dtype)
                negative = torch.zeros_like(pixels)
                both = torch.cat([negative, pixels])
                if hidden:
                    embeds = encoder(both, output_hidden_states=True).hidden_states[-2]
                else:
                    embeds = torch.cat([torch.zeros_like(encoder(pixels).image_embeds), encoder(pixels).image_embeds])
            else:  # scale 0: never used, but diffusers wants one tensor per loaded adapter
                width = encoder.config.hidden_size if hidden else encoder.config.projection_dim
                embeds = torch.zeros(2, 257, width) if hidden else torch.zeros(2, width)
            out.append(embeds.unsqueeze(1).to(self.device, self.pipe.unet.dtype))
        return out

    def prepare(self, adapter: str, image) -> list[torch.Tensor]:
        """A request's switch: scales for this request, then its embeddings."""
        self.pipe.set_ip_adapter_scale([0.6 if name == adapter else 0.0 for name in self.names])
        return self.embeddings(adapter, image)


def phase_switch_expert(root, args) -> dict:
    """The expert script's switch (scales set, the request's embeddings computed with the right encoder)."""
    expert = ExpertScript(root, args)
    image = reference_image()
    for adapter in CYCLE:  # warm
        expert.prepare(adapter, image)
    times = []
    for _ in range(args.trials):
        for adapter in CYCLE:
            started = time.perf_counter()
            expert.prepare(adapter, image)
            times.append(time.perf_counter() - started)
    return {"switch_s": times}


def phase_workload_expert(root, args) -> dict:
    """The expert's whole sequence counts its setup (every adapter and encoder loaded up front), as imprompt's
    sequence counts the loads it does on first use; both start with the pipeline loaded."""
    expert = ExpertScript(root, args)
    image = reference_image()
    sequence, _ = _workload_requests(image, args)
    expert.pipe("a shape", num_inference_steps=1, width=64, height=64,
                ip_adapter_image_embeds=expert.prepare(sequence[0], image))  # warm, as the others  # fmt: skip
    started, seconds = time.perf_counter(), []
    for adapter in sequence:
        began = time.perf_counter()
        embeds = expert.prepare(adapter, image)
        expert.pipe("a shape", num_inference_steps=args.workload_steps, guidance_scale=7.0, width=args.workload_size,
                    height=args.workload_size, generator=torch.Generator().manual_seed(1),
                    ip_adapter_image_embeds=embeds)  # fmt: skip
        seconds.append(time.perf_counter() - began)
    return {"total_s": expert.setup_s + time.perf_counter() - started, "setup_s": expert.setup_s, "requests": sequence,
            "request_s": seconds}  # fmt: skip


def phase_switch_imprompt(root, args) -> dict:
    """Engine overhead of a request whose adapter differs from the last one, everything cached: plan, load,
    encode and attach (the denoising is not part of a switch)."""
    from imprompt.engine import Engine

    engine = Engine(root, device=args.device, dtype=args.dtype)
    image = reference_image()
    for adapter in CYCLE:  # warm: build adapters, load encoders, cache embeddings
        engine.generate(request(adapter, 64, 1, image, args.model))
    switch, attach = [], []
    for _ in range(args.trials):
        for adapter in CYCLE:
            t = engine.generate(request(adapter, 64, 1, image, args.model)).info["timings"]
            switch.append(t["plan"] + t["load"] + t["prepare"] + t["apply"] - t["by_kind"]["prompt"]["apply"])
            attach.append(t["by_kind"]["image_prompts"]["apply"])
    return {"switch_s": switch, "attach_s": attach}


def _switch_baseline(root, args, reload_always: bool) -> dict:
    pipe = diffusers_pipeline(root, args.model, _dtype(args.dtype), args.device)
    times, encoder = [], None
    for _ in range(args.trials):
        for adapter in CYCLE:
            needed = CYCLE[adapter][1]
            started = time.perf_counter()
            load_like(pipe, root, adapter, reload_encoder=reload_always or needed != encoder)
            times.append(time.perf_counter() - started)
            encoder = needed
    return {"switch_s": times}


def phase_switch_diffusers(root, args) -> dict:
    return _switch_baseline(root, args, reload_always=True)


def phase_switch_sdnext(root, args) -> dict:
    return _switch_baseline(root, args, reload_always=False)


def phase_embeddings(root, args) -> dict:
    """An embedding from the cache vs encoded, per encoder and encoder dtype."""
    from imprompt.engine import Engine

    image = reference_image()
    out = {}
    for dtype in _dtypes(args):
        engine = Engine(root, device=args.device, dtype="float32", encoder_dtype=dtype)
        for adapter in ("Base", "Base ViT-G"):
            entry = engine.store.encoder(f"{H94}/{CYCLE[adapter][1]}")
            embed = lambda: engine.state.embedder.embed(entry, "image_embeds", [image], adapter, "bench", [])  # noqa: E731
            embed()  # loads the encoder
            fresh, hit = [], []
            for _ in range(args.trials):
                engine.state.embedder.embeddings.clear()
                started = time.perf_counter()
                embed()
                fresh.append(time.perf_counter() - started)
                started = time.perf_counter()
                embed()
                hit.append(time.perf_counter() - started)
            out[f"{adapter}/{dtype}"] = {"encode_s": fresh, "cache_hit_s": hit}
    return out


def phase_step_overhead(root, args) -> dict:
    """Seconds per denoising step (batch 2 with CFG), no unit vs one IP-Adapter unit, fp32 and bf16. The two
    configurations alternate round by round (ABBA...), so slow drifts of the machine hit both alike."""
    from imprompt.engine import Engine

    image = reference_image()
    out = {}
    for dtype in _dtypes(args):
        engine = Engine(root, device=args.device, dtype=dtype)
        configs = [("none", None), ("one unit", "Base")]
        for _, adapter in configs:  # warm both
            engine.generate(request(adapter, args.step_size, 1, image, args.model))
        for round_ in range(args.step_rounds):
            for label, adapter in configs if round_ % 2 == 0 else configs[::-1]:
                marks = []
                engine.generate(request(adapter, args.step_size, args.steps + 1, image, args.model),
                                on_step=lambda step, total: marks.append(time.perf_counter()))  # fmt: skip
                out.setdefault(f"{dtype}/{label}", []).extend(b - a for a, b in zip(marks, marks[1:]))
    return out


def _workload_requests(image, args):
    names = list(CYCLE)
    return [names[i % len(names)] for i in range(args.workload_requests)], image


def phase_workload_imprompt(root, args, budget=None) -> dict:
    from imprompt.engine import Engine

    engine = Engine(root, device=args.device, dtype=args.dtype, cache_budget=budget)
    image = reference_image()
    engine.generate(request(None, 64, 1, image, args.model))  # the pipeline is loaded before the clock starts, as for others
    sequence, _ = _workload_requests(image, args)
    started, events, seconds = time.perf_counter(), [], []
    for adapter in sequence:
        began = time.perf_counter()
        result = engine.generate(request(adapter, args.workload_size, args.workload_steps, image, args.model))
        seconds.append(time.perf_counter() - began)
        events += [e["event"] for e in result.info["events"]]
    return {"total_s": time.perf_counter() - started, "requests": sequence, "request_s": seconds,
            "evictions": events.count("encoder_evicted"), "encoder_loads": events.count("encoder_loaded")}  # fmt: skip


def phase_workload_small_budget(root, args) -> dict:
    return phase_workload_imprompt(root, args, budget=1)


def phase_workload_imprompt_bf16(root, args) -> dict:
    """Not equal compute: what a user on a CPU with bf16 instructions gets by asking for `--dtype bfloat16`."""
    args.dtype = _dtypes(args)[1]
    return phase_workload_imprompt(root, args)


def _workload_baseline(root, args, reload_always: bool) -> dict:
    pipe = diffusers_pipeline(root, args.model, _dtype(args.dtype), args.device)
    image = reference_image()
    sequence, _ = _workload_requests(image, args)
    started, encoder, seconds = time.perf_counter(), None, []
    for adapter in sequence:
        began = time.perf_counter()
        needed = CYCLE[adapter][1]
        load_like(pipe, root, adapter, reload_encoder=reload_always or needed != encoder)
        encoder = needed
        pipe("a shape", num_inference_steps=args.workload_steps, guidance_scale=7.0, width=args.workload_size,
             height=args.workload_size, generator=torch.Generator().manual_seed(1), ip_adapter_image=image)  # fmt: skip
        seconds.append(time.perf_counter() - began)
    return {"total_s": time.perf_counter() - started, "requests": sequence, "request_s": seconds}


def phase_workload_diffusers(root, args) -> dict:
    return _workload_baseline(root, args, reload_always=True)


def phase_workload_sdnext(root, args) -> dict:
    return _workload_baseline(root, args, reload_always=False)


def phase_encoder_memory(root, args) -> dict:
    """Load the fp16 ViT-bigG file for bf16 compute with imprompt's loader: the peak of the process's anonymous
    memory (its own allocations; an fp32 copy would be twice the bf16 weights) next to the weights' size, sampled
    during the load. RSS also counts the pages of the memory-mapped file being read, which the kernel can drop, so
    it is reported beside but not judged. Then the same output with fp32 and low-precision encoders (bf16 on CPUs,
    fp16 on GPUs), pixel difference."""
    import threading

    import numpy as np

    from imprompt.engine import Engine
    from imprompt.loading.encoders import load_encoder
    from imprompt.models.probe import probe

    spec = probe(root / H94 / "sdxl_models" / "image_encoder")
    before, peaks, done = _memory(), {"anon": 0, "file": 0}, threading.Event()

    def sample():
        while not done.is_set():
            now = _memory()
            peaks["anon"], peaks["file"] = max(peaks["anon"], now["anon"]), max(peaks["file"], now["file"])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    rss_before = _peak_rss()
    started = time.perf_counter()
    model = load_encoder(spec, torch.device("cpu"), torch.bfloat16)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = _peak_rss()
    del model
    image = reference_image()
    pixels = {}
    for dtype in _dtypes(args):
        engine = Engine(root, device=args.device, dtype="float32", encoder_dtype=dtype)
        result = engine.generate(request("Base ViT-G", args.workload_size, args.workload_steps, image, args.model))
        pixels[dtype] = np.asarray(result.images[0]).astype(np.int16)
    diff = np.abs(pixels["float32"] - pixels[_dtypes(args)[1]])
    return {"bf16_load_s": seconds, "bf16_weights_bytes": weights, "rss_before_bytes": rss_before,
            "rss_peak_after_load_bytes": peak, "anon_before_bytes": before["anon"], "anon_peak_bytes": peaks["anon"],
            "file_mapped_before_bytes": before["file"], "file_mapped_peak_bytes": peaks["file"], "pixel_diff_max": int(diff.max()),
            "pixel_diff_mean": float(diff.mean()), "low_precision": _dtypes(args)[1]}  # fmt: skip


# ------------------------------------------------------------------------------------------------ running


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _dtypes(args) -> tuple[str, str]:
    """fp32 and the low precision worth offering on the device: bf16 on CPUs, fp16 on GPUs."""
    return ("float32", "float16" if args.device.startswith("cuda") else "bfloat16")


def _memory() -> dict[str, int]:
    """The process's resident anonymous memory (its own allocations) and file-backed memory (mapped files' pages,
    which the kernel can drop) now. psutil's `shared` is Linux's RssFile + RssShmem."""
    info = psutil.Process().memory_info()
    shared = getattr(info, "shared", 0)
    return {"anon": info.rss - shared, "file": shared}


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_phase(name: str, root: Path, args) -> dict:
    started = time.perf_counter()
    result = globals()[f"phase_{name}"](root, args)
    return {"phase": name, "result": result, "wall_s": time.perf_counter() - started, "peak_rss_bytes": _peak_rss(),
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}


def schedule(phases: list[str], rounds: int) -> list[str]:
    """The order the phases' processes run in: each alternated pair whose two phases are both asked for runs
    `rounds` times, in the order A B, B A, A B, ...; every other phase runs once."""
    order, done = [], set()
    for name in phases:
        pair = next((p for p in ALTERNATED if name in p and all(n in phases for n in p)), None)
        if pair is None:
            order.append(name)
        elif name not in done:
            for round_ in range(rounds):
                order += list(pair if round_ % 2 == 0 else pair[::-1])
            done.update(pair)
    return order


def runs(entry: dict) -> list[dict]:
    """A phase's runs (one per round); results written before rounds existed hold a single run."""
    return entry["runs"] if "runs" in entry else [entry]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("real", "tiny"), default="real", help="real SD 1.5 sizes, or tiny (smoke)")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"), help="where the models are built once")
    parser.add_argument("--out", type=Path, help="the report (default docs/benchmarks.md; with --quick, "
                        "<cache>/benchmarks-quick.md); the raw numbers go beside it as .json")  # fmt: skip
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternated trials (fresh processes) of imprompt and the expert script")
    parser.add_argument("--quick", action="store_true",
                        help="each phase once at its smallest (1 trial, 1 round, 1 step, 3 requests): a fast check")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration (step overhead)")
    parser.add_argument("--step-size", type=int, default=512)
    parser.add_argument("--step-rounds", type=int, default=2, help="rounds of (no unit, one unit), alternating order")
    parser.add_argument("--workload-size", type=int, default=256)
    parser.add_argument("--workload-steps", type=int, default=4)
    parser.add_argument("--workload-requests", type=int, default=6)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--update", action="store_true",
                        help="re-measure only --phases; keep the other results of the last run (the report says which)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase in this process
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.quick:
        args.trials, args.rounds, args.steps, args.step_rounds, args.workload_requests = 1, 1, 1, 1, 3
    if args.out is None:
        args.out = args.cache / "benchmarks-quick.md" if args.quick else Path("docs/benchmarks.md")
    args.model = MODELS[args.size]
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    root = build_models(args.cache, args.size)
    if args.phase:
        from imprompt.cli import quiet_libraries

        quiet_libraries()
        torch.manual_seed(0)
        args.json_out.write_text(json.dumps(run_phase(args.phase, root, args)))
        return 0
    raw = args.out.with_suffix(".json")
    previous = json.loads(raw.read_text()) if raw.is_file() else None
    results = dict(previous["results"]) if args.update and previous else {}  # --update keeps the other phases
    phases = args.phases.split(",")
    fresh: dict[str, list] = {}
    for count, name in enumerate(schedule(phases, args.rounds)):
        out = args.cache / f"{args.size}-{name}-{count}.json"
        command = [sys.executable, "-m", "tools.bench", "--phase", name, "--json-out", str(out)]
        command += [a for a in _without_option(argv if argv is not None else sys.argv[1:], "--phases") if a != "--update"]
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
        fresh.setdefault(name, []).append(json.loads(out.read_text()))
    results.update({name: {"runs": measured} for name, measured in fresh.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)  # the raw numbers first: nothing below can lose them
    raw.write_text(json.dumps({"machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "args": vars(args) | {"cache": str(args.cache), "out": str(args.out), "json_out": None},
                               "results": results}, indent=2))  # fmt: skip
    report = summarise(results)
    report["this_run"] = sorted(fresh)
    if args.update:
        report["updated"] = {name: runs(results[name])[-1]["measured_at"] for name in phases}
    before = summarise(previous["results"]) if previous else None
    when = previous.get("measured_at") if previous else None
    text = render(report, args, before, when)
    args.out.write_text(text)
    print(text)
    return 0


def _without_option(argv: list[str], option: str) -> list[str]:
    """argv minus `option VALUE` / `option=VALUE` (each phase's process gets the other options as given)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    vector = next((isa for isa in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f" {isa}" in flags), "other")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(memory / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "vector_isa": vector,
            "bf16_instructions": any(f in flags for f in ("avx512_bf16", "amx_bf16")),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip


def _p(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _spread(values: list[float]) -> dict:
    return {"p50": statistics.median(values), "p90": _p(values, 0.9), "min": min(values), "max": max(values)}


def summarise(results: dict) -> dict:
    """The numbers the report shows, from the raw results (pooled over a phase's rounds, and per round: the noise)."""
    r = {name: [run["result"] for run in runs(entry)] for name, entry in results.items()}
    s = {"rss": {name: max(run["peak_rss_bytes"] for run in runs(entry)) for name, entry in results.items()},
         "machines": {name: runs(entry)[-1].get("machine") for name, entry in results.items()}}  # fmt: skip
    switch = [n for n in ("switch_imprompt", "switch_expert", "switch_diffusers", "switch_sdnext") if n in r]
    if switch:
        s["switch"] = {
            name: _spread([x for run in r[name] for x in run["switch_s"]])
            | {"rounds": [statistics.median(run["switch_s"]) for run in r[name]]}
            for name in switch
        }  # fmt: skip
        if "switch_imprompt" in r:
            s["attach_p50"] = statistics.median([x for run in r["switch_imprompt"] for x in run["attach_s"]])
    if "embeddings" in r:
        e = r["embeddings"][-1]
        s["embeddings"] = {k: {"encode_p50": statistics.median(v["encode_s"]), "hit_p50": statistics.median(v["cache_hit_s"])}
                           for k, v in e.items()}  # fmt: skip
    if "step_overhead" in r:
        s["steps"] = {k: {"p50": statistics.median(v), "min": min(v), "max": max(v)} for k, v in r["step_overhead"][-1].items()}
    workloads = ("workload_imprompt", "workload_expert", "workload_diffusers", "workload_sdnext", "workload_small_budget",
                 "workload_imprompt_bf16")  # fmt: skip
    s["workload"] = {}
    for name in (w for w in workloads if w in r):
        totals = [run["total_s"] for run in r[name]]
        # per request once every adapter was used (and loaded) once: the steady state of the sequence
        per_request = [x for run in r[name] for x in run.get("request_s", [])[len(CYCLE):]]
        s["workload"][name] = r[name][-1] | {
            "total_s": statistics.median(totals), "total_min": min(totals), "total_max": max(totals), "rounds": len(totals),
            "totals": totals,
            "request_p50": statistics.median(per_request) if per_request else None,
        }  # fmt: skip
    if "encoder_memory" in r:
        s["encoder_memory"] = r["encoder_memory"][-1]
    return s


def render(s: dict, args, before: dict | None = None, when: str | None = None, m: dict | None = None) -> str:
    """The report. `before` is the previous run's summary: its numbers stand beside the new ones. `m`: the
    machine the report is about (default: this one)."""
    m = m or machine()
    before = before or {}
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    ms = lambda x: f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"  # noqa: E731

    def prev(section: str, name: str, key: str, fmt=ms) -> str:
        value = before.get(section, {}).get(name, {}).get(key)
        return fmt(value) if value is not None else "–"

    # "AMD EPYC" names hosts with and without AVX-512: the instruction sets tell them apart (2-4x in fp32 here)
    keys = ("cpu", "cores", "memory_gib", "torch", "gpu", "bf16_instructions")
    here = {k: m.get(k) for k in keys}
    elsewhere = sorted(name for name, mm in s.get("machines", {}).items() if mm and {k: mm.get(k) for k in keys} != here)
    unrecorded = sorted(name for name, mm in s.get("machines", {}).items() if not mm)

    def other_host(name: str) -> str:
        """A mark for a row not measured on this report's machine: its numbers are not comparable with the rest."""
        return " (earlier run, another host)" if name in elsewhere or name in unrecorded else ""

    lines = [
        "# Benchmarks",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), {m['memory_gib']} GiB RAM, "
        f"widest vector instructions: {m.get('vector_isa', 'not recorded')}, "
        f"bf16 instructions: {'yes' if m['bf16_instructions'] else 'no'}; Python {m['python']}, torch {m['torch']}, "
        f"device: {args.device}{' (' + m['gpu'] + ')' if m['gpu'] and args.device.startswith('cuda') else ''}. "
        f"Each row's machine is recorded with its raw numbers (`{args.out.with_suffix('.json').name}`)"
        + (f"; measured on another machine: {', '.join(elsewhere)}" if elsewhere else "")
        + (f"; machine not recorded (an older run): {', '.join(unrecorded)}" if unrecorded else "")
        + ("." if elsewhere or unrecorded else "; all rows were measured on this one."),
        "",
        f"Command: `python -m tools.bench --size {args.size} --trials {args.trials} --rounds {args.rounds} "
        f"--dtype {args.dtype} --device {args.device}{' --quick' if args.quick else ''}` "
        f"(models: {args.size} SD 1.5 / ViT-H-14 / ViT-bigG-14 / h94 adapters, random weights, fp16 files). "
        "Each measurement ran in its own process; imprompt and the expert script alternated over "
        f"{args.rounds} round(s) (A B, B A, ...). The last column is the previous run of this harness "
        f"({when or 'none recorded'}), so that a regression shows.",
        "",
    ]  # fmt: skip
    if args.quick:
        lines += ["A `--quick` run: each phase once, one round, three requests. It checks that every path runs at real "
                  "size; its ratios are single samples, not noise-bounded comparisons.", ""]
    if s.get("updated"):
        lines += ["Re-measured after that run, alone (`--update --phases ...`): "
                  + ", ".join(f"{n} ({t})" for n, t in s["updated"].items()) + ".", ""]
    if "switch" in s:
        sw = s["switch"]
        lines += ["## Switching adapters (Base → Base ViT-G → Plus, repeated)", "",
                  "| system | p50 | p90 | min | max | p50 of each round | peak RSS | previous p50 |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        labels = {"switch_imprompt": "imprompt (plan + cached load/encode + attach)",
                  "switch_expert": "expert script (all loaded once; scales set, embeddings encoded per request)",
                  "switch_diffusers": "diffusers correct path (unload, load adapter + encoder)",
                  "switch_sdnext": "SD.Next approach (reload encoder only when it changes)"}  # fmt: skip
        for name, v in sw.items():
            lines.append(f"| {labels[name]}{other_host(name)} | {ms(v['p50'])} | {ms(v['p90'])} | {ms(v['min'])} | {ms(v['max'])} | "
                         f"{', '.join(ms(x) for x in v['rounds'])} | {gib(s['rss'][name])} | {prev('switch', name, 'p50')} |")  # fmt: skip
        imp = sw.get("switch_imprompt")
        if imp and "switch_diffusers" in sw and "switch_sdnext" in sw:
            lines += ["", f"imprompt's warm switch is **{sw['switch_diffusers']['p50'] / imp['p50']:.0f}×** "
                      f"faster than diffusers' correct path and {sw['switch_sdnext']['p50'] / imp['p50']:.0f}× "
                      f"faster than the SD.Next approach (p50 over p50), which reload from disk: that is what users of those "
                      f"tools wait for. The processor swap alone (attach) is {ms(s['attach_p50'])}."]  # fmt: skip
        if imp and "switch_expert" in sw:
            ex = sw["switch_expert"]
            lines += ["", f"Against the expert script, which keeps everything loaded too: "
                      f"{ex['p50'] / imp['p50']:.0f}× (p50 over p50; imprompt's slowest switch {ms(imp['max'])} against "
                      f"the expert's fastest {ms(ex['min'])}). The expert's switch is encoding the request's image "
                      "again, which imprompt takes from its embedding cache."]  # fmt: skip
        lines.append("")
    if "embeddings" in s:
        lines += ["## Embedding reuse (512 px reference image)", "",
                  "| encoder / dtype | encode | cache hit | ratio | previous encode |", "|---|---|---|---|---|"]  # fmt: skip
        for k, v in s["embeddings"].items():
            label = k.replace("Base ViT-G", "ViT-bigG-14").replace("Base", "ViT-H-14") + other_host("embeddings")
            lines.append(f"| {label} | {ms(v['encode_p50'])} | {ms(v['hit_p50'])} | {v['encode_p50'] / v['hit_p50']:.0f}× | "
                         f"{prev('embeddings', k, 'encode_p50')} |")  # fmt: skip
        e = s["embeddings"]
        low = _dtypes(args)[1]
        if "Base/float32" in e and f"Base/{low}" in e:
            lines += ["", f"{low} encoders: ViT-H-14 {e['Base/float32']['encode_p50'] / e[f'Base/{low}']['encode_p50']:.2f}×, "
                      f"ViT-bigG-14 {e['Base ViT-G/float32']['encode_p50'] / e[f'Base ViT-G/{low}']['encode_p50']:.2f}× the fp32 speed."]  # fmt: skip
        lines.append("")
    if "steps" in s:
        st = s["steps"]
        lines += [f"## Per-step overhead of one IP-Adapter unit ({args.step_size} px, batch 2 with CFG)", "",
                  "| dtype | no unit (p50, min–max) | one unit (p50, min–max) | overhead | previous overhead |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for dtype in _dtypes(args):
            a, b = st.get(f"{dtype}/none"), st.get(f"{dtype}/one unit")
            if a and b:
                pa, pb = before.get("steps", {}).get(f"{dtype}/none"), before.get("steps", {}).get(f"{dtype}/one unit")
                was = f"{100 * (pb['p50'] / pa['p50'] - 1):+.1f} %" if pa and pb else "–"
                lines.append(f"| {dtype}{other_host('step_overhead')} | {ms(a['p50'])} ({ms(a['min'])}–{ms(a['max'])}) | {ms(b['p50'])} "
                             f"({ms(b['min'])}–{ms(b['max'])}) | {100 * (b['p50'] / a['p50'] - 1):+.1f} % | {was} |")  # fmt: skip
        lines.append("")
    if s.get("workload"):
        w = s["workload"]
        lines += [f"## The article's workload ({args.workload_requests} requests alternating Base / Base ViT-G / Plus, "
                  f"{args.workload_size} px, {args.workload_steps} steps, same reference image)", "",
                  "| system | whole sequence (median) | min–max over rounds | per request, all loaded (p50) | vs imprompt | peak RSS | previous |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        labels = {"workload_imprompt": "imprompt", "workload_expert": "expert script (all loaded up front, counted; no caches)",
                  "workload_diffusers": "diffusers correct path",
                  "workload_sdnext": "SD.Next approach",
                  "workload_small_budget": "imprompt, encoder budget too small for two encoders",
                  "workload_imprompt_bf16": "imprompt, bf16 compute (not equal compute: other pixels)"}  # fmt: skip
        base = w.get("workload_imprompt", {}).get("total_s")
        for name, v in w.items():
            comparable = base and not other_host(name) and not other_host("workload_imprompt")
            ratio = f"{v['total_s'] / base:.2f}×" if comparable else "–"
            spread = f"{v['total_min']:.1f}–{v['total_max']:.1f} s ({v['rounds']})" if v["rounds"] > 1 else "1 round"
            per = ms(v["request_p50"]) if v.get("request_p50") else "–"
            was = prev("workload", name, "total_s", lambda x: f"{x:.1f} s")
            lines.append(f"| {labels[name]}{other_host(name)} | {v['total_s']:.1f} s | {spread} | {per} | {ratio} | "
                         f"{gib(s['rss'][name])} | {was} |")  # fmt: skip
        pair = ("workload_imprompt", "workload_expert")
        if all(name in w for name in pair) and all(name in s.get("this_run", pair) for name in pair):
            imp, ex = w["workload_imprompt"], w["workload_expert"]
            ratios = [e / i for i, e in zip(imp["totals"], ex["totals"])]  # round by round: A B, then B A, ...
            slower = sum(r < 1 for r in ratios)
            verdict = ("no slower than the expert script in any round" if not slower
                       else f"SLOWER than the expert script in {slower} of {len(ratios)} rounds")  # fmt: skip
            lines += ["", f"imprompt against the expert script, same run, {len(ratios)} alternated round(s): whole "
                      f"sequence {imp['total_s']:.1f} s against {ex['total_s']:.1f} s (median); expert / imprompt "
                      f"round by round {', '.join(f'{r:.2f}×' for r in ratios)}: imprompt {verdict}. What the expert "
                      "script cannot do: refuse a wrong pairing before the matmul fails, reuse an embedding (it "
                      "encodes every request's image again), load an adapter or encoder it was not started with, or "
                      "free one it no longer needs."]  # fmt: skip
        if "workload_small_budget" in w:
            sb = w["workload_small_budget"]
            lines += ["", f"With a 1-byte encoder budget, {sb['evictions']} evictions and {sb['encoder_loads']} encoder "
                      f"loads happened and every request succeeded."]  # fmt: skip
        lines.append("")
    if "encoder_memory" in s:
        em = s["encoder_memory"]
        anon = em["anon_peak_bytes"] - em["anon_before_bytes"]
        rss = em["rss_peak_after_load_bytes"] - em["rss_before_bytes"]
        verdict = ("so no fp32 copy (" + gib(2 * em["bf16_weights_bytes"]) + ") was ever held"
                   if anon < 1.5 * em["bf16_weights_bytes"] else "MORE than the bf16 weights: a larger copy was made")
        lines += [f"## Memory and bf16 encoders{other_host('encoder_memory')}", "",
                  f"Loading the fp16 ViT-bigG-14 file for bf16 compute took {em['bf16_load_s']:.2f} s; its bf16 weights "
                  f"are {gib(em['bf16_weights_bytes'])} and the process's own (anonymous) memory peaked "
                  f"{gib(anon)} above where it started, {verdict}. Its RSS grew by {gib(rss)}: that also counts the "
                  f"pages of the memory-mapped fp16 file being read ({gib(em['file_mapped_peak_bytes'] - em['file_mapped_before_bytes'])} "
                  "at the peak), which belong to the page cache and are dropped under pressure.",
                  "",
                  f"The same request with {em['low_precision']} instead of fp32 encoders: max pixel difference {em['pixel_diff_max']}/255, "
                  f"mean {em['pixel_diff_mean']:.2f}.", ""]  # fmt: skip
    lines += ["Peak RSS is the peak of the process that measured the row (pipeline included). Where the time goes, "
              "what limits each number and what was not reached: [performance.md](performance.md).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
