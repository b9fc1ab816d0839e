"""The A1111 ControlNet extension's units (`alwayson_scripts.controlnet.args`: IP-Adapter and ControlNet), and its endpoints.

Most clients that send IP-Adapter requests over HTTP do it through sd-webui-controlnet's API (or Forge's). A unit
names a preprocessor (`module`) and a model; in A1111 the module decides the image encoder, so
`ip-adapter_clip_sd15` with `ip-adapter_sd15_vit-G` ends in `mat1 and mat2 shapes cannot be multiplied`. Here, as
everywhere in imprompt, the adapter's weights decide the encoder; a module that names another one is reported as a
warning in the response's `info`. The other units are ControlNet units: each becomes a `ControlNetUnit` with the
extension's rules for its fields (module by name or label, model by "name [hash]" / stem / closest name, the
sliders' out-of-range values replaced by their defaults with the extension's log line); a field that would change
the picture and that imprompt does not do (masks, regions, per-block weights, inpaint / reference modules) is
refused naming it.

As the extension does, the response carries each enabled unit's map after the generated images (for an IP-Adapter
preprocessor, which returns no image, that is the input image itself; for a ControlNet unit its detected map at the
generation size), unless the unit's `save_detected_map` or the `control_net_no_detectmap` setting turns them off.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from PIL import Image

from .. import preprocess
from ..errors import ImageError, ImpromptError, RequestError, UnknownAdapterError, UnknownControlNetError
from ..errors import SHOWN, LimitError, UnknownPreprocessorError, renamed, shown
from ..models import catalog
from ..models.store import Entry, ModelStore, controlnet_file, controlnet_hash, legacy_hash
from ..preprocess.resize import RESIZE, resize_mode
from ..request import CONTROL_MODES, MAX_UNITS
from ..util.images import load_image

log = logging.getLogger("imprompt")

# The IP-Adapter preprocessors, as sd-webui-controlnet names them (internal names and labels) and Forge labels
# them, and the image encoder each one runs in those tools (None: chosen from the model, `ip-adapter-auto`).
IP_ADAPTER_MODULES = {
    "ip-adapter_clip_sd15": "ViT-H-14", "ip-adapter_clip_h": "ViT-H-14", "ip-adapter_clip_sdxl_plus_vith": "ViT-H-14",
    "ip-adapter_clip_sdxl": "ViT-bigG-14", "ip-adapter_clip_g": "ViT-bigG-14", "ip-adapter-auto": None,
    "ip-adapter_face_id": "InsightFace", "ip-adapter_face_id_plus": "InsightFace + ViT-H-14",
    "ip-adapter_pulid": "InsightFace + EVA-CLIP", "clip-vit-h (ipadapter)": "ViT-H-14",
    "clip-vit-bigg (ipadapter)": "ViT-bigG-14", "insightface+clip-h (ipadapter)": "InsightFace + ViT-H-14",
    "instant_id_face_embedding": "InsightFace antelopev2",
}  # fmt: skip
# InstantID in the extension is two units: the face embedding one (the adapter, its weight the adapter's scale), then
# a keypoints one (the IdentityNet, its weight the net's, its image the picture whose face's keypoints it reads):
# imprompt runs them as one InstantID unit (`conditioning/instantid.py`)
INSTANTID_KEYPOINTS = "instant_id_face_keypoints"
# GET /controlnet/module_list: the modules imprompt runs, as (internal name, label) the way the extension lists
# them: "none" first, then by its sorting priority and label, descending (ip-adapter-auto 1000, ip-adapter_clip_sd15
# 100, the others 0). The labels are what `alias_names=true` gives. PuLID is left out: imprompt does not run it.
MODULES = [("none", "none"), ("ip-adapter-auto", "ip-adapter-auto"), ("ip-adapter_clip_sd15", "ip-adapter_clip_h"),
           ("ip-adapter_face_id_plus", "ip-adapter_face_id_plus"), ("ip-adapter_face_id", "ip-adapter_face_id"),
           ("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith"),
           ("ip-adapter_clip_sdxl", "ip-adapter_clip_g"), ("instant_id_face_embedding", "instant_id_face_embedding"),
           (INSTANTID_KEYPOINTS, INSTANTID_KEYPOINTS)]  # fmt: skip
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
class ControlMap:
    """A ControlNet unit's detected map, as the extension appends it: the engine's control image of the request's
    ControlNet unit `index`, fitted to the generation size with the unit's resize mode."""

    index: int
    resize_mode: str


