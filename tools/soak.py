"""Soak: thousands of random requests through one engine, every valid result checked against the image that
request gives as the only request of a fresh process.

    python -m tools.soak --requests 5000 [--distinct 150] [--models DIR] [--report docs/soak.json]

`--distinct` requests are drawn at random from the space the engine serves (`random_request`: any of the four
families; for SD 1.5 / SDXL 0 to 3 units of any adapter of it with both encoders mixed, random scales, start/end
windows, one or two images or their average, masks, per-block presets, noise negatives, samplers, CFG, seeds,
img2img, LoRA tags with random weights, weighted, long and BREAK prompts, a textual inversion, a VAE, clip skip;
for SD 3.5 / FLUX what those run: their adapters, windows, averages, per-block scales, FLUX's true CFG with
negative images and its guidance); each one's
fresh-process image is computed once and kept on disk. The soak then runs `--requests` of them in a random order,
families in runs (base-model switches happen, not on every request), with 10 % requests that must fail (unknown
names, bad images, corrupt and incompatible files and LoRAs, malformed tags) slipped in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import random
import sys
import time
from pathlib import Path

import psutil

from imprompt.demo.tiny_models import write_adapter

from .controlnet_models import write_controlnets
from .extra_models import write_extra_models, write_redux_model


def _request(*units, model="tiny-sd15", seed=1, steps=2, **fields) -> dict:
    return {"model": model, "prompt": "a cat", "seed": seed, "steps": steps, "width": 64, "height": 64,
            "cfg_scale": 7.0, "ip_adapters": list(units), **fields}  # fmt: skip


def _unit(adapter, *images, scale=0.6, **fields) -> dict:
    return {"adapter": adapter, "images": list(images), "scale": scale, **fields}


SD15_ADAPTERS = ("Base", "Light", "Plus", "Plus Face", "Full Face", "Base ViT-G", "Ostris Composition ViT-H")
SDXL_ADAPTERS = ("Base SDXL", "Base ViT-H SDXL", "Plus ViT-H SDXL", "Plus Face ViT-H SDXL", "Ostris Composition ViT-H SDXL")
SAMPLERS = ("Default", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC")
# prompt syntax: plain, weighted, a textual inversion (SD 1.5's "shiny"), BREAK, longer than one 75-token chunk,
# prompt editing, alternation, AND with weights
PROMPTS = ("a cat", "a (red:1.4) cat", "a [shiny] cat", "a cat BREAK on a mat", ", ".join(["a small red cat"] * 20),
           "a [red:blue:0.5] cat", "a [red|(yellow:1.2)] cat", "a cat AND a [dog::2]:0.6")  # fmt: skip
LORAS = {"sd15": ("detail-sd15", "style-sd15"), "sdxl": ("style-sdxl",)}  # from `write_extra_files`
MODELS = {"sd15": "tiny-sd15", "sdxl": "tiny-sdxl", "sd35": "tiny-sd35", "flux": "tiny-flux"}  # the demo pack's
TRANSFORMER_ADAPTERS = {"sd35": ("SD3.5 Large",), "flux": ("FLUX XLabs", "FLUX XLabs v2")}
TRANSFORMER_BLOCKS = {"sd35": 3, "flux": 2}  # blocks an adapter attaches to in the pack's tiny SD 3.5 / FLUX
FACE = [round(random.Random(5).gauss(0, 1), 4) for _ in range(512)]  # a face embedding, as InsightFace gives


def random_request(rng: random.Random, images: dict[str, str]) -> dict:
    """One request drawn from the space of what the engine serves (see the module's docstring)."""
    family = rng.choice(["sd15", "sdxl", "sd15", "sdxl", "sd35", "flux"])
    if family in TRANSFORMER_ADAPTERS:
        return random_transformer_request(rng, images, family)
    adapters = SD15_ADAPTERS if family == "sd15" else SDXL_ADAPTERS
    pictures = sorted(images)
    units = []
    for _ in range(rng.choice([0, 1, 1, 2, 2, 3])):
        chosen = [images[p] for p in rng.sample(pictures, rng.choice([1, 1, 2]))]
        start = rng.choice([0.0, 0.0, 0.25, 0.5])
        unit = {"adapter": rng.choice(adapters), "images": chosen, "scale": round(rng.uniform(-0.5, 1.5), 2),
                "start": start, "end": rng.choice([e for e in (0.5, 0.75, 1.0, 1.0) if e >= start])}  # fmt: skip
        if len(chosen) > 1 and rng.random() < 0.3:
            unit["average"] = True
        if rng.random() < 0.2:
            unit["masks"] = [images[rng.choice(pictures)] for _ in range(1 if unit.get("average") else len(chosen))]
        if rng.random() < 0.25:
            unit["layers"] = rng.choice(["style", "composition", "style+composition"])
        if rng.random() < 0.15:
            unit["negative_images"] = ["noise"]
        units.append(unit)
    prompt = rng.choice(PROMPTS)
    loras = [name for name in LORAS[family] if rng.random() < 0.3]
    prompt += "".join(f" <lora:{name}:{round(rng.uniform(-1, 1.5), 2)}>" for name in loras)
    request = _request(*units, model="tiny-sd15" if family == "sd15" else "tiny-sdxl", seed=rng.randrange(1000),
                       steps=rng.choice([2, 3, 4]), cfg_scale=rng.choice([1.0, 3.0, 7.0]),
                       sampler=rng.choice(SAMPLERS), prompt=prompt)  # fmt: skip
    if rng.random() < 0.2:
        request["clip_skip"] = 2
    if rng.random() < 0.2:
        request["negative_prompt"] = rng.choice(["blurry", "[ugly:blurry:2]"])
    if rng.random() < 0.15:
        request["pad_cond_uncond"] = True
    if family == "sd15" and rng.random() < 0.15:
        request["vae"] = "soft-vae.safetensors"
    if rng.random() < 0.15:
        request.update(init_images=[images[rng.choice(pictures)]], denoising_strength=rng.choice([0.5, 0.75]))
    return request


def random_transformer_request(rng: random.Random, images: dict[str, str], family: str) -> dict:
    """An SD 3.5 / FLUX request within what those run: one SD 3.5 unit (several images averaged), up to two FLUX
    units, windows, per-block scales, FLUX's guidance and true CFG with a negative prompt and negative images."""
    pictures = sorted(images)
    units = []
    for _ in range(rng.choice([0, 1, 1, 2] if family == "flux" else [0, 1, 1])):
        chosen = [images[p] for p in rng.sample(pictures, rng.choice([1, 1, 2]))]
        start = rng.choice([0.0, 0.0, 0.25])
        unit = {"adapter": rng.choice(TRANSFORMER_ADAPTERS[family]), "images": chosen,
                "scale": round(rng.uniform(-0.5, 1.5), 2), "start": start,
                "end": rng.choice([e for e in (0.5, 0.75, 1.0, 1.0) if e >= start])}  # fmt: skip
        if len(chosen) > 1 and (family == "sd35" or rng.random() < 0.3):
            unit["average"] = True
        if rng.random() < 0.25:
            unit["layers"] = [round(rng.uniform(0.0, 1.2), 2) for _ in range(TRANSFORMER_BLOCKS[family])]
        units.append(unit)
    request = _request(*units, model=MODELS[family], seed=rng.randrange(1000), steps=rng.choice([2, 3]),
                       cfg_scale=rng.choice([1.0, 3.5, 5.0]), sampler=rng.choice(["Default", "Euler"]),
                       prompt=rng.choice(["a cat", "a red cat on a mat"]))  # fmt: skip
    if family == "flux" and rng.random() < 0.35:
        request.update(true_cfg_scale=rng.choice([1.5, 2.5]), negative_prompt="blurry")
        for unit in units:
            if rng.random() < 0.5:
                unit["negative_images"] = [images[rng.choice(pictures)]]
    return request


def random_requests(count: int, seed: int, images: dict[str, str]) -> dict[str, dict]:
    """`count` requests drawn with `seed`, named by their family and number ("sd15-007", "flux-012")."""
    rng = random.Random(seed)
    drawn = [random_request(rng, images) for _ in range(count)]
    family = {model: name for name, model in MODELS.items()}
    return {f"{family[r['model']]}-{i:03d}": r for i, r in enumerate(drawn)}


def sd15_menu(images: dict[str, str]) -> dict[str, dict]:
    """Valid SD 1.5 requests: every variant alone, mixes (both encoders in one image), windows, several images."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    return {
        "none": _request(seed=3),
        "base": _request(_unit("Base", red)),
        "light": _request(_unit("Light", yellow, scale=0.8), seed=2),
        "plus": _request(_unit("Plus", red, scale=0.5), seed=3),
        "plus-face": _request(_unit("Plus Face", white, scale=0.7)),
        "full-face": _request(_unit("Full Face", red), seed=4),
        "vit-g": _request(_unit("Base ViT-G", yellow)),
        "composition": _request(_unit("Ostris Composition ViT-H", white), seed=7),
        "base+vit-g": _request(_unit("Base", red), _unit("Base ViT-G", yellow, scale=0.5)),
        "plus+vit-g+full": _request(_unit("Plus", white, scale=0.5), _unit("Base ViT-G", red, scale=0.4),
                                    _unit("Full Face", yellow, scale=0.3), seed=5),  # fmt: skip
        # 4 steps where the steps matter (most requests take 2): a window that ends, schedules that switch apart
        "base-2-images-window": _request(_unit("Base", red, yellow, scale=0.7, start=0.25, end=0.75), steps=4),
        "scheduled-and": _request(_unit("Plus", red, scale=0.5), prompt="a [red:blue:0.5] cat AND a [dog|fox]:0.5",
                                  negative_prompt="[ugly:blurry:1]", seed=8, steps=4),  # fmt: skip
        "light+plus-face": _request(_unit("Light", white), _unit("Plus Face", red), seed=6),
    }


def sdxl_menu(images: dict[str, str]) -> dict[str, dict]:
    """Valid SDXL requests, with layer weights, masks and windows."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    return {
        "xl-base": _request(_unit("Base SDXL", red), model="tiny-sdxl"),
        "xl-plus+vit-h": _request(_unit("Plus ViT-H SDXL", yellow, scale=0.5), _unit("Base ViT-H SDXL", white, scale=0.5),
                                  model="tiny-sdxl", seed=2),  # fmt: skip
        "xl-style-masked": _request(_unit("Base SDXL", white, scale=0.9, layers="style", masks=[yellow]),
                                    model="tiny-sdxl", seed=3),  # fmt: skip
        "xl-composition-window": _request(_unit("Ostris Composition ViT-H SDXL", red, scale=0.7, start=0.25),
                                          model="tiny-sdxl", seed=4),  # fmt: skip
        "xl-plus-face-negative-noise": _request(_unit("Plus Face ViT-H SDXL", red, negative_images=["noise"]),
                                                model="tiny-sdxl", seed=6),  # fmt: skip
        "xl-none": _request(model="tiny-sdxl", seed=5),
        "xl-long-prompt-short-negative": _request(_unit("Base SDXL", red), model="tiny-sdxl", seed=7,
                                                  prompt=", ".join(["a small red cat"] * 20), negative_prompt="blurry"),
    }


