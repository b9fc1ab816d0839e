"""`make bench-image-prompts` (`python -m tools.bench_image_prompts`): what switching among FLUX Redux, XLabs and
PuLID units costs with everything resident vs reloaded per request, and EVA-CLIP's and SigLIP's embedding caches.

Real size, random weights (speed does not depend on their values), in the published layouts, built once into
`.bench-cache/image-prompts/`: FLUX.1 Redux (`redux_up` [12288, 1152], `redux_down` [4096, 12288], diffusers'
`ReduxImageEncoder` defaults) with SigLIP so400m (27 layers, 1152 wide, 384 px, a diffusers-style folder, fp16);
XLabs flux-ip-adapter v1 (its projection whole: 4 tokens of 4096; to_k/v_ip of 3072 per double block) with CLIP ViT-L/14 (24
layers, 1024 wide, 768 projection, ComfyUI's clip_vision/ single file, fp16); PuLID FLUX v0.9.1 (the IDFormer at its
real size: dim 1024, 32 queries, 10 layers, id width 2048; CAs of FLUX width 3072, inner 2048) with EVA02-CLIP-L-14-336
(24 blocks of 1024, SwiGLU 2730, 336 px, pickled whole as BAAI publishes it, fp32) and facexlib's BiSeNet face parser
(`facexlib/parsing_bisenet.pth` at its real widths, 53 MB, written by imprompt.demo.tiny_faces: PuLID parses the
aligned crop; the requests give the crop, so RetinaFace, which only finds faces in images, is not run or written).

The transformer: FLUX.1's widths where the adapters attach (24 heads x 128 = 3072, T5 width 4096) but shallow, as
tools/bench_transformers.py (the SD 3.5 / FLUX benchmark) avoids the 12 B transformer by not running it at all: here
it must run a step, so it has 1 double-stream and 1 single-stream block (about 0.5 B parameters; FLUX.1-dev has
19 + 38). PuLID's CAs follow the transformer's depth (one per 2 double and per 4 single blocks, as PuLID's `num_ca`
does, and imprompt refuses a file whose CA count does not fit the transformer): so its file has 2 CAs, not FLUX.1's
20 (the IDFormer is whole). Likewise imprompt refuses an XLabs file whose 19 blocks do not fit a 1-double-block
transformer, so its file has the 1 block's to_k/v_ip (FLUX.1-dev's has 19: 478 M parameters, here 37 M). Both
therefore load less than the real files on each reload: the reload times are lower bounds. The pipeline's text
encoders are tiny (T5 of width 4096, 2 layers; CLIP-L text 32).

1. `switch`: requests cycling Redux -> XLabs -> PuLID (1 step at 64 px so that the switch dominates; the same
   reference per unit). imprompt with everything resident (default budgets: the adapters, encoders and embeddings
   in its caches after the first request of each) vs the same engine with every cache budget 1 byte (adapter,
   encoder, embedding): each request loads its adapter and encoder from disk and encodes, as a diffusers script that
   loads per switch (`load_ip_adapter` + the encoder's `from_pretrained`) does; the base pipeline stays loaded in
   both. Both engines in one process, taking turns round by round (one order, then the other).
2. `cache`: a new reference vs the same one again, on the resident engine: PuLID (EVA02-CLIP of a new aligned face
   crop -> the ID tokens) and Redux (SigLIP of a new image), each the whole 1-step request.
Writes `docs/image-prompts-benchmark.json` (raw numbers, the machine) and `docs/image-prompts-benchmark.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from .bench import _peak_rss, machine
from .bench_controlnet import busy_seconds, picture

MODEL = "flux-shallow"
REDUX_FILE = "style_models/flux1-redux-dev.safetensors"
SIGLIP = "style_models/image_encoder"
XLABS_FILE = "xlabs/ipadapters/flux-ip-adapter.safetensors"
VIT_L_FILE = "clip_vision/clip_vision_l.safetensors"
PULID_FILE = "pulid/pulid_flux_v0.9.1.safetensors"
EVA_FILE = "clip/EVA02_CLIP_L_336_psz14_s6B.pt"
FLUX_WIDTHS = dict(heads=24, head_dim=128, t5_width=4096)  # FLUX.1's 3072 and T5-XXL's 4096
DEPTH = dict(double=1, single=1)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)  # fmt: skip
EVA02_L_336 = dict(width=1024, depth=24, mlp=2730, patch=14, grid=24, projection=768)
PULID_REAL = dict(eva_width=1024, eva_projection=768, dim=1024, queries=32, id_width=2048, inner=1024, depth=10,
                  ff=4096, hidden=1024, ca_inner=2048)  # fmt: skip
UNITS = ("FLUX Redux", "FLUX XLabs", "PuLID")


def build(cache: Path) -> Path:
    """The tree above, once; returns its root."""
    from imprompt.demo.tiny_dits import (
        build_flux_pipeline,
        build_siglip_vision,
        transformer_config,
        write_eva_clip,
        write_flux_adapter,
        write_pulid_flux,
        write_redux,
    )
    from imprompt.demo.tiny_models import build_clip_vision
    from imprompt.ipadapter.pulid import cas_needed

    root = cache / "image-prompts"
    parser = root / "facexlib" / "parsing_bisenet.pth"
    if not parser.is_file():  # facexlib's parser (real widths, random weights): added to caches built before it
        from imprompt.demo.tiny_faces import BISENET_REAL, write_tiny_bisenet

        write_tiny_bisenet(parser, seed=7, widths=BISENET_REAL)
    if (root / "done").is_file():
        return root
    print("bench-image-prompts: writing the real-size files (once) ...", file=sys.stderr, flush=True)
    build_flux_pipeline(root / "diffusers" / MODEL, **FLUX_WIDTHS, **DEPTH)
    write_redux(root / REDUX_FILE, FLUX_WIDTHS["t5_width"])
    build_siglip_vision(root / SIGLIP, dtype=torch.float16, **SIGLIP_SO400M)
    (root / XLABS_FILE).parent.mkdir(parents=True, exist_ok=True)  # as many blocks as the transformer has
    write_flux_adapter(root / XLABS_FILE, transformer_config(root / "diffusers" / MODEL), tokens=4)
    build_clip_vision(root / VIT_L_FILE, hidden_size=1024, projection_dim=768, num_layers=24, heads=16, seed=6,
                      single_file=True, intermediate_size=4096)  # fmt: skip
    write_eva_clip(root / EVA_FILE, **EVA02_L_336)
    write_pulid_flux(root / PULID_FILE, 3072, cas_needed(DEPTH["double"], DEPTH["single"]), **PULID_REAL)
    (root / "done").write_text("")
    return root


def face(seed: int):
    """A 512 aligned face crop and a raw 512-d embedding (PuLID's `aligned_face` + `face_embeddings`: no
    InsightFace pack is needed); a new seed is a new reference for the caches."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    embedding = (torch.randn(1, 512, generator=g) * 1.5).tolist()
    crop = np.asarray(picture(seed, 512, 512)).copy()
    crop[180:330, 180:330] = (200, 150, 120)
    return embedding, Image.fromarray(crop)


