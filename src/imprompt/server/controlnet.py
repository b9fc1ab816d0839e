"""The A1111 ControlNet extension's IP-Adapter units (`alwayson_scripts.controlnet.args`), and its helper endpoints.

Most clients that send IP-Adapter requests over HTTP do it through sd-webui-controlnet's API (or Forge's). A unit
names a preprocessor (`module`) and a model; in A1111 the module decides the image encoder, so
`ip-adapter_clip_sd15` with `ip-adapter_sd15_vit-G` ends in `mat1 and mat2 shapes cannot be multiplied`. Here, as
everywhere in imprompt, the adapter's weights decide the encoder; a module that names another one is reported as a
warning in the response's `info`. ControlNet units proper are refused (422): imprompt does not run ControlNet.

As the extension does, the response carries each enabled unit's input map after the generated images (for an
IP-Adapter preprocessor, which returns no image, that is the input image itself), unless the unit's
`save_detected_map` or the `control_net_no_detectmap` setting turns them off.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from PIL import Image

from ..errors import ImageError, ImpromptError, RequestError, UnknownAdapterError
from ..errors import SHOWN, LimitError, shown
from ..models import catalog
from ..models.store import ModelStore, legacy_hash
from ..request import MAX_UNITS
from ..util.images import load_image

# The IP-Adapter preprocessors, as sd-webui-controlnet names them (internal names and labels) and Forge labels
# them, and the image encoder each one runs in those tools (None: chosen from the model, `ip-adapter-auto`).
IP_ADAPTER_MODULES = {
    "ip-adapter_clip_sd15": "ViT-H-14", "ip-adapter_clip_h": "ViT-H-14", "ip-adapter_clip_sdxl_plus_vith": "ViT-H-14",
    "ip-adapter_clip_sdxl": "ViT-bigG-14", "ip-adapter_clip_g": "ViT-bigG-14", "ip-adapter-auto": None,
    "ip-adapter_face_id": "InsightFace", "ip-adapter_face_id_plus": "InsightFace + ViT-H-14",
    "ip-adapter_pulid": "InsightFace + EVA-CLIP", "clip-vit-h (ipadapter)": "ViT-H-14",
    "clip-vit-bigg (ipadapter)": "ViT-bigG-14", "insightface+clip-h (ipadapter)": "InsightFace + ViT-H-14",
}  # fmt: skip
# GET /controlnet/module_list: the modules imprompt runs, as (internal name, label) the way the extension lists
# them: "none" first, then by its sorting priority and label, descending (ip-adapter-auto 1000, ip-adapter_clip_sd15
# 100, the others 0). The labels are what `alias_names=true` gives. PuLID is left out: imprompt does not run it.
MODULES = [("none", "none"), ("ip-adapter-auto", "ip-adapter-auto"), ("ip-adapter_clip_sd15", "ip-adapter_clip_h"),
           ("ip-adapter_face_id_plus", "ip-adapter_face_id_plus"), ("ip-adapter_face_id", "ip-adapter_face_id"),
           ("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith"),
           ("ip-adapter_clip_sdxl", "ip-adapter_clip_g")]  # fmt: skip
# The extension's module_detail for each: none needs a model, and each shows its (unused) resolution slider.
MODULE_DETAIL = {"model_free": False, "sliders": [{"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]}
PROJECTION_OF = {"ViT-H-14": 1024, "ViT-bigG-14": 1280}  # the image_embeds width each encoder gives
NAME_AND_HASH = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,10})\]\s*$")  # "ip-adapter_sd15 [6a3f6166]"
WHERE = "alwayson_scripts.controlnet.args"


@dataclass
class InputMap:
    """One input image of a unit, as the extension returns it after the generated images: for a CLIP module the
    image with its mask as alpha (255 - mask // 2; 255 where no mask), for the others the image alone."""

    where: str  # names the image in errors
    image: str  # base64, as the client sent it
    mask: str | None
    with_alpha: bool


@dataclass
class ControlNetUnits:
    units: list[dict]  # imprompt units, in order
    modules: list[str]  # the module each one named
    warnings: list[str]
    input_maps: list[InputMap] = field(default_factory=list)  # the input maps the extension returns, in order


def controlnet_units(scripts: dict, store: ModelStore) -> ControlNetUnits:
    """The IP-Adapter units of `alwayson_scripts` (its `controlnet` entry, in any letter case). Another script's
    entry with arguments would change the picture in A1111, so it is refused naming it."""
    found = ControlNetUnits([], [], [])
    for script, value in scripts.items():
        name = script if len(script) <= SHOWN and script.isprintable() else shown(script)
        if value is not None and not isinstance(value, dict):
            raise RequestError(f"alwayson_scripts.{name}: expected {{\"args\": [...]}}, got {type(value).__name__}")
        args = (value or {}).get("args")
        if args is not None and not isinstance(args, list):
            raise RequestError(f"alwayson_scripts.{name}.args: expected a list, got {type(args).__name__}")
        if args is not None and len(args) > MAX_UNITS:
            raise LimitError(f"alwayson_scripts.{name}.args: {len(args)} items, more than the {MAX_UNITS} any "
                             f"request may hold; send fewer")  # fmt: skip
        if script.lower() != "controlnet":
            if args and any(a not in (None, False, "", [], {}) for a in args):
                raise RequestError(
                    f"alwayson_scripts.{name}: imprompt runs no A1111 script but the ControlNet extension's "
                    f"IP-Adapter units; remove {name} from the request"
                )
            continue
        if not isinstance(args, list):
            raise RequestError(f"alwayson_scripts.{name}.args must be a list of ControlNet units")
        for i, unit in enumerate(args):
            _unit(i, unit, store, found)
    return found


def _unit(i: int, unit, store: ModelStore, found: ControlNetUnits) -> None:
    where = f"{WHERE}.{i}"
    if not isinstance(unit, dict):
        raise RequestError(f"{where}: a unit must be a JSON object")
    if not unit.get("enabled", False):
        why = "enabled is false" if "enabled" in unit else "enabled is not given, and the extension's default is false"
        found.warnings.append(f"{where}: unit skipped ({why})")
        return
    module = str(unit.get("module") or "none")
    model = str(unit.get("model") or "None")
    named = NAME_AND_HASH.match(model)
    name = named.group("name") if named else model
    adapter = _adapter(name, store)
    if module.lower() not in IP_ADAPTER_MODULES and not (module.lower() == "none" and adapter is not None):
        raise RequestError(
            f"{where}: a ControlNet unit (module {module!r}, model {model!r}); imprompt runs the extension's "
            f"IP-Adapter units only, not ControlNet. Remove the unit, or give an IP-Adapter module and model"
        )
    if name.lower() in ("", "none"):
        raise RequestError(f"{where}: module {module} needs an IP-Adapter model; GET /controlnet/model_list lists them")
    if adapter is None:
        store.adapter(name)  # raises UnknownAdapterError listing the adapters present (or the file's own error)
    for refused, why in (("advanced_weighting", "per-block weights: use the unit's `layers`"),
                         ("ipadapter_input", "precomputed embeddings are torch pickles, which imprompt never loads "
                                             "from a client: send the images")):  # fmt: skip
        if unit.get(refused) not in (None, [], ""):
            raise RequestError(f"{where}.{refused}: not supported ({why})")
    inputs = _images(where, unit)
    images = [image for image, _ in inputs]
    input_masks = any(m not in (None, "") for _, m in inputs) or any(
        unit.get(k) not in (None, "") for k in ("mask", "mask_image")
    )
    converted = {"adapter": name, "images": images, "scale": unit.get("weight", 1.0),
                 "start": unit.get("guidance_start", 0.0), "end": unit.get("guidance_end", 1.0)}  # fmt: skip
    region = unit.get("effective_region_mask")
    if region:  # one region for the whole unit: the mask of each of its images
        converted["masks"] = [region] * len(images)
    if input_masks:
        found.warnings.append(
            f"{where}: the input image's mask is not used by IP-Adapter preprocessors (as in the extension); "
            f"for a unit that acts only in a region, send effective_region_mask"
        )
    if named and named.group("hash").lower() != legacy_hash(adapter.path):
        found.warnings.append(
            f"{where}: model {model!r} names hash {named.group('hash')}, but {adapter.path.name} now hashes to "
            f"{legacy_hash(adapter.path)}: the file changed since the client listed it; the file there now was used"
        )
    found.units.append(converted)
    found.modules.append(module)
    save = unit.get("save_detected_map", True)
    if not isinstance(save, bool) and save is not None:
        raise RequestError(f"{where}.save_detected_map: expected true or false, got {save!r}")
    if save is not False:  # the extension's default: true
        # the extension reads a CLIP module's input as RGBA (image + mask), the others' as RGB
        runs = IP_ADAPTER_MODULES.get(module.lower()) or ""
        with_alpha = module.lower() != "none" and not runs.startswith("InsightFace")
        found.input_maps += [InputMap(f"{where}.image.{j}", image, mask or None, with_alpha)
                             for j, (image, mask) in enumerate(inputs)]  # fmt: skip


def _adapter(name: str, store: ModelStore):
    """The IP-Adapter `name` resolves to, or None when it names none (a ControlNet model, "None")."""
    if name.lower() in ("", "none"):
        return None
    try:
        return store.adapter(name)
    except UnknownAdapterError:
        return None
    except ImpromptError:  # it resolves, to a file that is broken or of another kind: say so in the plan
        return None


def _images(where: str, unit: dict) -> list[tuple[str, str | None]]:
    """The unit's images in the extension's forms: a base64 string (with the unit's `mask`), {"image", "mask"},
    the pair [image, mask], or a list of {"image", "mask"} (several images for one IP-Adapter unit); also
    `input_image`, the older name. Returns (image, input mask) pairs."""
    given = unit.get("image")
    if given in (None, "") and unit.get("input_image") not in (None, ""):
        given = unit["input_image"]
    if isinstance(given, str):
        inputs = [(given, unit.get("mask") if isinstance(unit.get("mask"), str) else None)]
    elif isinstance(given, dict):
        inputs = [(given.get("image"), given.get("mask"))]
    elif isinstance(given, (list, tuple)) and given and all(isinstance(x, dict) for x in given):
        inputs = [(x.get("image"), x.get("mask")) for x in given]
    elif isinstance(given, (list, tuple)) and len(given) == 2 and isinstance(given[0], str) \
            and (given[1] is None or isinstance(given[1], str)):  # fmt: skip
        inputs = [(given[0], given[1])]  # the extension's [image, mask]
    elif isinstance(given, (list, tuple)) and len(given) == 1 and isinstance(given[0], str):
        inputs = [(given[0], None)]
    else:
        raise RequestError(
            f"{where}.image: expected base64 image data, {{\"image\": ..., \"mask\": ...}}, or a list of those"
        )
    for j, (image, mask) in enumerate(inputs):
        if not isinstance(image, str) or not image:
            raise RequestError(f"{where}.image.{j}: an IP-Adapter unit needs an image (base64)")
        if mask is not None and not isinstance(mask, str):
            raise RequestError(f"{where}.image.{j}: a mask must be base64 image data, got {type(mask).__name__}")
    return inputs


def detected_map(item: InputMap, max_pixels: int, max_bytes: int) -> tuple[Image.Image, str | None]:
    """The picture the extension appends for one input image, and a warning where its mask could not be shown:
    for a CLIP module the image as RGBA, alpha 255 - mask // 2 (the mask's first channel; 255 where there is none),
    for the others the RGB image. The image is the one imprompt read (the engine took it under the same limits);
    the mask, which imprompt does not use, is only read here."""
    image = load_image(item.image, item.where, max_pixels, allow_paths=False, max_bytes=max_bytes)
    if not item.with_alpha:
        return image, None
    alpha, warning = Image.new("L", image.size, 255), None
    if item.mask:
        try:
            mask = load_image(item.mask, item.where + ".mask", max_pixels, allow_paths=False, max_bytes=max_bytes)
        except ImageError as exc:
            mask, warning = None, f"{exc}; its input map is returned without the mask"
        if mask is not None and mask.size != image.size:
            warning = (f"{item.where}.mask: {mask.size[0]}x{mask.size[1]} is not the image's size "
                       f"({image.size[0]}x{image.size[1]}), which the extension refuses; its input map is returned "
                       f"without the mask")  # fmt: skip
        elif mask is not None:
            alpha = mask.getchannel("R").point(lambda v: 255 - v // 2)
    image = image.copy()
    image.putalpha(alpha)
    return image, warning


def module_warnings(modules: list[str], units_info: list[dict], store: ModelStore) -> list[str]:
    """A module that runs another encoder (in the extension) than the adapter's weights need, a CLIP module for a
    FaceID adapter or a FaceID module for a CLIP adapter included: what was asked, what imprompt used instead."""
    warnings = []
    for i, (module, unit) in enumerate(zip(modules, units_info)):
        named = IP_ADAPTER_MODULES.get(module.lower()) if module else None
        if named is None:
            continue  # ip-adapter-auto, or an SD.Next unit: no encoder to contradict
        faceid = unit["consumes"] == "faceid_embeds"
        if named.startswith("InsightFace") or faceid:
            if named.startswith("InsightFace") != faceid:
                warnings.append(
                    f"{WHERE}.{i}: module {module} runs {named} in the ControlNet extension, but {unit['adapter']}'s "
                    f"weights consume {unit['consumes']}[{unit['embed_dim']}]; imprompt used what they need: "
                    f"{unit['encoder']}"
                )
            continue
        used = _encoder_family(unit, store)
        if used is not None and used != named:
            warnings.append(
                f"{WHERE}.{i}: module {module} runs CLIP {named} in the ControlNet extension, but {unit['adapter']}'s "
                f"weights consume {unit['consumes']}[{unit['embed_dim']}], which {used} gives; imprompt used the "
                f"encoder they need: {unit['encoder']}"
            )
    return warnings


def _encoder_family(unit: dict, store: ModelStore) -> str | None:
    """The published encoder family of what served the unit, from what the adapter consumes or, for custom widths,
    from the chosen encoder's projection width."""
    family = catalog.family_by_output(unit["consumes"], unit["embed_dim"])
    if family is not None:
        return family.name
    try:
        projection = store.encoder(unit["encoder"]).spec.projection_dim
    except ImpromptError:
        return None
    return next((name for name, width in PROJECTION_OF.items() if width == projection), None)


def module_list(alias_names: bool = False) -> dict:
    """GET /controlnet/module_list as the extension answers it: internal names, or labels with `alias_names`."""
    names = [label if alias_names else name for name, label in MODULES]
    return {"module_list": names, "module_detail": {name: dict(MODULE_DETAIL) for name in names}}


def model_list(store: ModelStore) -> list[str]:
    """The extension's model names for what imprompt can run: the IP-Adapters, as `stem [hash]`."""
    return [f"{e.name} [{legacy_hash(e.path)}]" for e in sorted(store.adapters, key=lambda e: e.name.lower())]
