"""ControlNet preprocessors (annotators): the A1111 ControlNet extension's modules, found with their weights.

Their weights are looked for where users keep them, and their results are cached.

- `PREPROCESSORS` / `find`: the registry, keyed by the extension's module names ("canny", "depth_anything",
  "lineart_realistic", ...); `find` also takes the extension's internal keys ("lineart", "hed"), its UI labels and
  SD.Next's processor names.
- `locate_weights`: the files a preprocessor needs, found in A1111's
  `extensions/sd-webui-controlnet/annotator/downloads/<sub>/`, ComfyUI's
  `custom_nodes/comfyui_controlnet_aux/ckpts/<repo>/`, or imprompt's own `<root>/annotators/` (the file itself,
  or under the A1111 sub-folder name), for each root and its parents up to 3 levels. Nothing is loaded: the plan
  calls it to refuse a request before any work.
- `detect`: runs one as the extension does (its resolution is the processor resolution: the short side the
  detector works at; out-of-range values become the slider defaults, as the extension's unit validation makes
  them), cached by image content, parameters and the weights' fingerprints in the engine's byte-bounded cache.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import MissingPreprocessorWeightsError, UnknownPreprocessorError
from ..util.cache import ByteLRU
from .resize import as_array, hwc3


@dataclass(frozen=True)
class Slider:
    """One of the extension's sliders: resolution, threshold_a or threshold_b. A value outside
    [minimum, maximum] (a client's -1 included) means `value`, as in the extension."""

    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    value: float = 0.5
    step: float = 0.01
    visible: bool = False

    def api_json(self) -> dict:
        """As the extension's `/controlnet/module_list` `module_detail` lists it."""
        return {"name": self.label, "value": self.value, "min": self.minimum, "max": self.maximum, "step": self.step}

    def clamp(self, value) -> float:
        if value is None or not self.minimum <= float(value) <= self.maximum:
            return self.value
        return float(value)


RESOLUTION = Slider("Resolution", 64, 2048, 512, 8, True)
HIDDEN = Slider()


@dataclass(frozen=True)
class Preprocessor:
    """One preprocessor. `name` is the registry key (the extension's module name as clients send it), `label`
    its UI label, `module` its internal key (what `/controlnet/module_list` lists without `alias_names`),
    `control_type` its first tag and `tags` all of them (the extension's Control Type groups), `weights` the file
    names it needs, `sliders` the visible ones as `module_detail` lists them."""

    name: str
    label: str
    module: str
    tags: tuple[str, ...]
    weights: tuple[str, ...]
    model_free: bool
    resolution: Slider = RESOLUTION
    slider_a: Slider = HIDDEN
    slider_b: Slider = HIDDEN
    aliases: tuple[str, ...] = ()
    runner: str = field(default="", repr=False)  # "module:function" under imprompt.preprocess

    @property
    def control_type(self) -> str:
        return self.tags[0] if self.tags else ""

    @property
    def sliders(self) -> tuple[dict, ...]:
        return tuple(s.api_json() for s in (self.resolution, self.slider_a, self.slider_b) if s.visible)

    def function(self) -> Callable:
        """The function that computes it, imported now (model-based ones import their libraries lazily)."""
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def gamma() -> Slider:
    return Slider("Gamma Correction", 0.1, 2.0, 1.0, 0.001, True)


# Where each weight file lives: the A1111 extension's sub-folder of annotator/downloads, and the folders under
# comfyui_controlnet_aux's ckpts/ with the file names ComfyUI uses there (the first is the preferred name).
WEIGHT_PLACES: dict[str, tuple[str, tuple[str, ...]]] = {
    "depth_anything_vitl14.pth": ("depth_anything", ("LiheYoung/Depth-Anything/checkpoints/depth_anything_vitl14.pth",)),
    "depth_anything_v2_vitl.safetensors": ("depth_anything_v2", (
        "depth-anything/Depth-Anything-V2-Large/depth_anything_v2_vitl.pth",
        "depth-anything/Depth-Anything-V2-Large/depth_anything_v2_vitl.safetensors")),
    "body_pose_model.pth": ("openpose", ("lllyasviel/Annotators/body_pose_model.pth",)),
    "hand_pose_model.pth": ("openpose", ("lllyasviel/Annotators/hand_pose_model.pth",)),
    "facenet.pth": ("openpose", ("lllyasviel/Annotators/facenet.pth",)),
    "yolox_l.onnx": ("openpose", ("yzd-v/DWPose/yolox_l.onnx",)),
    "dw-ll_ucoco_384.onnx": ("openpose", ("yzd-v/DWPose/dw-ll_ucoco_384.onnx",)),
    "sk_model.pth": ("lineart", ("lllyasviel/Annotators/sk_model.pth",)),
    "sk_model2.pth": ("lineart", ("lllyasviel/Annotators/sk_model2.pth",)),
    "ControlNetHED.pth": ("hed", ("lllyasviel/Annotators/ControlNetHED.pth",)),
}
# imprompt's own folder also takes a transformers folder (config.json + safetensors) for these files.
TRANSFORMERS_FOLDERS = {
    "depth_anything_vitl14.pth": "depth-anything",
    "depth_anything_v2_vitl.safetensors": "depth-anything-v2",
}
A1111_DOWNLOADS = Path("extensions/sd-webui-controlnet/annotator/downloads")
COMFY_CKPTS = Path("custom_nodes/comfyui_controlnet_aux/ckpts")
OWN = Path("annotators")


def entry(name, label, module, tags, runner, weights=(), model_free=True, resolution=RESOLUTION, a=HIDDEN,
          b=HIDDEN, aliases=()) -> Preprocessor:
    return Preprocessor(name=name, label=label, module=module, tags=tuple(tags), weights=tuple(weights),
                        model_free=model_free, resolution=resolution, slider_a=a, slider_b=b,
                        aliases=tuple(aliases), runner=runner)


# The extension's model_free flag is True only for reference/revision; "model_free" here means "needs no weights".
REGISTRY = (
    entry("none", "none", "none", [], "simple:none", aliases=["None"]),
    entry("invert", "invert (from white bg & black line)", "invert", ["Canny", "Lineart", "Scribble", "MLSD"],
          "simple:invert", resolution=HIDDEN),
    entry("canny", "canny", "canny", ["Canny"], "simple:canny",
          a=Slider("Low Threshold", 1, 255, 100, 1, True), b=Slider("High Threshold", 1, 255, 200, 1, True),
          aliases=["Canny"]),
    entry("blur_gaussian", "blur_gaussian", "blur_gaussian", ["Tile"], "simple:blur_gaussian",
          a=Slider("Sigma", 0.01, 64.0, 9.0, 0.01, True)),
    entry("scribble_xdog", "scribble_xdog", "scribble_xdog", ["Scribble", "SparseCtrl"], "simple:scribble_xdog",
          a=Slider("XDoG Threshold", 1, 64, 32, 0.01, True)),
    entry("tile_resample", "tile_resample", "tile_resample", ["Tile"], "simple:tile_resample",
          a=Slider("Down Sampling Rate", 1.0, 8.0, 1.0, 0.01, True)),
    entry("threshold", "threshold", "threshold", [], "simple:threshold",
          a=Slider("Binarization Threshold", 0, 255, 127, 0.01, True)),
    entry("lineart_standard", "lineart_standard (from white bg & black line)", "lineart_standard", ["Lineart"],
          "simple:lineart_standard"),
    entry("t2ia_color_grid", "t2ia_color_grid", "color", ["T2I-Adapter"], "simple:color_grid"),
    entry("recolor_luminance", "recolor_luminance", "recolor_luminance", ["Recolor"], "simple:recolor_luminance",
          a=gamma()),
    entry("recolor_intensity", "recolor_intensity", "recolor_intensity", ["Recolor"], "simple:recolor_intensity",
          a=gamma()),
    entry("depth_anything", "depth_anything", "depth_anything", ["Depth"], "depth:depth_anything",
          weights=["depth_anything_vitl14.pth"], model_free=False, aliases=["Depth Anything"]),
    entry("depth_anything_v2", "depth_anything_v2", "depth_anything_v2", ["Depth"], "depth:depth_anything_v2",
          weights=["depth_anything_v2_vitl.safetensors"], model_free=False,
          aliases=["Depth Anything V2", "Depth Anything v2"]),
    # the model-based ones (`dwpose.py`, `lineart.py`, `hed.py`): run(image, resolution, threshold_a, threshold_b,
    # weights); CMU OpenPose (openpose, openpose_full) is not implemented: DWPose is the extension's pose default
    entry("dw_openpose_full", "dw_openpose_full", "dw_openpose_full", ["OpenPose"], "dwpose:run",
          weights=["yolox_l.onnx", "dw-ll_ucoco_384.onnx"], model_free=False, aliases=["DWPose"]),
    entry("lineart_realistic", "lineart_realistic", "lineart", ["Lineart"], "lineart:run",
          weights=["sk_model.pth"], model_free=False, aliases=["LineArt Realistic"]),
    entry("lineart_coarse", "lineart_coarse", "lineart_coarse", ["Lineart"], "lineart:run_coarse",
          weights=["sk_model2.pth"], model_free=False),
    entry("softedge_hed", "softedge_hed", "hed", ["SoftEdge"], "hed:run",
          weights=["ControlNetHED.pth"], model_free=False, aliases=["HED"]),
    entry("softedge_hedsafe", "softedge_hedsafe", "hed_safe", ["SoftEdge"], "hed:run_safe",
          weights=["ControlNetHED.pth"], model_free=False),
    entry("scribble_hed", "scribble_hed", "scribble_hed", ["Scribble", "SparseCtrl"], "hed:run_scribble",
          weights=["ControlNetHED.pth"], model_free=False),
)
PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in REGISTRY}