@dataclass
class ControlNetUnits:
    units: list[dict]  # imprompt IP-Adapter units, in order
    modules: list[str]  # the module each one named
    warnings: list[str]
    input_maps: list[InputMap | ControlMap] = field(default_factory=list)  # the maps the extension returns, in order
    controlnets: list[dict] = field(default_factory=list)  # imprompt ControlNet units, in order
    wheres: list[str] = field(default_factory=list)  # the client's name for each ControlNet unit (errors name it)
    instantid: list[int] = field(default_factory=list)  # InstantID embedding units (in `units`) awaiting keypoints


def controlnet_units(scripts: dict, store: ModelStore, init_image: str | None = None) -> ControlNetUnits:
    """The units of `alwayson_scripts` (its `controlnet` entry, in any letter case): IP-Adapter units and
    ControlNet units. `init_image`: an img2img request's first init image, which a ControlNet unit without an image
    reads (as the extension does). Another script's entry with arguments would change the picture in A1111, so it
    is refused naming it."""
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
            _unit(i, unit, store, found, init_image)
    for waiting in found.instantid:  # an embedding unit alone: the adapter alone, as in the extension
        found.units[waiting]["controlnet_scale"] = 0.0
    return found


def _unit(i: int, unit, store: ModelStore, found: ControlNetUnits, init_image: str | None = None) -> None:
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
    if module.lower() == INSTANTID_KEYPOINTS:
        instantid_keypoints(where, unit, model, store, found)
        return
    if module.lower() not in IP_ADAPTER_MODULES and not (module.lower() == "none" and adapter is not None):
        control_unit(where, unit, module, model, store, found, init_image)
        return
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
    if module.lower() == "instant_id_face_embedding":
        found.instantid.append(len(found.units))
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


def instantid_keypoints(where: str, unit: dict, model: str, store: ModelStore, found: ControlNetUnits) -> None:
    """The extension's InstantID keypoints unit, joined to the embedding unit before it: its model the IdentityNet,
    its weight the net's scale, its image (when not the face's) the picture the keypoints come from."""
    if not found.instantid:
        raise RequestError(f"{where}.module: {INSTANTID_KEYPOINTS} reads the face of an instant_id_face_embedding unit "
                           f"before it (as in the ControlNet extension); put that unit first")  # fmt: skip
    for name, default in (("guidance_start", 0.0), ("guidance_end", 1.0)):
        if unit.get(name, default) != default:
            raise RequestError(f"{where}.{name}: imprompt runs InstantID's IdentityNet over every step, as InstantX's "
                               f"pipeline does; leave it at {default}")  # fmt: skip
    identitynet_fields(where, unit, found)
    target = found.units[found.instantid.pop(0)]
    target["identitynet"] = find_controlnet(f"{where}.model", model, store).name
    target["controlnet_scale"] = unit.get("weight", 1.0)
    image = _images(where, unit)[0][0]
    if image != target["images"][0]:
        target["pose_image"] = image


def identitynet_fields(where: str, unit: dict, found: ControlNetUnits) -> None:
    """The keypoints unit's ControlNet fields, which in the extension change its IdentityNet as any ControlNet's:
    imprompt runs the IdentityNet as InstantX's pipeline does (Balanced, the weight alone; the keypoints drawn at
    the picture's own size, stretched to the output), so a field that would change the picture there is refused
    (the mode, the per-residual scales) or, where the difference is in the keypoint map's drawing, warned of."""
    if control_mode(f"{where}.control_mode", unit.get("control_mode", "Balanced")) != "Balanced":
        raise RequestError(f"{where}.control_mode: imprompt runs InstantID's IdentityNet Balanced, as InstantX's "
                           f"pipeline does; send \"Balanced\" (0) or leave control_mode out")  # fmt: skip
    if unit.get("advanced_weighting") is not None:
        raise RequestError(f"{where}.advanced_weighting: imprompt scales InstantID's IdentityNet by the unit's weight "
                           f"alone, as InstantX's pipeline does; remove advanced_weighting")  # fmt: skip
    mode = _resize_mode(f"{where}.resize_mode", unit.get("resize_mode", "Crop and Resize"))
    if mode != "Just Resize":
        found.warnings.append(f"{where}.resize_mode: {mode!r} ignored: imprompt stretches InstantID's keypoint map "
                              f"to the output size, as InstantX's pipeline does (\"Just Resize\"), where the "
                              f"extension would {'crop' if mode == 'Crop and Resize' else 'pad'} it; a face picture "
                              f"of another aspect ratio than the output gives other keypoints there")  # fmt: skip
    for given in ("processor_res", "pixel_perfect"):
        if unit.get(given) not in (None, -1, False):
            found.warnings.append(f"{where}.{given}: ignored: imprompt draws InstantID's keypoints at the picture's "
                                  f"own size, as InstantX's pipeline does, not at a preprocessor resolution")  # fmt: skip


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