def transformer_menu(images: dict[str, str]) -> dict[str, dict]:
    """Valid SD 3.5 and FLUX requests: each adapter, averaged images with a window, two FLUX adapters (v1 + v2),
    per-block weights, true CFG with a negative image, and none."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    sd35, flux = {"model": "tiny-sd35", "cfg_scale": 5.0}, {"model": "tiny-flux", "cfg_scale": 3.5}
    return {
        "sd35": _request(_unit("SD3.5 Large", red), **sd35),
        "sd35-average-window": _request(_unit("SD3.5 Large", yellow, white, average=True, start=0.25), seed=2, **sd35),
        "sd35-none": _request(seed=3, **sd35),
        "flux": _request(_unit("FLUX XLabs", red), **flux),
        "flux-v1+v2": _request(_unit("FLUX XLabs", yellow, scale=0.5), _unit("FLUX XLabs v2", white, scale=0.7),
                               seed=2, **flux),  # fmt: skip
        "flux-blocks-true-cfg": _request(_unit("FLUX XLabs v2", red, layers=[1.0, 0.3], negative_images=[white]),
                                         negative_prompt="blue", true_cfg_scale=2.5, seed=4, **flux),  # fmt: skip
        "flux-none": _request(seed=3, **flux),
    }


def _control(model, image, **fields) -> dict:
    return {"model": model, "image": image, **fields}


def controlnet_menu(images: dict[str, str]) -> dict[str, dict]:
    """Valid requests with ControlNet units (`write_extra_files` writes the tiny ControlNets): beside an image
    prompt, two at once with the extension's control modes and windows under a scheduled prompt, a preprocessor
    (canny), an SDXL Union model, and FLUX."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    return {
        "cn-sd15+unit": _request(_unit("Base", red), controlnets=[_control("control_tiny_sd15_canny", white, weight=0.8)],
                                 seed=11),  # fmt: skip
        # 4 steps: the canny unit's window ends before the last step (most requests take 2)
        "cn-sd15-canny-modes": _request(controlnets=[
            _control("control_tiny_sd15_canny", yellow, module="canny", control_mode="My prompt is more important",
                     end=0.5),
            _control("tiny-sd15-controlnet", white, weight=0.6, control_mode="ControlNet is more important")],
            prompt="a [cat:dog:0.5]", seed=12, steps=4),  # fmt: skip
        "cn-sdxl-union": _request(_unit("Base SDXL", red), model="tiny-sdxl", seed=13,
                                  controlnets=[_control("tiny-sdxl-union-promax", white, union_type="depth")]),  # fmt: skip
        "cn-flux": _request(model="tiny-flux", cfg_scale=3.5, seed=14,
                            controlnets=[_control("tiny-flux-controlnet", yellow, weight=0.7)]),  # fmt: skip
    }