def spelling(name: str) -> str:
    """How names compare: case, spaces, dashes and underscores ignored ("LineArt Realistic" = "lineart_realistic")."""
    return "".join(ch for ch in name.lower() if ch.isalnum() or ch in "+&()")


SPELLINGS: dict[str, Preprocessor] = {}
for pre in REGISTRY:  # exact names first, so an alias never shadows a module's own name
    for known in (pre.name, pre.label, pre.module, *pre.aliases):
        SPELLINGS.setdefault(spelling(known), pre)


def find(name) -> Preprocessor:
    """The preprocessor a client named: the extension's module names, internal keys and labels, or SD.Next's."""
    if isinstance(name, str):
        if name in PREPROCESSORS:
            return PREPROCESSORS[name]
        found = SPELLINGS.get(spelling(name))
        if found is not None:
            return found
    raise UnknownPreprocessorError(
        f"preprocessor (module) {name!r} is not one imprompt knows. Known: {', '.join(PREPROCESSORS)}. "
        "Send one of these (or 'none' with a finished control image)")


def search_roots(roots) -> list[Path]:
    """Each root and its parents up to 3 levels, without repeats, in order."""
    seen: list[Path] = []
    for root in roots:
        path = Path(root).expanduser()
        for candidate in [path, *list(path.parents)[:3]]:
            if candidate not in seen:
                seen.append(candidate)
    return seen