# The extension's modules imprompt does not run, by what they start with, and why (a client sending one hears it).
NOT_RUN = {
    "inpaint": "inpainting ControlNets (they read the img2img mask and masked image)",
    "reference": "reference-only attention injection",
    "revision": "Revision (CLIP image embeddings as prompt)",
    "clip_vision": "CLIP-vision style adapters", "t2ia_style": "CLIP-vision style adapters",
    "shuffle": "content shuffle", "instant_id": "InstantID", "ip-adapter_pulid": "PuLID",
    "ip-adapter_clip": "IP-Adapter modules with a ControlNet model",
}  # fmt: skip
# The extension's ControlNet Union control types (its ControlNetUnionControlType), in xinsir ProMax's index order,
# and the tags its `from_str` maps to them.
UNION_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
UNION_TAGS = {"openpose": 0, "depth": 1, "scribble": 2, "softedge": 2, "canny": 3, "lineart": 3, "mlsd": 3,
              "normalmap": 4, "segmentation": 5, "tile": 6, "blur": 6, "inpaint": 7}  # fmt: skip
HR_OPTIONS = ("Both", "Low res only", "High res only")
# Fields of a ControlNet unit that would change the picture and that imprompt does not do.
CONTROL_REFUSED = {
    "effective_region_mask": "a region the unit acts in",
    "mask": "ControlNet masks (the extension's inpainting and masked units)",
    "mask_image": "ControlNet masks (the extension's inpainting and masked units)",
    "ipadapter_input": "IP-Adapter embeddings, which a ControlNet unit does not take",
    "batch_images": "batch folders", "batch_image_files": "batch folders", "animatediff_batch": "AnimateDiff batches",
    "use_preview_as_input": "a preview image as input", "generated_image": "a preview image as input",
}  # fmt: skip


def control_unit(where: str, unit: dict, module: str, model: str, store: ModelStore, found: ControlNetUnits,
                 init_image: str | None = None) -> None:  # fmt: skip
    """One of the extension's ControlNet units -> an imprompt ControlNet unit (appended to `found`), with the
    extension's defaults and rules for each field."""
    for name, what in CONTROL_REFUSED.items():
        if unit.get(name) not in (None, False, "", [], {}):
            raise RequestError(f"{where}.{name}: {what} is not supported; remove it")
    pre = find_module(f"{where}.module", module)
    if model.lower() in ("", "none"):
        raise RequestError(f'{where}.model: module {module!r} needs a ControlNet model ("None" given, which the '
                           f"extension refuses too); GET /controlnet/model_list lists them")  # fmt: skip
    entry = find_controlnet(f"{where}.model", model, store)
    named = NAME_AND_HASH.match(model)
    if named and entry.path.exists():
        now, given = controlnet_hash(entry.path), named.group("hash").lower()
        if given not in (now, store.a1111_hash(controlnet_file(entry.path), len(given))):
            found.warnings.append(f"{where}: model {model!r} names hash {named.group('hash')}, but {entry.path.name} "
                                  f"now hashes to {now}: the file changed since the client listed it; the file there "
                                  f"now was used")  # fmt: skip
    if "guidance" in unit and "guidance_end" in unit:
        raise RequestError(f"{where}: both guidance (the old name) and guidance_end given; send guidance_end only")
    weight = _number(where, "weight", unit.get("weight", 1.0), 0.0, 2.0)
    start = _number(where, "guidance_start", unit.get("guidance_start", 0.0), 0.0, 1.0)
    end = _number(where, "guidance_end", unit.get("guidance_end", unit.get("guidance", 1.0)), 0.0, 1.0)
    if start > end:
        raise RequestError(f"{where}: guidance_start ({start}) is after guidance_end ({end}); use start <= end")
    hr_option = unit.get("hr_option", "Both")
    if hr_option not in HR_OPTIONS:  # with hires fix refused, any of them leaves the picture as it is
        raise RequestError(f"{where}.hr_option: {shown(hr_option)} is not one of {list(HR_OPTIONS)}")
    pixel_perfect = unit.get("pixel_perfect", False)
    if not isinstance(pixel_perfect, bool):
        raise RequestError(f"{where}.pixel_perfect: expected true or false, got {shown(pixel_perfect)}")
    image, mode = _control_image(where, unit, init_image)
    if mode is None:
        mode = _resize_mode(f"{where}.resize_mode", unit.get("resize_mode", "Crop and Resize"))
    converted = {
        "model": entry.name, "image": image, "module": pre.name, "weight": weight, "start": start, "end": end,
        "control_mode": control_mode(f"{where}.control_mode", unit.get("control_mode", "Balanced")),
        "resize_mode": mode, "pixel_perfect": pixel_perfect,
        **slider_values(module, pre, unit.get("processor_res"), unit.get("threshold_a"), unit.get("threshold_b"),
                        where),
    }  # fmt: skip
    if unit.get("advanced_weighting") is not None:  # replaces the weight and the mode's scales, as the extension
        converted["advanced_weighting"] = unit["advanced_weighting"]
    union = _union_type(f"{where}.union_control_type", unit.get("union_control_type"))
    if union is not None and getattr(entry.spec, "union", False):  # the extension reads it for Union models only
        converted["union_type"] = union
    found.controlnets.append(converted)
    found.wheres.append(where)
    save = unit.get("save_detected_map", True)
    if not isinstance(save, bool) and save is not None:
        raise RequestError(f"{where}.save_detected_map: expected true or false, got {save!r}")
    if save is not False:
        found.input_maps.append(ControlMap(len(found.controlnets) - 1, mode))