def unit(name: str, seed: int) -> dict:
    if name == "PuLID":
        embedding, crop = face(seed)
        return {"adapter": "PuLID", "face_embeddings": embedding, "aligned_face": crop}
    return {"adapter": name, "images": [picture(seed, 512, 512)]}


def request(unit_: dict) -> dict:
    return {"model": MODEL, "prompt": "a portrait", "seed": 1, "steps": 1, "width": 64, "height": 64,
            "cfg_scale": 3.5, "ip_adapters": [unit_]}  # fmt: skip


def timed(engine, unit_: dict) -> dict:
    started = time.perf_counter()
    result = engine.generate(request(unit_))
    wall = time.perf_counter() - started
    t = result.info["timings"]
    return {"wall_s": wall, "total_s": t["total"], "by_kind": t["by_kind"]}


def part_switch(root: Path, args) -> dict:
    from imprompt import Engine

    engines = {"resident": Engine([root]),
               "reload": Engine([root], cache_budget=1, adapter_cache_budget=1, embedding_cache_budget=1)}  # fmt: skip
    refs = {name: unit(name, seed) for seed, name in enumerate(UNITS, start=1)}  # the same reference per unit
    out: dict = {way: {"first": [], "switch": [], "unit": [], "round": []} for way in engines}
    for way, engine in engines.items():  # first use of each: loads (and, for the resident one, fills the caches)
        for name in UNITS:
            out[way]["first"].append({"unit": name, **timed(engine, refs[name])})
    for round_ in range(args.rounds):
        for way in list(engines) if round_ % 2 == 0 else list(engines)[::-1]:
            for name in UNITS:
                out[way]["switch"].append(timed(engines[way], refs[name]))
                out[way]["unit"].append(name)
                out[way]["round"].append(round_)
            print(f"bench-image-prompts: round {round_} {way} done", file=sys.stderr, flush=True)
    return out