def lora_menu(images: dict[str, str]) -> dict[str, dict]:
    """Valid requests with LoRAs (tags and the field), prompt weights, a textual inversion, a VAE and clip skip."""
    red = images["red-circle"]
    return {
        "lora-detail": _request(prompt="a (red:1.3) cat <lora:detail-sd15:0.7>", seed=8),
        "loras+unit+ti+vae": _request(_unit("Base", red), prompt="a (shiny:1.2) cat <lora:detail-sd15:0.5>",
                                      loras=[{"name": "style-sd15", "weight": -0.4}], vae="soft-vae.safetensors",
                                      clip_skip=2, seed=9),  # fmt: skip
        "long-prompt-style": _request(prompt=", ".join(["a small red cat on a mat"] * 12) + " <lora:style-sd15:1>",
                                      seed=10),  # fmt: skip
        "xl-lora": _request(_unit("Base SDXL", red), prompt="a cat <lora:style-sdxl:0.8>", model="tiny-sdxl", seed=11),
        "faceid+lora+unit": _request({"adapter": "FaceID Base", "face_embeddings": [FACE], "scale": 0.7},
                                     _unit("Base ViT-G", red, scale=0.4), prompt="a cat <lora:style-sd15:0.6>",
                                     seed=12),  # fmt: skip
    }