def find_module(where: str, module) -> preprocess.Preprocessor:
    """The preprocessor a unit names (the extension's internal names and labels); one of the extension's modules
    that imprompt does not run is refused saying what it is."""
    try:
        return preprocess.find(module)
    except UnknownPreprocessorError as exc:
        text = str(module).lower()
        why = next((what for start, what in NOT_RUN.items() if text.startswith(start)), None)
        if why is not None:
            raise UnknownPreprocessorError(f"{where}: {shown(module)} runs {why}, which imprompt does not do; "
                                           f"GET /controlnet/module_list lists the modules it runs") from None  # fmt: skip
        raise UnknownPreprocessorError(f"{where}: {exc}") from None


def find_controlnet(where: str, model: str, store: ModelStore) -> Entry:
    """The ControlNet a unit names, as the extension finds it: "name [hash]", a name or stem, else the shortest
    name that contains what was sent (its `find_closest_lora_model_name`)."""
    try:
        return store.controlnet(model)
    except UnknownControlNetError as exc:
        named = NAME_AND_HASH.match(model)
        wanted = (named.group("name") if named else model).lower()
        close = sorted((e for e in store.controlnets if wanted and wanted in store.controlnet_title(e).lower()),
                       key=lambda e: len(store.controlnet_title(e)))  # fmt: skip
        if close:
            return close[0]
        raise UnknownControlNetError(f"{where}: {exc}") from None
    except ImpromptError as exc:
        raise renamed(exc, f"{where}: {exc}") from None