def part_cache(root: Path, args) -> dict:
    from imprompt import Engine

    engine = Engine([root])
    seeds = iter(range(100, 10_000))
    out: dict = {}
    for name, encoder in (("PuLID", "EVA02-CLIP-L-14-336"), ("FLUX Redux", "SigLIP so400m")):
        timed(engine, unit(name, next(seeds)))  # loads the adapter and the encoder
        runs: dict = {"new": [], "hit": []}
        for _ in range(args.rounds):
            ref = unit(name, next(seeds))
            runs["new"].append(timed(engine, ref))
            runs["hit"].append(timed(engine, ref))
        out[f"{name} ({encoder})"] = runs
    return out


def summarise(results: dict) -> dict:
    p50 = statistics.median
    s: dict = {}
    if "switch" in results:
        sw = results["switch"]
        s["switch"] = {}
        for way, v in sw.items():
            s["switch"][way] = {"p50": p50(r["total_s"] for r in v["switch"]), "min": min(r["total_s"] for r in v["switch"]),
                                "max": max(r["total_s"] for r in v["switch"]), "n": len(v["switch"]),
                                "by_unit": {n: p50(r["total_s"] for r, u in zip(v["switch"], v["unit"]) if u == n)
                                            for n in UNITS}}  # fmt: skip
        s["switch_ratio"] = s["switch"]["reload"]["p50"] / s["switch"]["resident"]["p50"]
        s["switch_ratio_by_unit"] = {n: s["switch"]["reload"]["by_unit"][n] / s["switch"]["resident"]["by_unit"][n]
                                     for n in UNITS}  # fmt: skip
    if "cache" in results:
        s["cache"] = {k: {"new_p50": p50(r["total_s"] for r in v["new"]), "hit_p50": p50(r["total_s"] for r in v["hit"]),
                          "n": len(v["new"])} for k, v in results["cache"].items()}  # fmt: skip
        for v in s["cache"].values():
            v["encode_s"] = v["new_p50"] - v["hit_p50"]
            v["ratio"] = v["new_p50"] / v["hit_p50"]
    return s