def faceid_menu(extra: Path) -> dict[str, dict]:
    """FaceID from images (InsightFace, where installed: `write_extra_files` then writes its tiny pack and faces),
    Base and Plus v2 with structure, beside other units and LoRAs; empty without InsightFace."""
    faces = sorted(str(p) for p in (Path(extra) / "faces").glob("face-*.png"))
    if not faces:
        return {}
    return {
        "faceid-image": _request(_unit("FaceID Base", faces[0], scale=0.8), seed=13),
        "faceid-plus-v2+lora": _request(_unit("FaceID Plus v2", faces[1], scale=0.7, structure=0.6),
                                        prompt="a cat <lora:detail-sd15:0.5>", seed=14),  # fmt: skip
        "faceid-plus-two-faces+unit": _request(_unit("FaceID Plus v2", *faces, scale=0.5),
                                               {"adapter": "FaceID Base", "face_embeddings": [FACE], "scale": 0.4},
                                               seed=15),  # fmt: skip
    }


def redux_menu(images: dict[str, str], lora: str | None = "flux-detail") -> dict[str, dict]:
    """FLUX Redux on the pack's tiny FLUX (`write_extra_files` writes the file and its SigLIP): alone, beside an
    XLabs unit (two images' downsampled grids appended), and with a FLUX LoRA (`lora`, a ComfyUI tree's; None
    leaves that request out)."""
    red, yellow, white = images["red-circle"], images["yellow-square"], images["white-triangle"]
    flux = {"model": "tiny-flux", "cfg_scale": 3.5, "steps": 3}
    menu = {
        "redux": _request(_unit("FLUX Redux", red, scale=1.0), seed=31, **flux),
        "redux+xlabs": _request(_unit("FLUX XLabs", yellow, scale=0.7),
                                _unit("FLUX Redux", white, red, scale=0.8, downsample=3), seed=32, **flux),  # fmt: skip
    }
    if lora:
        menu["redux+lora"] = _request(_unit("FLUX Redux", yellow, scale=0.9), prompt=f"a cat <lora:{lora}:0.8>",
                                      seed=33, **flux)  # fmt: skip
    return menu


