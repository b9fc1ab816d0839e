"""The demo model pack: tiny models in the real formats and layouts, with the shipped trained weights.

Used by `imprompt demo`, `imprompt pack` and the tests' shared pack; `weights/` holds what `make train` wrote.

A pack folder is the user's too: they may add files, or save over one of the pack's. `pack.json` (written last,
atomically) lists every file the pack wrote with its sha256. A rebuild (a new imprompt, other weights) builds
the new pack beside the old one first, then removes only files that still hold the pack's bytes. A pack file that
was changed is the user's now: the rebuild refuses before touching anything, naming the files, since removing it
would lose their work and keeping it would leave a pack that is not the pack (they move it aside and run again).
An older `pack.json` lists paths only; its files count as changed if modified (or replaced) after the stamp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import RequestError
from .tiny_models import (
    CROSS_ATTENTION_SD15,
    CROSS_ATTENTION_SDXL,
    TINY_VIT_BIGG,
    TINY_VIT_H,
    build_clip_vision,
    build_sd15_pipeline,
    build_sdxl_pipeline,
    cross_attention_widths,
    draw_reference,
    save_sd15_pipeline,
    write_adapter,
)

from .tiny_dits import (
    TINY_VIT_L,
    build_flux_pipeline,
    build_sd3_pipeline,
    build_siglip_vision,
    transformer_config,
    write_flux_adapter,
    write_sd3_adapter,
)

log = logging.getLogger("imprompt")

PACK_VERSION = 7  # 5: pack.json lists the files the pack wrote; 6: SD 3.5 and FLUX; 7: their published conventions
# pack.json maps each file it wrote to its sha256 (older stamps list paths only; both are read)
SD15_MODEL = "tiny-sd15"
SDXL_MODEL = "tiny-sdxl"
SD35_MODEL = "tiny-sd35"
FLUX_MODEL = "tiny-flux"
# diffusion transformers' adapters, where ComfyUI users keep them (InstantX in ipadapter/, XLabs' x-flux nodes in
# xlabs/ipadapters/), and their encoders as ComfyUI's clip_vision/ names them
SD35_ADAPTER = "ipadapter/sd3.5-large-ip-adapter.safetensors"
FLUX_ADAPTERS = {"xlabs/ipadapters/flux-ip-adapter.safetensors": 4, "xlabs/ipadapters/flux-ip-adapter-v2.safetensors": 16}
SIGLIP_FILE = "clip_vision/siglip-so400m-patch14-384.safetensors"
VIT_L_FILE = "clip_vision/clip_vision_l.safetensors"
# h94 file stem -> (variant, encoder it was trained against)
SD15_ADAPTERS = {
    "ip-adapter_sd15": ("base", TINY_VIT_H),
    "ip-adapter_sd15_light": ("base", TINY_VIT_H),
    "ip-adapter-plus_sd15": ("plus", TINY_VIT_H),
    "ip-adapter-plus-face_sd15": ("plus", TINY_VIT_H),
    "ip-adapter-full-face_sd15": ("full-face", TINY_VIT_H),
    "ip-adapter_sd15_vit-G": ("base", TINY_VIT_BIGG),
}

SDXL_ADAPTERS = {
    "ip-adapter_sdxl": ("base", TINY_VIT_BIGG),
    "ip-adapter_sdxl_vit-h": ("base", TINY_VIT_H),
    "ip-adapter-plus_sdxl_vit-h": ("plus", TINY_VIT_H),
    "ip-adapter-plus-face_sdxl_vit-h": ("plus", TINY_VIT_H),
}

# ostris' composition adapters are Plus-type (Resampler over ViT-H hidden states); ComfyUI keeps them in ipadapter/
COMPOSITION_ADAPTERS = {
    "ip_plus_composition_sd15": ("plus", TINY_VIT_H, SD15_MODEL),
    "ip_plus_composition_sdxl": ("plus", TINY_VIT_H, SDXL_MODEL),
}

# Colours from shapes.PALETTE, so the trained models recognise them.
REFERENCE_IMAGES = {
    "red-circle": ("circle", (220, 40, 40), (40, 70, 210)),
    "yellow-square": ("square", (240, 210, 40), (40, 170, 60)),
    "white-triangle": ("triangle", (245, 245, 245), (20, 20, 20)),
    "blue-star": ("star", (40, 70, 210), (240, 210, 40)),
}

# The trained weights shipped with imprompt (written by `make train`), and where their files go in a pack.
DEMO_WEIGHTS = Path(__file__).parent / "weights"
TRAINED_ENCODERS = {"vit-h": "IP-Adapter/models/image_encoder", "vit-g": "IP-Adapter/sdxl_models/image_encoder"}
TRAINED_ADAPTERS = ("ip-adapter_sd15", "ip-adapter_sd15_vit-G", "ip-adapter-plus_sd15")  # in IP-Adapter/models
# the trained SD 1.5 model's suggested settings: the reference alone decides the picture
TRAINED_DEFAULTS = {"prompt": "", "cfg_scale": 1.5, "steps": 20, "ip_scale": 1.0}


def build_demo_pack(root: Path, force: bool = False, weights: Path | None = None) -> Path:
    """The demo model pack, skipped when already built:
    - `diffusers/tiny-sd15`, `diffusers/tiny-sdxl`: pipelines with SD 1.5's and SDXL's block structure;
    - `IP-Adapter/` in the h94 repository layout: ViT-H-like and ViT-bigG-like encoders, the six SD 1.5 adapters
      in `models/`, the four SDXL adapters in `sdxl_models/`;
    - `ipadapter/` in ComfyUI's layout: ostris' composition adapters for SD 1.5 and SDXL;
    - `diffusers/tiny-sd35`, `diffusers/tiny-flux`: SD 3.5- and FLUX-shaped pipelines (the first saved without T5),
      with InstantX's SD 3.5 adapter in `ipadapter/`, XLabs' FLUX adapters (v1, v2) in `xlabs/ipadapters/`, and
      their encoders in `clip_vision/` (SigLIP with so400m's 1152-wide hidden states, ViT-L's 768 image_embeds);
    - `images/`: reference images.

    Every model has random weights, unless `weights` names a folder written by `make train` (tools/training.py):
    then the SD 1.5 pipeline, both encoders and the Base, Base ViT-G and Plus SD 1.5 adapters are those trained
    weights (everything else stays random). The pack is rebuilt when the weights change.

    Nothing that the pack did not write is ever deleted or overwritten: `root` must be new, empty, or a demo pack
    (its `pack.json` lists the files it wrote and their sha256, and a rebuild removes exactly those that still hold
    them). Any other folder is refused, and so is a rebuild over a pack file the user changed (module docstring)."""
    root = Path(root)
    trained = weights is not None
    wanted = {"builder": "imprompt.pack", "version": PACK_VERSION, "weights": _weights_digest(weights) if trained else None}
    built = _own_pack(root)
    if built is not None and not force and {k: built.get(k) for k in wanted} == wanted:
        return root
    if built is not None:
        _refuse_changed(root, built)  # before the build's minutes, and again before removing anything
    log.info("building the demo model pack in %s (%s)", root, "trained" if trained else "random weights")
    building = root / BUILDING  # hidden from the model store; moved into place when complete
    if building.exists():
        shutil.rmtree(building)  # an interrupted build of ours
    _build(building, weights)
    files = {p.relative_to(building).as_posix(): _sha256(p) for p in sorted(building.rglob("*")) if p.is_file()}
    old = _pack_files(built)
    try:
        if built is not None:
            _refuse_changed(root, built)  # changed while the pack was building
        in_the_way = [name for name in files if _occupied(root, name) and name not in old]
        if in_the_way:
            raise RequestError(
                f"{root}: files that are not the demo pack's stand where it puts its own: {_shown(in_the_way)}. "
                f"imprompt never overwrites a file it did not write. Move them out of {root} and run again"
            )
    except RequestError:
        shutil.rmtree(building)  # the folder is left as it was
        raise
    _remove_files(root, old)
    for entry in sorted(building.iterdir()):
        _merge(entry, root / entry.name)
    building.rmdir()
    _write_stamp(root / "pack.json", {**wanted, "files": files})
    return root


BUILDING = ".building"
STAMP_PARTIAL = ".pack.json."  # the prefix of a stamp being written (moved into place when complete)


def _own_pack(root: Path) -> dict | None:
    """The stamp of the demo pack at `root`; None if `root` is new or empty (or holds only an interrupted build
    of ours). Anything else is refused, so that no user folder is ever built into or cleared."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise RequestError(f"{root} is a file; the demo pack needs a folder (a new one, or one holding a demo pack)")
    entries = [p.name for p in root.iterdir() if p.name != BUILDING and not p.name.startswith(STAMP_PARTIAL)]
    if not entries:
        return None
    stamp = root / "pack.json"
    refuse = (
        f"{root} is not empty and is not a demo pack; imprompt builds its demo pack only into a new or empty folder "
        f"and never deletes anything it did not create. Choose another folder (imprompt demo --pack DIR, imprompt "
        f"pack DIR), e.g. demo-models; to use your own models, pass them with --models to the other commands"
    )
    try:
        built = json.loads(stamp.read_text())
    except (OSError, ValueError):
        raise RequestError(refuse) from None
    if not isinstance(built, dict) or built.get("builder") != "imprompt.pack":
        raise RequestError(refuse)
    files = built.get("files")
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)) and not (
        isinstance(files, dict) and all(isinstance(f, str) and isinstance(d, str) for f, d in files.items())
    ):
        raise RequestError(
            f"{root} holds a demo pack from an older imprompt, which did not record the files it wrote, so imprompt "
            f"cannot tell them from yours. Delete that folder yourself (e.g. rm -r {root}) and run again"
        )
    return built