def render(s: dict, report: dict) -> str:
    m = report["machine"]
    lines = ["# Image prompts on FLUX: switching Redux / XLabs / PuLID, EVA-CLIP's and SigLIP's caches", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['threads']} torch thread{'s' if m['threads'] != 1 else ''}), "
             f"{m['memory_gib']} GiB RAM; Python {m['python']}, torch {m['torch']}, CPU, float32 (pipeline and encoders). "
             f"Load average (1 min) {report['load_average']['before'][0]:.2f} before, {report['load_average']['after'][0]:.2f} "
             f"after; other work used {report['others_cpu_s'] / report['wall_s']:.2f} of the cores on average "
             "(the machine is shared with other sessions: noisy).", "",
             f"Command: `{report['command']}`; measured {report['measured_at']}, {report['wall_s'] / 60:.1f} min in all. "
             "Adapters and encoders at real size with random weights; the FLUX transformer at FLUX.1's widths (3072, "
             "T5 4096) but 1 double + 1 single block, so PuLID's file has the 2 CAs that depth takes (FLUX.1-dev's "
             "has 20); see tools/bench_image_prompts.py.", ""]  # fmt: skip
    if "switch" in s:
        sw = s["switch"]
        lines += ["## Switching Redux -> XLabs -> PuLID (1 step at 64 px, the same reference per unit)", "",
                  "| engine | request p50 | min | max | Redux p50 | XLabs p50 | PuLID p50 | requests |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        names = {"resident": "imprompt, everything resident (default budgets)",
                 "reload": "imprompt, 1-byte caches (adapter + encoder from disk, encode, per request)"}
        for way, v in sw.items():
            u = v["by_unit"]
            lines.append(f"| {names[way]} | {v['p50']:.2f} s | {v['min']:.2f} s | {v['max']:.2f} s | "
                         f"{u['FLUX Redux']:.2f} s | {u['FLUX XLabs']:.2f} s | {u['PuLID']:.2f} s | {v['n']} |")  # fmt: skip
        by = ", ".join(f"{n} {r:.1f}x" for n, r in s["switch_ratio_by_unit"].items())
        lines += ["", f"A switch with everything resident is **{s['switch_ratio']:.1f}x** faster than reloading the "
                      f"request's adapter and encoder from disk (whole request, p50 over p50; per unit: {by}). The "
                      "reload side is imprompt's own loading path with no cache to keep anything (the strongest "
                      "reload baseline available here: the same loaders, the base pipeline kept); direct diffusers "
                      "loads were not measured (diffusers has no PuLID, and its Redux is a separate prior pipeline).",
                  ""]  # fmt: skip
    if "cache" in s:
        lines += ["## A repeated reference: encode vs embedding-cache hit (resident engine, whole 1-step request)", "",
                  "| unit (encoder) | new reference p50 | same again p50 | encode ≈ difference | ratio | runs |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for k, v in s["cache"].items():
            lines.append(f"| {k} | {v['new_p50']:.2f} s | {v['hit_p50']:.2f} s | {v['encode_s']:.2f} s | "
                         f"{v['ratio']:.1f}x | {v['n']} |")  # fmt: skip
        lines += ["", "PuLID's new reference is a new aligned face crop (facexlib's BiSeNet parsing at 512 px, then "
                      "EVA02-CLIP-L-14-336 at 336 px, then the IDFormer); Redux's a new image (SigLIP so400m at 384 px, 729 tokens, then redux_up/down). The "
                      "hit reads the cached tokens; both rows include the same 1-step denoise.", ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_image_prompts", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds (each: Redux, XLabs, PuLID)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--parts", default="switch,cache")
    parser.add_argument("--out", type=Path, default=Path("docs/image-prompts-benchmark.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from imprompt.cli import quiet_libraries

    quiet_libraries()
    root = build(args.cache)
    started, before, busy = time.perf_counter(), os.getloadavg(), busy_seconds()
    own = time.process_time()
    results: dict = {}
    for part in args.parts.split(","):
        print(f"bench-image-prompts: {part} ...", file=sys.stderr, flush=True)
        results[part] = {"switch": part_switch, "cache": part_cache}[part](root, args)
    given = argv if argv is not None else sys.argv[1:]
    wall = time.perf_counter() - started
    report = {"machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "python -m tools.bench_image_prompts" + (" " + " ".join(given) if given else ""),
              "args": {k: str(v) for k, v in vars(args).items()}, "dtype": "float32",
              "transformer": {**FLUX_WIDTHS, **DEPTH}, "load_average": {"before": before, "after": os.getloadavg()},
              "wall_s": wall, "others_cpu_s": busy_seconds() - busy - (time.process_time() - own),
              "peak_rss_bytes": _peak_rss(), "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    report["summary"] = summarise(results)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    text = render(report["summary"], report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