def instantid_menu(extra: Path, images: dict[str, str]) -> dict[str, dict]:
    """InstantID on the pack's tiny SDXL (where InsightFace is installed: `write_extra_files` then writes the tiny
    adapter, its IdentityNet and an antelopev2 pack): alone, and with a pose image and a plain SDXL ControlNet
    beside the IdentityNet; empty without InsightFace."""
    faces = sorted(str(p) for p in (Path(extra) / "faces").glob("face-*.png"))
    if not faces or not (Path(extra) / "instantid" / "checkpoints" / "ip-adapter.bin").is_file():
        return {}
    xl = {"model": "tiny-sdxl", "steps": 3}
    return {
        "instantid": _request(_unit("InstantID", faces[0], scale=0.8, controlnet_scale=0.7), seed=41, **xl),
        "instantid+controlnet": _request(_unit("InstantID", faces[1], scale=0.6, controlnet_scale=0.5,
                                               pose_image=faces[0]),
                                         controlnets=[_control("tiny-sdxl-controlnet", images["white-triangle"],
                                                               weight=0.8)], seed=42, **xl),  # fmt: skip
    }


def failing_menu(images: dict[str, str], extra: Path | None = None) -> dict[str, dict]:
    """Requests that must fail with a typed error (the extra root from `write_extra_files` provides the files)."""
    red = images["red-circle"]
    no_face = Path(extra or "") / "faces" / "no-face.png"
    no_face = str(no_face) if extra and no_face.is_file() else red  # without InsightFace, any image fails
    return {
        "unknown-adapter": _request(_unit("Base XL Turbo", red)),
        "bad-image": _request(_unit("Plus", "bm90IGFuIGltYWdl")),  # base64 of "not an image"
        "start-after-end": _request(_unit("Base", red, start=0.8, end=0.2)),
        "wrong-encoder": _request(_unit("Base ViT-G", red, encoder="IP-Adapter/models/image_encoder")),
        "corrupt-file": _request(_unit("ip-adapter_broken", red)),
        "sdxl-on-sd15": _request(_unit("ip-adapter_sdxl_test", red)),
        "second-unit-bad": _request(_unit("Base ViT-G", red), _unit("Nope", red)),
        "sd15-on-sdxl": _request(_unit("Plus", red), model="tiny-sdxl"),
        "bad-layers": _request(_unit("Base SDXL", red, layers={"down": {"block_0": 1.0}}), model="tiny-sdxl"),
        "unknown-lora": _request(prompt="a cat <lora:nope:1>"),
        "sdxl-lora-on-sd15": _request(prompt="a cat <lora:style-sdxl:1>"),
        "corrupt-lora": _request(prompt="a cat <lora:broken-lora:1>"),
        "bad-lora-tag": _request(prompt="a cat <lora:detail-sd15:1:2:3>"),
        "faceid-no-face": _request(_unit("FaceID Base", no_face)),
        "faceid-plus-without-crop": _request({"adapter": "FaceID Plus v2", "face_embeddings": [FACE]}),
        "faceid-wrong-width": _request({"adapter": "FaceID Base", "face_embeddings": [FACE[:256]]}),
        "flux-on-sd35": _request(_unit("FLUX XLabs", red), model="tiny-sd35"),
        "sd35-on-flux": _request(_unit("SD3.5 Large", red), model="tiny-flux"),
        "flux-with-bigg": _request(_unit("FLUX XLabs", red, encoder="IP-Adapter/sdxl_models/image_encoder"),
                                   model="tiny-flux"),  # fmt: skip
        "two-units-on-sd35": _request(_unit("SD3.5 Large", red), _unit("SD3.5 Large", red), model="tiny-sd35"),
        "sdxl-controlnet-on-sd15": _request(_unit("Base", red), controlnets=[_control("tiny-sdxl-controlnet", red)]),
        "controlnet-bad-module": _request(controlnets=[_control("control_tiny_sd15_canny", red, module="nope")]),
        "redux-on-sd35": _request(_unit("FLUX Redux", red), model="tiny-sd35", cfg_scale=5.0),
        "instantid-no-face": _request(_unit("InstantID", no_face, controlnet_scale=0.7), model="tiny-sdxl"),
    }