def places(file: str, base: Path) -> list[Path]:
    """Where `file` may be under one base folder, most specific first."""
    sub, comfy = WEIGHT_PLACES.get(file, ("", ()))
    found = []
    if file in TRANSFORMERS_FOLDERS:
        found.append(base / OWN / TRANSFORMERS_FOLDERS[file])
    found += [base / OWN / file]
    if sub:
        found.append(base / OWN / sub / file)
    found.append(base / A1111_DOWNLOADS / sub / file if sub else base / A1111_DOWNLOADS / file)
    found += [base / COMFY_CKPTS / rel for rel in comfy]
    return found


def usable(path: Path) -> bool:
    """A weight file, or a transformers folder (config.json and safetensors)."""
    if path.is_dir():
        return (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    return path.is_file()


def locate_weights(pre: Preprocessor, roots) -> dict[str, Path]:
    """The path of each weight file `pre` needs, looked up without loading anything; a missing one is a
    `MissingPreprocessorWeightsError` naming the file and every folder looked in."""
    bases = search_roots(roots)
    found: dict[str, Path] = {}
    for file in pre.weights:
        candidates = [path for base in bases for path in places(file, base)]
        hit = next((path for path in candidates if usable(path)), None)
        if hit is None:
            folders = list(dict.fromkeys(str(path.parent if path.name == file else path) for path in candidates))
            raise MissingPreprocessorWeightsError(
                f"preprocessor {pre.name!r} needs {file}, found in none of: {'; '.join(folders)}. "
                f"Put {file} in the ControlNet extension's annotator/downloads/{WEIGHT_PLACES.get(file, ('',))[0]} "
                f"folder, ComfyUI's comfyui_controlnet_aux/ckpts, or <models>/annotators/, or choose another "
                "preprocessor (or 'none' with a finished control image)")
        found[file] = hit
    return found


def fingerprint(path: Path) -> tuple:
    """What identifies a weight file or folder for the cache: its path, sizes and modification times."""
    path = Path(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    stats = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return tuple(stats)


def detect(pre: Preprocessor, image: Image.Image, resolution, threshold_a=-1, threshold_b=-1, weights=None,
           cache: ByteLRU | None = None, exact_resolution: bool = False) -> Image.Image:
    """The detected map (RGB) of `image` by `pre`, as the extension computes it; `weights` as `locate_weights`
    returned them. Cached in `cache` (None: not cached)."""
    weights = dict(weights or {})
    missing = [file for file in pre.weights if file not in weights]
    if missing:
        raise MissingPreprocessorWeightsError(
            f"preprocessor {pre.name!r} needs {', '.join(missing)}: locate_weights finds them; none was given")
    array = as_array(image)
    res = max(1, int(resolution)) if exact_resolution else pre.resolution.clamp(resolution)
    a, b = pre.slider_a.clamp(threshold_a), pre.slider_b.clamp(threshold_b)
    key = None
    if cache is not None:
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
        key = (digest, array.shape, pre.name, res, a, b,
               tuple((file, fingerprint(weights[file])) for file in pre.weights))
        hit = cache.get(key)
        if hit is not None:
            return hit
    result = Image.fromarray(hwc3(np.ascontiguousarray(pre.function()(array, int(res), a, b, weights))))
    if key is not None:
        cache.put(key, result, result.width * result.height * len(result.getbands()), label=pre.name)
    return result