def _pack_files(built: dict | None) -> dict[str, str | None]:
    """The files a pack's stamp lists, each with its sha256 (None where an older stamp recorded paths only)."""
    if built is None:
        return {}
    files = built["files"]
    return dict(files) if isinstance(files, dict) else dict.fromkeys(files)


def _own_file(root: Path, name: str) -> Path | None:
    """A file the stamp lists, if it is there and inside `root` (a stamp edited to point elsewhere is ignored)."""
    base = root.resolve()
    path = (root / name).resolve()
    return path if base in path.parents and path.is_file() else None


def _changed(root: Path, built: dict) -> list[str]:
    """The pack's files that no longer hold what the pack wrote: another sha256, or (an older stamp without
    them) modified or replaced after the stamp was written. Files already gone are not listed."""
    stamped = (root / "pack.json").stat().st_mtime_ns
    changed = []
    for name, digest in _pack_files(built).items():
        path = _own_file(root, name)
        if path is None:
            continue
        if digest is not None:
            if _sha256(path) != digest:
                changed.append(name)
        elif max(path.stat().st_mtime_ns, path.stat().st_ctime_ns) > stamped:  # ctime: a copy that kept an old mtime
            changed.append(name)
    return changed


def _refuse_changed(root: Path, built: dict) -> None:
    changed = _changed(root, built)
    if changed:
        raise RequestError(
            f"{root}: files of the demo pack changed after it was built, so they are yours now: {_shown(changed)}. "
            f"imprompt never deletes or overwrites a file it did not write. Move them out of {root} (or delete them, "
            f"to get the pack's own back) and run again"
        )