def write_extra_files(folder: Path, pack: Path) -> Path:
    """A truncated adapter and an SDXL-width adapter (refused on SD 1.5), for the failing requests; LoRAs, an
    embedding, a VAE, a FLUX Redux with its SigLIP (`tools/extra_models.py`), the tiny ControlNets
    (`tools/controlnet_models.py`) and, where InsightFace is installed, a tiny InstantID with its IdentityNet
    (`tools/instantid_models.py`) and an antelopev2 pack beside buffalo_l, for the others."""
    folder.mkdir(parents=True, exist_ok=True)
    write_extra_models(folder, pack)
    # a folder deeper than the pack's clip_vision/: SD 3.5's adapter keeps the pack's SigLIP (the encoder rule
    # prefers the shallower path among equals), Redux pairs with the one beside it
    write_redux_model(folder / "redux", pack)
    if (folder / "faces").is_dir():  # InsightFace is installed (`write_extra_models` wrote its faces)
        from .insightface_pack import write_insightface_pack
        from .instantid_models import write_instantid

        write_instantid(folder / "instantid", pack)
        write_insightface_pack(folder / "insightface", "antelopev2")
    good = (pack / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors").read_bytes()
    (folder / "ip-adapter_broken.safetensors").write_bytes(good[: len(good) // 2])
    write_adapter(folder / "ip-adapter_sdxl_test.safetensors", "base", 1280, [640, 1280], 2048, seed=99)
    write_controlnets(folder / "controlnets", pack)
    return folder


def pack_images(pack: Path) -> dict[str, str]:
    return {p.stem: str(p) for p in (pack / "images").glob("*.png")}


# What every reference process would import on its own: imprompt, and the parts of diffusers and transformers
# that a first request pulls in lazily (diffusers imports all its model classes then).
PRELOADED = ["imprompt.engine", "diffusers.models", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
             "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl", "transformers.models.clip.modeling_clip",
             "transformers.models.clip.tokenization_clip"]  # fmt: skip


def _first_request(roots: list[str], request: dict, out: str) -> None:
    """Runs in a process of its own: one engine, one request, its first image to `out`."""
    from imprompt import Engine

    Engine(roots).generate(request).images[0].save(out)


def fresh_references(roots: list[str], requests: dict[str, dict], folder: Path, workers: int = 1) -> dict[str, Path]:
    """Each request's image as the only request of a brand-new process, kept on disk by content.

    Every reference runs in a process of its own that ran nothing before (`maxtasksperchild=1`), forked from a
    fork server that has only imported imprompt, torch and diffusers (multiprocessing's forkserver, started
    fresh and single-threaded): the same state as `python -c ...`, without paying the imports each time (2.5 s
    a reference instead of 10 on 2 cores). One worker by default: two torch processes on 2 cores, each with
    2 threads, were 2.3x slower in all than one after the other."""
    folder.mkdir(parents=True, exist_ok=True)
    stamps = [(Path(root) / "pack.json").read_text() for root in roots if (Path(root) / "pack.json").is_file()]
    targets, missing = {}, []
    for name, request in requests.items():  # keyed by the pack's build stamp too: a rebuilt pack never meets old ones
        key = hashlib.sha256(json.dumps([roots, request, stamps], sort_keys=True).encode()).hexdigest()[:16]
        targets[name] = folder / f"{name}-{key}.png"
        if not targets[name].exists():
            missing.append(name)
    if missing:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOADED)
        with context.Pool(workers, maxtasksperchild=1) as pool:
            partials = {name: folder / f".{targets[name].name}.partial.png" for name in missing}
            jobs = {name: pool.apply_async(_first_request, (roots, requests[name], str(partials[name]))) for name in missing}
            for name, job in jobs.items():
                try:
                    job.get(timeout=600)
                except Exception as exc:
                    raise RuntimeError(f"fresh-process reference for {name} failed: {exc!r}") from exc
                partials[name].replace(targets[name])
    return targets


def soak(roots: list[str], valid: dict, failing: dict, references: dict[str, Path], count: int, seed: int = 0,
         switch_family: float = 0.15, cache_budget=None, progress=None, warmup: int = 100) -> dict:  # fmt: skip
    """Run `count` random requests through one engine. Returns the report (failures listed, not raised), with the
    memory at the start, after `warmup` requests (every model and encoder loaded by then) and at the end."""
    import numpy as np
    from PIL import Image

    from imprompt.engine import Engine
    from imprompt.errors import ImpromptError

    rng = random.Random(seed)
    families = {name: [n for n in valid if valid[n]["model"] == model] for name, model in MODELS.items()}
    families = {name: requests for name, requests in families.items() if requests}
    expected = {name: np.asarray(Image.open(path).convert("RGB")).astype(np.int16) for name, path in references.items()}
    engine = Engine(roots, cache_budget=cache_budget)
    family, counts, failures = next(iter(families)), {"valid": 0, "refused": 0}, []
    rss_start, rss_after_warmup, cache_after_warmup, started = _rss(), None, None, time.perf_counter()
    for i in range(count):
        if i == warmup:  # before the request: a refused request skips the loop's end
            rss_after_warmup, cache_after_warmup = _rss(), _cache_bytes(engine)
        if rng.random() < switch_family:
            family = rng.choice([f for f in sorted(families) if f != family] or [family])
        if rng.random() < 0.1:
            name = rng.choice(sorted(failing))
            try:
                engine.generate(failing[name])
                failures.append({"request": i, "name": name, "problem": "was not refused"})
            except ImpromptError:
                counts["refused"] += 1
            continue
        name = rng.choice(families[family])
        image = np.asarray(engine.generate(valid[name]).images[0]).astype(np.int16)
        counts["valid"] += 1
        difference = int(np.abs(image - expected[name]).max())
        if difference:
            failures.append({"request": i, "name": name, "problem": f"pixels differ by {difference}"})
        if progress and (i + 1) % 100 == 0:
            progress(i + 1, failures)
    return {
        "requests": count,
        "valid": counts["valid"],
        "refused_as_expected": counts["refused"],
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 1),
        "rss_start_bytes": rss_start,
        "warmup_requests": warmup,
        "rss_after_warmup_bytes": rss_after_warmup,
        "rss_end_bytes": _rss(),
        # what the bounded caches held after the warm-up and at the end: RSS grows with them while they fill
        "cache_after_warmup": cache_after_warmup,
        "cache": _cache_bytes(engine),
    }


def _cache_bytes(engine) -> dict:
    return {k: v["used_bytes"] for k, v in engine.cache_info().items() if isinstance(v, dict) and "used_bytes" in v}


def _rss() -> int:
    """Current resident set size, in bytes."""
    return psutil.Process().memory_info().rss


def main(argv: list[str] | None = None) -> int:
    from imprompt.cli import quiet_libraries
    from imprompt.demo.pack import build_demo_pack

    parser = argparse.ArgumentParser(prog="python -m tools.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--distinct", type=int, default=150, help="distinct random requests (each gets a fresh-process image)")
    parser.add_argument("--models", type=Path, default=Path("demo-models"), help="the demo pack (built if missing)")
    parser.add_argument("--work", type=Path, default=Path(".soak"), help="bad files and references")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-budget", help="encoder cache budget, e.g. 1 (evict on every switch) or 2GiB; default: the engine's")
    parser.add_argument("--report", type=Path, default=Path("docs/soak.json"))
    args = parser.parse_args(argv)
    quiet_libraries()
    pack = build_demo_pack(args.models)
    roots = [str(pack.resolve()), str(write_extra_files(args.work / "extra", pack).resolve())]
    images = pack_images(pack)
    extra = Path(roots[1])
    valid = (random_requests(args.distinct, args.seed, images) | faceid_menu(extra) | redux_menu(images, lora=None)
             | instantid_menu(extra, images))
    failing = failing_menu(images, Path(roots[1]))
    references = fresh_references(roots, valid, args.work / "references")
    report = soak(roots, valid, failing, references, args.requests, args.seed, cache_budget=args.cache_budget,
                  progress=lambda n, f: print(f"soak: {n} requests, {len(f)} failures, RSS {_rss() / 2**20:.0f} MiB",
                                              file=sys.stderr, flush=True))  # fmt: skip
    return write_report(report, args.report)


def write_report(report: dict, path: Path) -> int:
    """The whole report to `path`, a summary (failures counted) to stdout; the exit status: 1 if any failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "failures"} | {"failures": len(report["failures"])}, indent=2))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