def _number(where: str, name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{where}.{name}: expected a number from {low:g} to {high:g}, got {shown(value)}")
    return float(value)


def control_mode(where: str, value) -> str:
    """The extension's control mode: its names, or (as its API took them before 2024-05) 0, 1, 2 in that order."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(CONTROL_MODES):
        return CONTROL_MODES[value]
    if isinstance(value, str) and value.strip().isdigit() and int(value) < len(CONTROL_MODES):
        return CONTROL_MODES[int(value)]
    if value in CONTROL_MODES:
        return value
    raise RequestError(f"{where}: {shown(value)} is not a control mode; expected one of {list(CONTROL_MODES)} "
                       f"or 0, 1, 2")  # fmt: skip


def _resize_mode(where: str, value) -> str:
    try:
        return resize_mode(value)
    except RequestError as exc:
        raise RequestError(f"{where}: {str(exc).removeprefix('invalid request: ')}") from None


def slider_values(module: str, pre, processor_res, threshold_a, threshold_b, where: str = "") -> dict:
    """processor_res, threshold_a and threshold_b as the extension's unit validation makes them: a value outside
    its slider's range (-1, the API's default, included) becomes the slider's default, logged (but for -1) with
    the extension's own line, which clients' tests look for."""
    values = {}
    for field, given, slider, kind in (("processor_res", processor_res, pre.resolution, int),
                                       ("threshold_a", threshold_a, pre.slider_a, float),
                                       ("threshold_b", threshold_b, pre.slider_b, float)):  # fmt: skip
        value = -1 if given is None else given
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f"{where}.{field}: expected a number, got {shown(value)}")
        value = kind(value)
        if not slider.minimum <= value <= slider.maximum:
            if value != -1:
                log.info(f"[{module}.{field}] Invalid value({value}), using default value {slider.value}.")
            value = slider.value
        if field == "processor_res":
            value = int(value) if slider.visible else None  # a module without a resolution runs at its own
        values[field] = value
    return values


def _union_type(where: str, value) -> int | None:
    """The extension's union_control_type: its names (or the tags it maps to them) or the index; "Unknown": the
    control type is taken from the preprocessor."""
    if value is None or value == "Unknown":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(UNION_TYPES):
            return value
    elif isinstance(value, str):
        names = {n.lower(): i for i, n in enumerate(UNION_TYPES)}
        if value.lower() in names or value.lower() in UNION_TAGS:
            return names.get(value.lower(), UNION_TAGS.get(value.lower()))
    raise RequestError(f"{where}: {shown(value)} is not one of {list(UNION_TYPES)} (or 0..{len(UNION_TYPES) - 1}), "
                       f"or Unknown")  # fmt: skip


def _control_image(where: str, unit: dict, init_image: str | None) -> tuple[str, str | None]:
    """A ControlNet unit's one image (base64), and the resize mode it forces: an img2img request's init image when
    the unit has none (the extension then resizes it with the request's resize_mode, 0: Just Resize)."""
    given = unit.get("image")
    if given in (None, "", []) and unit.get("input_image") not in (None, ""):
        given = unit["input_image"]
    if given in (None, "", []):
        if init_image:
            return init_image, RESIZE
        raise RequestError(f"{where}.image: a ControlNet unit needs an image (base64), or an img2img request's "
                           f"init_images to read")  # fmt: skip
    inputs = _images(where, {"image": given})
    if len(inputs) > 1:
        raise RequestError(f"{where}.image: {len(inputs)} images; a ControlNet unit reads one (the extension's batch "
                           f"inputs are not supported)")  # fmt: skip
    image, mask = inputs[0]
    if mask:
        raise RequestError(f"{where}.image.mask: ControlNet masks (the extension's inpainting and masked units) are "
                           f"not supported; send the image alone")  # fmt: skip
    return image, None


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
        faceid = unit["consumes"] in ("faceid_embeds", "face_embeds")
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


# The extension's sorting priorities (its `sorting_priority`; 0 for the others): module_list is "none" first, then
# the rest by priority and label, descending.
PRIORITY = {"none": 10, "canny": 100, "invert": 20, "openpose_full": 100, "tile_resample": 100, "lineart_standard": 100,
            "recolor_luminance": 100, "ip-adapter-auto": 1000, "ip-adapter_clip_sd15": 100}  # fmt: skip
# Every control type the extension groups its modules and models by (`/controlnet/control_types`): a type whose
# preprocessor imprompt does not run still takes finished maps (module "none") for its models.
CONTROL_TYPES = ("Canny", "Depth", "NormalMap", "OpenPose", "MLSD", "Lineart", "SoftEdge", "Scribble", "Segmentation",
                 "Shuffle", "Tile", "Inpaint", "InstructP2P", "Reference", "Recolor", "Revision", "T2I-Adapter",
                 "IP-Adapter", "Instant-ID", "SparseCtrl")  # fmt: skip
# how the extension matches model names to a type (its `tag_to_filters`), beside the type's own name
TYPE_FILTERS = {"instructp2p": ["ip2p"], "segmentation": ["seg"], "normalmap": ["normal"],
                "t2i-adapter": ["t2i_adapter", "t2iadapter", "t2ia"], "ip-adapter": ["ip_adapter", "ipadapter"],
                "openpose": ["openpose", "densepose"], "instant-id": ["instant_id", "instantid"],
                "scribble": ["sketch"], "tile": ["blur"]}  # fmt: skip


@dataclass(frozen=True)
class Module:
    name: str  # the extension's internal name (module_list without alias_names)
    label: str
    tags: tuple[str, ...]
    detail: dict


def modules(roots=None) -> list[Module]:
    """The modules that can run here (the preprocessors whose weights are in `roots`' trees, None: all, and the
    IP-Adapter ones), in the extension's order."""
    found = [Module(p.module, p.label, p.tags, {"model_free": False, "sliders": [dict(s) for s in p.sliders]})
             for p in preprocess.PREPROCESSORS.values() if roots is None or _weights_present(p, roots)]  # fmt: skip
    found += [Module(name, label, ("IP-Adapter",), MODULE_DETAIL) for name, label in MODULES if name != "none"]
    rest = sorted((m for m in found if m.name != "none"), reverse=True,
                  key=lambda m: str(PRIORITY.get(m.name, 0)).zfill(8) + m.label)  # fmt: skip
    return [m for m in found if m.name == "none"] + rest


def _weights_present(pre, roots) -> bool:
    try:
        preprocess.locate_weights(pre, roots)
        return True
    except ImpromptError:
        return False


def module_list(alias_names: bool = False, roots=None) -> dict:
    """GET /controlnet/module_list as the extension answers it: internal names, or labels with `alias_names`, and
    each one's sliders; the preprocessors whose weights `roots` lack are left out (they cannot run here)."""
    listed = modules(roots)
    names = [m.label if alias_names else m.name for m in listed]
    detail = {name: {"model_free": m.detail["model_free"], "sliders": [dict(s) for s in m.detail["sliders"]]}
              for name, m in zip(names, listed)}  # fmt: skip
    return {"module_list": names, "module_detail": detail}


def model_list(store: ModelStore) -> list[str]:
    """The extension's model names for what imprompt can run: the IP-Adapters and the ControlNets, as
    `stem [hash]` (its legacy hash; a diffusers folder: its name and its weights' hash)."""
    listed = [(e.name, f"{e.name} [{legacy_hash(e.path)}]") for e in store.adapters]
    listed += [(e.name, store.controlnet_title(e)) for e in store.controlnets if _runs(e)]
    return [title for _, title in sorted(listed, key=lambda item: item[0].lower())]


def _runs(entry: Entry) -> bool:
    return entry.spec is not None and entry.spec.kind == "controlnet" and not entry.spec.unsupported


def control_types(store: ModelStore) -> dict:
    """GET /controlnet/control_types: per type, its modules (labels, "none" included), the models whose names
    match it (the extension's filters), and its default module and model."""
    listed = modules(store.roots)
    models = ["None"] + model_list(store)
    answer = {"All": {"module_list": [m.label for m in listed], "model_list": models, "default_option": "none",
                      "default_model": "None"}}  # fmt: skip
    for tag in sorted(set(CONTROL_TYPES) | {t for m in listed for t in m.tags}):
        pattern = tag.lower()
        filters = [pattern, *TYPE_FILTERS.get(pattern, [])] + (["union"] if pattern in UNION_TAGS else [])
        matching = ["None"] + [m for m in models[1:] if any(f in m.lower() for f in filters)]
        default = "None" if len(matching) == 1 else next((m for m in matching if "11" in m.split("[")[0]), matching[1])
        labels = [m.label for m in listed if tag in m.tags or m.label == "none"]
        answer[tag] = {"module_list": labels, "model_list": matching,
                       "default_option": labels[1] if len(labels) > 1 else labels[0], "default_model": default}  # fmt: skip
    return {"control_types": answer}


# The extension's /controlnet/detect refusals (its texts, which clients may compare), then imprompt's why.
DETECT_UNSUPPORTED = ("clip_vision", "revision_clipvision", "revision_ignore_prompt", "ip-adapter-auto")


def detect_module(name) -> preprocess.Preprocessor:
    """The preprocessor POST /controlnet/detect runs, refused with the extension's 422 texts."""
    if name in DETECT_UNSUPPORTED or str(name).lower() in IP_ADAPTER_MODULES:
        raise RequestError(f"Module not supported: {shown(name)} returns no image (an image encoder's input); "
                           f"detect runs the preprocessors that make control maps")  # fmt: skip
    try:
        return preprocess.find(name)
    except UnknownPreprocessorError:
        raise RequestError(f"Module not available: {shown(name)} is not a preprocessor imprompt runs; "
                           f"GET /controlnet/module_list lists them") from None  # fmt: skip