def _shown(names: list[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _occupied(root: Path, name: str) -> bool:
    """Whether something other than a folder already stands where the pack puts `name`, or on the way to it."""
    target = root / name
    return target.exists() or any(p.exists() and not p.is_dir() for p in target.parents if root in p.parents)


def _remove_files(root: Path, files: dict[str, str | None]) -> None:
    """Remove the pack's own files (the caller has just refused any that changed: `_refuse_changed`), then the
    folders they leave empty; nothing else, nothing outside `root`. The stamp stays until the new one replaces it."""
    base = root.resolve()
    folders = set()
    for name in files:
        path = _own_file(root, name)
        if path is None:
            continue  # a stamp edited to point elsewhere, or a file already gone
        path.unlink()
        folders.update(p for p in path.parents if base in p.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _write_stamp(stamp: Path, data: dict) -> None:
    """pack.json through a temporary file and one rename: an interrupted write never leaves half a stamp (which
    would make the folder look like the user's)."""
    handle, partial = tempfile.mkstemp(dir=stamp.parent, prefix=STAMP_PARTIAL, suffix=".partial")
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(partial, stamp)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _merge(source: Path, target: Path) -> None:
    """Move a built entry into the pack folder, into folders that (after removing the old pack) may still hold
    files of the user's own."""
    if source.is_dir() and target.is_dir():
        for child in sorted(source.iterdir()):
            _merge(child, target / child.name)
        source.rmdir()
    elif target.exists():
        raise RequestError(f"{target} is in the way of the demo pack and is not the pack's own; move it elsewhere")
    else:
        source.replace(target)


def _build(root: Path, weights: Path | None) -> None:
    trained = weights is not None
    sd15 = root / "diffusers" / SD15_MODEL
    widths = {
        SD15_MODEL: cross_attention_widths((build_trained_sd15(sd15, weights) if trained else build_sd15_pipeline(sd15)).unet),
        SDXL_MODEL: cross_attention_widths(build_sdxl_pipeline(root / "diffusers" / SDXL_MODEL, seed=3).unet),
    }
    cross = {SD15_MODEL: CROSS_ATTENTION_SD15, SDXL_MODEL: CROSS_ATTENTION_SDXL}
    h94 = root / "IP-Adapter"
    if trained:
        for name, folder in TRAINED_ENCODERS.items():
            write_trained_encoder(root / folder, name, weights)
    else:
        build_clip_vision(h94 / "models" / "image_encoder", seed=1, **TINY_VIT_H)
        build_clip_vision(h94 / "sdxl_models" / "image_encoder", seed=2, **TINY_VIT_BIGG)
    adapters = [(h94 / "models", stem, variant, encoder, SD15_MODEL) for stem, (variant, encoder) in SD15_ADAPTERS.items()]
    adapters += [(h94 / "sdxl_models", stem, v, e, SDXL_MODEL) for stem, (v, e) in SDXL_ADAPTERS.items()]
    adapters += [(root / "ipadapter", stem, v, e, m) for stem, (v, e, m) in COMPOSITION_ADAPTERS.items()]
    for seed, (folder, stem, variant, encoder, model) in enumerate(adapters, start=10):
        if trained and stem in TRAINED_ADAPTERS:
            write_trained_adapter(folder / f"{stem}.safetensors", stem, weights)
            continue
        embed_dim = encoder["projection_dim"] if variant == "base" else encoder["hidden_size"]
        write_adapter(folder / f"{stem}.safetensors", variant, embed_dim, widths[model], cross[model], seed)
    _build_transformers(root)
    for name, (shape, color, background) in REFERENCE_IMAGES.items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        draw_reference(shape, color, background).save(root / "images" / f"{name}.png")
    if trained:  # where the trained pack draws best (docs/demo-pack.md): the web page starts from these
        (sd15 / "imprompt.json").write_text(json.dumps({"defaults": TRAINED_DEFAULTS}, indent=1))


def _build_transformers(root: Path) -> None:
    """SD 3.5 and FLUX: tiny pipelines, their adapters under the publishers' key names, and their encoders."""
    build_sd3_pipeline(root / "diffusers" / SD35_MODEL)
    build_flux_pipeline(root / "diffusers" / FLUX_MODEL)
    build_siglip_vision(root / SIGLIP_FILE, single_file=True)
    build_clip_vision(root / VIT_L_FILE, seed=6, single_file=True, **TINY_VIT_L)
    (root / SD35_ADAPTER).parent.mkdir(parents=True, exist_ok=True)
    write_sd3_adapter(root / SD35_ADAPTER, transformer_config(root / "diffusers" / SD35_MODEL))
    for seed, (name, tokens) in enumerate(FLUX_ADAPTERS.items(), start=51):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_flux_adapter(root / name, transformer_config(root / "diffusers" / FLUX_MODEL), seed, tokens=tokens)


# ------------------------------------------------------------------------------------- the trained demo weights


def _weights_digest(weights: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(weights).glob("*.safetensors")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def read_demo_weights(name: str, weights: Path = DEMO_WEIGHTS) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One trained weights file, factors multiplied out, and its metadata (the model's config)."""
    tensors, metadata = read_factored_weights(Path(weights) / f"{name}.safetensors")
    return expand_factors(tensors), metadata


def read_factored_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file as `make train` (tools/training.py) writes it: tensors (low-rank ones as factors) and metadata."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def expand_factors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<key>:up` and `<key>:down` (a low-rank weight as trained and shipped) become `<key>` = up @ down, in
    fp32; other tensors are kept as they are."""
    expanded = {k: v for k, v in tensors.items() if not k.endswith((":up", ":down"))}
    for key in tensors:
        if key.endswith(":up"):
            name = key.removesuffix(":up")
            expanded[name] = tensors[key].float() @ tensors[f"{name}:down"].float()
    return expanded


def build_trained_sd15(folder: Path, weights: Path = DEMO_WEIGHTS):
    """The trained tiny SD 1.5 pipeline as a diffusers folder (its tokenizer, text encoder, UNet, VAE and the
    PNDM scheduler the random pipeline has)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def model(factory, name):
        tensors, metadata = read_demo_weights(name, weights)
        instance = factory(json.loads(metadata["config"]))
        instance.load_state_dict(tensors, strict=True)
        return instance

    return save_sd15_pipeline(
        folder,
        vae=model(AutoencoderKL.from_config, "vae"),
        text_encoder=model(lambda config: CLIPTextModel(CLIPTextConfig.from_dict(config)), "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(Path(weights) / "tokenizer"),
        unet=model(UNet2DConditionModel.from_config, "unet"),
    )


def write_trained_encoder(folder: Path, name: str, weights: Path = DEMO_WEIGHTS) -> None:
    """A trained image encoder as a transformers folder (config.json + model.safetensors, fp16, as h94's)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    tensors, metadata = read_demo_weights(f"image_encoder_{name}", weights)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(json.loads(metadata["config"])))
    encoder.load_state_dict(tensors, strict=True)
    encoder.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def write_trained_adapter(path: Path, stem: str, weights: Path = DEMO_WEIGHTS) -> None:
    """A trained adapter as an h94 `.safetensors` (flat image_proj.* / ip_adapter.* keys, fp16)."""
    from safetensors.torch import save_file

    tensors, _ = read_demo_weights(stem, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
