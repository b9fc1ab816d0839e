"""SD.Next's control API, its PuLID script and the ControlNet extension's detect body, mapped onto imprompt's request.

`POST /sdapi/v1/control`, `GET /sdapi/v1/preprocessors`, `GET /sdapi/v1/controlnets`.

SD.Next's defaults are SD.Next's (`steps` 20, `cfg_scale` 6, `denoising_strength` 0.3, the output the size of the
first input image, else `width_before` x `height_before`, 1024 x 1024). Its `control` units are ControlNet units:
`process` (a preprocessor: SD.Next's names or the extension's), `model`, `strength`, `start`, `end`, `override` /
`image` (the unit's input; `override` wins; else the request's first `inputs`), `mode` (the control type of a Union
model; "default" is its first, as in SD.Next), `process_params`. imprompt runs the A1111 extension's preprocessors
(at processor resolution 512), not SD.Next's own implementations: a map made here from the same picture differs
from SD.Next's by its resizing. `guess` (diffusers' guess mode) is refused: the nearest of the extension's control
modes, "ControlNet is more important", uses other layer scales (0.825 ** (12 - i) against diffusers' logspace, and a
mid block at 0.56 on SDXL), so imprompt does not pass one off as the other.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from ..conditioning.ip_adapter import fits
from ..errors import ImpromptError, RequestError, UnsupportedError, renamed, shown
from ..models import catalog
from ..models.store import ModelStore
from ..preprocess import PREPROCESSORS
from ..preprocess.resize import CROP, RESIZE, fit
from ..request import MAX_IMAGES, MAX_UNITS, SCALE_RANGE
from ..result import Result
from ..util.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, load_image
from .a1111 import Converted, Txt2ImgPayload, from_sdnext_payload, png_base64, to_request
from .controlnet import find_controlnet, find_module


class DetectPayload(BaseModel):
    """POST /controlnet/detect's body, with the extension's defaults (-1: the slider's default)."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
    controlnet_processor_res: int | float = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)  # no module here reads one
    low_vram: bool = False  # memory, not pixels


# SD.Next's control request: what imprompt reads, with SD.Next's defaults (modules/control/run.py control_run).
DEFAULTS = {"prompt": "", "negative_prompt": "", "steps": 20, "seed": -1, "cfg_scale": 6.0, "sampler_name": "Default",
            "batch_count": 1, "batch_size": 1, "clip_skip": 1.0, "denoising_strength": 0.3, "input_type": 0,
            "width_before": 1024, "height_before": 1024}  # fmt: skip
READ = {*DEFAULTS, "inputs", "inits", "control", "unit_type", "ip_adapter", "face", "width", "height"}
IGNORED = {"send_images", "save_images", "is_generator", "state", "resize_name_before",
           "image_cfg_scale",  # instruct-pix2pix pipelines' image guidance: none of imprompt's takes it
           "refiner_steps", "refiner_start", "refiner_prompt", "refiner_negative",  # act only with a refiner model
           "hdr_mode", "hdr_boundary", "hdr_threshold", "hdr_max_center", "hdr_max_boundry", "hdr_color_picker",
           "pag_adaptive"}  # parameters of corrections that are off (`OFF`)  # fmt: skip
# honoured only at the values SD.Next treats as off
OFF = {"enable_hr": (False, None), "mask": (None, ""), "tiling": (False, None), "hidiffusion": (False, None),
       "detailer_enabled": (False, None), "styles": (None, []), "script_name": (None, "", "None"),
       "alwayson_scripts": (None, {}), "subseed_strength": (0, None), "video_type": (None, "None"),
       "xyz": (None,), "init_control": (None, []), "resize_mode_after": (0, None), "resize_mode_mask": (0, None),
       "extra": (None, {}), "pag_scale": (0, None), "cfg_end": (1, None), "vae_type": ("Full", None),
       "hdr_clamp": (False, None), "hdr_maximize": (False, None), "hdr_brightness": (0, None), "hdr_color": (0, None),
       "hdr_sharpen": (0, None), "hdr_tint_ratio": (0, None)}  # fmt: skip
UNIT_READ = {"process", "model", "strength", "start", "end", "override", "image", "unit_type", "mode", "guess",
             "process_params", "control_mode"}  # fmt: skip
UNIT_OTHER_TYPES = {"factor", "attention", "fidelity", "query_weight", "adain_weight"}  # T2I / reference units' only
# process_params imprompt reads: SD.Next's names -> the unit's fields (per preprocessor, or for any: None)
PROCESS_PARAMS = {("canny", "low_threshold"): "threshold_a", ("canny", "high_threshold"): "threshold_b",
                  (None, "detect_resolution"): "processor_res"}  # fmt: skip
# SD.Next's names for the preprocessors imprompt runs that SD.Next has too (others are listed by the extension's)
SDNEXT_NAMES = {"none": "None", "canny": "Canny", "dw_openpose_full": "DWPose", "lineart_realistic": "LineArt Realistic",
                "softedge_hed": "HED", "depth_anything": "Depth Anything"}  # fmt: skip
SDNEXT_PARAMS = {"canny": {"low_threshold": 100, "high_threshold": 200}}


@dataclass
class ControlConverted(Converted):
    iterations: int = 1  # SD.Next's batch_count


def from_control_payload(payload: dict, store: ModelStore, settings: dict | None = None,
                         limits: tuple[int, int] = (DEFAULT_MAX_PIXELS, DEFAULT_MAX_BYTES)) -> ControlConverted:  # fmt: skip
    """An SD.Next /sdapi/v1/control payload -> a request (its ControlNet units, IP-Adapter units and generation
    fields, with SD.Next's defaults)."""
    if not isinstance(payload, dict):
        raise RequestError(f"request must be a JSON object, got {type(payload).__name__}")
    given = {**DEFAULTS, **{k: v for k, v in payload.items() if v is not None}}
    warnings = []
    for name, value in payload.items():
        if name in READ or name in IGNORED or value is None:
            continue
        if name == "script_name" and is_pulid_script(value):
            raise UnsupportedError("script_name: SD.Next's PuLID script is read on /sdapi/v1/txt2img and img2img, not "
                                   "with control units; send it there, or a PuLID unit in ip_adapter")  # fmt: skip
        if name in OFF:
            if value not in OFF[name]:
                raise RequestError(f"{name}: {shown(value)} asks for what imprompt does not do; leave it out")
        elif name == "diffusers_guidance_rescale" and payload.get("control"):
            continue  # SD.Next passes it only to pipelines that take it, and its ControlNet pipelines do not
        elif name == "resize_mode_before":
            if value not in (0, None) and payload.get("resize_name_before") not in (None, "None"):
                raise RequestError("resize_mode_before: resizing the input before control is not supported; send "
                                   "the input at the size wanted")  # fmt: skip
        else:
            warnings.append(f"{name}: not applied by imprompt (an SD.Next control field it does not read); ignored")
    inputs = _strings("inputs", given.get("inputs"))
    inits = _strings("inits", given.get("inits"))
    if given["input_type"] not in (0, 1, 2):
        raise RequestError(f"input_type: {shown(given['input_type'])} is not 0 (control only), 1 (init = input) or "
                           f"2 (separate init images)")  # fmt: skip
    first = load_image(inputs[0], "inputs.0", limits[0], allow_paths=False, max_bytes=limits[1]) if inputs else None
    if first is not None:  # SD.Next generates at the input's size
        width, height = first.size
    else:
        width, height = given["width_before"], given["height_before"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 64 for v in (width, height)):
        raise RequestError(f"width_before / height_before: expected whole numbers from 64, got {shown(width)} x "
                           f"{shown(height)}")  # fmt: skip
    size = (width // 8 * 8, height // 8 * 8)
    if size != (width, height):
        warnings.append(f"the output is {size[0]}x{size[1]}: {width}x{height} rounded down to multiples of 8 (the "
                        f"VAE's blocks)")  # fmt: skip
    for name in ("width", "height"):
        if name in payload and payload[name] != size[name == "height"]:
            warnings.append(f"{name}={shown(payload[name])} is not read: SD.Next sizes the output from the first input "
                            f"image, else width_before / height_before")  # fmt: skip
    fields: dict[str, Any] = {k: given[k] for k in ("prompt", "negative_prompt", "seed", "steps", "cfg_scale",
                                                  "batch_size", "ip_adapter", "face") if k in given}  # fmt: skip
    fields |= {"width": size[0], "height": size[1], "override_settings": {}}
    if given["sampler_name"] not in (None, "", "Default"):
        fields["sampler_name"] = given["sampler_name"]
    clip_skip = given["clip_skip"]
    if isinstance(clip_skip, (int, float)) and not isinstance(clip_skip, bool) and float(clip_skip).is_integer():
        clip_skip = int(clip_skip)
    fields["clip_skip"] = clip_skip
    img2img = given["input_type"] in (1, 2)
    if given["input_type"] == 1:
        if not inputs:
            raise RequestError("input_type 1 (init image = input) needs inputs: send the image in inputs")
        fields["init_images"] = inputs[:1]
    elif given["input_type"] == 2:
        if not inits:
            raise RequestError("input_type 2 (separate init image) needs inits: send the init image in inits")
        fields["init_images"] = inits[:1]
    elif inits:
        warnings.append("inits: not read with input_type 0 (control only), as in SD.Next; send input_type 2 to "
                        "start from them")  # fmt: skip
    if img2img:
        fields["denoising_strength"] = given["denoising_strength"]
    units = given.get("control") or []
    if not isinstance(units, list):
        raise RequestError("control must be a list of control units")
    if len(units) > MAX_UNITS:
        raise RequestError(f"control: {len(units)} units, more than the {MAX_UNITS} any request may hold; send fewer")
    default_type = given.get("unit_type") or "controlnet"
    fields["controlnets"] = [_unit(i, u, default_type, inputs, store, warnings) for i, u in enumerate(units)]
    iterations = given["batch_count"]
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= 16:
        raise RequestError(f"batch_count: expected a whole number from 1 to 16, got {shown(iterations)}")
    try:
        converted = from_sdnext_payload(fields, img2img=img2img, store=store, settings=settings)
    except ImpromptError as exc:  # a unit's field, named as the client sent it: control.0.strength, not weight
        raise renamed(exc, SDNEXT_UNIT_FIELD.sub(sdnext_field, str(exc))) from None
    return ControlConverted(converted.request, warnings + converted.warnings, converted.modules, [],
                            [f"control.{i}" for i in range(len(units))], 0, iterations)  # fmt: skip


SDNEXT_UNIT_FIELD = re.compile(r"\bcontrolnets\.(?P<index>\d+)(?:\.(?P<field>\w+))?")
SDNEXT_FIELD_NAMES = {"weight": "strength", "module": "process", "image": "image"}  # imprompt's -> SD.Next's


def sdnext_field(match: re.Match) -> str:
    field = match.group("field")
    return f"control.{match.group('index')}" + (f".{SDNEXT_FIELD_NAMES.get(field, field)}" if field else "")


def _strings(name: str, value) -> list[str]:
    if value in (None, ""):
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RequestError(f"{name}: expected a list of base64 images")
    if len(value) > MAX_IMAGES:
        raise RequestError(f"{name}: {len(value)} images, more than the {MAX_IMAGES} any request may hold")
    return value


def _unit(i: int, unit, default_type: str, inputs: list[str], store: ModelStore, warnings: list[str]) -> dict:
    """One SD.Next control unit -> an imprompt ControlNet unit."""
    where = f"control.{i}"
    if not isinstance(unit, dict):
        raise RequestError(f"{where}: a control unit must be a JSON object")
    for name in unit:
        if name not in UNIT_READ and name not in UNIT_OTHER_TYPES:
            warnings.append(f"{where}.{name}: not an SD.Next control unit field; ignored")
    kind = unit.get("unit_type") or default_type
    if str(kind).lower() != "controlnet":
        raise RequestError(f"{where}.unit_type: {shown(kind)} units (SD.Next's T2I-Adapter, ControlNet-XS, "
                           f"ControlLLLite, reference, IP) are not supported; send controlnet units (IP-Adapters go "
                           f"in ip_adapter)")  # fmt: skip
    model = unit.get("model")
    if not isinstance(model, str) or model.strip() in ("", "None"):
        raise RequestError(f"{where}.model: a control unit needs a ControlNet model (SD.Next runs a unit without one "
                           f"as a preview of its preprocessor only); GET /sdapi/v1/controlnets lists them")  # fmt: skip
    entry = find_controlnet(f"{where}.model", model, store)
    process = unit.get("process")
    pre = find_module(f"{where}.process", "none" if process in (None, "", "None") else process)
    image = next((unit[k] for k in ("override", "image") if unit.get(k) not in (None, "")), None)
    if image is None and inputs:
        image = inputs[0]
    if not isinstance(image, str):
        raise RequestError(f"{where}.override: a control unit needs an image (base64): its override or image, or "
                           f"the request's inputs")  # fmt: skip
    if unit.get("guess", False) not in (False, None):
        raise RequestError(f"{where}.guess: diffusers' guess mode is not supported (the A1111 extension's nearest "
                           f"mode, \"ControlNet is more important\", scales the layers otherwise); leave guess false, "
                           f"or send control_mode")  # fmt: skip
    converted = {"model": entry.name, "image": image, "module": pre.name,
                 "weight": unit.get("strength", 1.0), "start": unit.get("start", 0.0), "end": unit.get("end", 1.0),
                 "resize_mode": CROP if inputs else RESIZE}  # fmt: skip
    if unit.get("control_mode") is not None:  # imprompt's: the A1111 extension's control modes
        converted["control_mode"] = unit["control_mode"]
    mode = unit.get("mode", "default")
    union = getattr(entry.spec, "union", False)
    if union:
        converted["union_type"] = 0 if mode in (None, "default") else mode  # SD.Next: "default" is the first
    elif mode not in (None, "default"):
        warnings.append(f"{where}.mode: {shown(mode)} has no effect: {entry.name} is not a Union ControlNet")
    params = unit.get("process_params") or {}
    if not isinstance(params, dict):
        raise RequestError(f"{where}.process_params: expected a JSON object")
    for name, value in params.items():
        field = PROCESS_PARAMS.get((pre.name, name)) or PROCESS_PARAMS.get((None, name))
        if field is None:
            known = [n for (p, n) in PROCESS_PARAMS if p in (None, pre.name)]
            raise RequestError(f"{where}.process_params: {shown(name)} is not a parameter imprompt reads for "
                               f"{pre.name} (it reads {', '.join(known)})")  # fmt: skip
        converted[field] = value
    return converted


def control_response(results: list[Result], payload: dict, converted: ControlConverted) -> dict:
    """SD.Next's answer: the generated images, `processed` (the control maps blended into one, as SD.Next's
    `util.blend` adds them, at the output size), the request echoed in `params` (long strings cut as SD.Next's
    sanitising does), `info` the first image's infotext; `warnings` are imprompt's."""
    send = payload.get("send_images", True) is not False
    images = [png_base64(image) for result in results for image in result.images] if send else []
    processed = []
    if send and results and results[0].control_images:
        info = results[0].info
        maps = [np.asarray(fit(m, info["width"], info["height"], u.resize_mode), dtype=np.float32)
                for m, u in zip(results[0].control_images, converted.request.controlnets)]  # fmt: skip
        processed = [png_base64(Image.fromarray(np.clip(sum(maps), 0, 255).astype(np.uint8)))]
    warnings = list(converted.warnings)
    for result in results:
        warnings += [w for w in result.info.get("warnings", []) if w not in warnings]
    return {"images": images, "processed": processed, "params": _sanitised(payload),
            "info": results[0].infotexts[0] if results else "", "warnings": warnings}  # fmt: skip


def _sanitised(value):
    if isinstance(value, str) and len(value) >= 1000:
        return f"<str {len(value)}>"
    if isinstance(value, list):
        return [_sanitised(v) for v in value]
    if isinstance(value, dict):
        return {k: _sanitised(v) for k, v in value.items()}
    return value


def sdnext_preprocessor_list() -> list[dict]:
    """GET /sdapi/v1/preprocessors: [{name, params}], SD.Next's names where SD.Next has the same preprocessor,
    the extension's labels for the others; `params` the process_params imprompt reads, at their defaults."""
    return [{"name": SDNEXT_NAMES.get(p.name, p.label), "params": dict(SDNEXT_PARAMS.get(p.name, {}))}
            for p in PREPROCESSORS.values()]  # fmt: skip


UNIT_ERROR = re.compile(r"^controlnets\.(?P<index>\d+)(?P<rest>.*)$", re.S)


def named_unit(exc: ImpromptError, wheres: list[str]) -> ImpromptError:
    """`exc` with a ControlNet unit named as the client sent it: "controlnets.1: ..." -> "alwayson_scripts.
    controlnet.args.3: ..." (the same error type, so the same status)."""
    found = UNIT_ERROR.match(str(exc))
    if not found or int(found.group("index")) >= len(wheres):
        return exc
    where = wheres[int(found.group("index"))]
    if where == f"controlnets.{found.group('index')}":
        return exc
    return renamed(exc, f"{where}{found.group('rest')}")


# ------------------------------------------------------------------------------------------ SD.Next's PuLID script

# SD.Next's PuLID script (scripts/pulid_ext.py): its title, which SD.Next's API matches whole or up to its colon, in
# any case (modules/api/script.py `script_name_to_index`), and its `ui()` values in order with their defaults (a
# shorter `script_args` keeps the rest). `run()` reads the face images, Strength (`id_weight` on FLUX, `id_scale` on
# SDXL), and on SDXL only Zero, Sampler, Ortho and Version; Restore and Offload say what happens to the pipeline and
# the face models after the run, not what is drawn.
PULID_TITLE = "PuLID: ID Customization"
PULID_ARGS = {"images": [], "strength": 0.8, "zero": 20, "sampler": "dpmpp_sde", "ortho": "v2", "restore": False,
              "offload": True, "version": "v1.1"}  # fmt: skip
PULID_SDXL_ONLY = ("zero", "sampler", "ortho", "version")
# SD.Next's FLUX PuLID is nunchaku's PuLIDFluxPipeline (scripts/pulid/pulid_flux.py), whose PuLIDPipeline loads
# pulid_flux_v0.9.1 from nunchaku 0.3.1 on (v0.9.0 before); SD.Next installs nunchaku 1.0.1 or later
SDNEXT_FLUX_PULID = "PuLID FLUX v0.9.1"


def is_pulid_script(name) -> bool:
    """Whether `script_name` names SD.Next's PuLID script, by SD.Next's rule: "PuLID: ID Customization" or "PuLID"."""
    title = PULID_TITLE.lower()
    return isinstance(name, str) and name.lower() in (title, title.split(":")[0])


def pulid_script_request(payload: Txt2ImgPayload, model: str | None, store: ModelStore,
                         settings: dict | None = None) -> Converted:  # fmt: skip
    """`to_request`, with SD.Next's PuLID script (`script_name` + `script_args`) read first as a PuLID unit."""
    extra = payload.model_extra or {}
    if not is_pulid_script(extra.get("script_name")):
        return to_request(payload, model, store, settings)
    data = payload.model_dump()
    data["ip_adapter"] = [unit.model_dump(exclude_none=True) for unit in payload.ip_adapter]
    overrides, settings = payload.override_settings or {}, settings or {}
    chosen = overrides.get("sd_model_checkpoint") or model or settings.get("sd_model_checkpoint")  # as to_request
    data, warnings = with_pulid_script(data, chosen, store)
    converted = to_request(type(payload).model_validate(data), model, store, settings)
    converted.warnings[:0] = warnings
    return converted


def with_pulid_script(payload: dict, model: str | None, store: ModelStore) -> tuple[dict, list[str]]:
    """`payload` with its PuLID script as an imprompt PuLID unit at the end of `ip_adapter` (script_name and
    script_args gone), and what the client should hear. Every argument is read as SD.Next's `run()` reads it: mapped
    (images, strength), said to have no effect where SD.Next's FLUX path does not read it (Zero, Sampler, Ortho and
    Version, any value, when not the default; Restore and Offload when not true/false: SD.Next only tests them for
    truth, to decide what stays loaded after the run), or refused where SD.Next would fail or draw nothing. A value
    left out is SD.Next's default; a null is passed on as SD.Next's API passes it (`init_script_args` copies it
    over the default): null images draw nothing there and null strength fails, so both are refused."""
    args = payload.get("script_args")
    if args is None:
        args = []
    if not isinstance(args, list):
        raise RequestError(f"script_args: expected a list (SD.Next's PuLID script takes its {len(PULID_ARGS)} values "
                           f"in order: {', '.join(PULID_ARGS)}), got {shown(args)}")  # fmt: skip
    if len(args) > len(PULID_ARGS):
        raise RequestError(f"script_args: {len(args)} values, but SD.Next's PuLID script takes {len(PULID_ARGS)} "
                           f"({', '.join(PULID_ARGS)}); send at most those")  # fmt: skip
    if payload.get("face") is not None:
        raise RequestError("face and script_name PuLID: SD.Next runs its Face script in place of the PuLID script when "
                           "a face is sent; send one of them")  # fmt: skip
    given = dict(PULID_ARGS) | dict(zip(PULID_ARGS, args))  # left out: the default; null stays null, as in SD.Next
    where = {name: f"script_args.{i} ({name})" for i, name in enumerate(PULID_ARGS)}
    images = given["images"]
    images = [images] if isinstance(images, str) else images
    if images is not None and (not isinstance(images, list) or not all(isinstance(i, str) and i for i in images)):
        raise RequestError(f"{where['images']}: expected a base64 image, or a list of them, got {shown(images)}")
    if not images:
        raise RequestError(f"{where['images']}: PuLID needs a face image (base64); SD.Next, given "
                           f"{'null' if images is None else 'none'} over its API, draws nothing")  # fmt: skip
    strength = given["strength"]
    if strength is None:
        raise RequestError(f"{where['strength']}: null, which SD.Next's API passes to the script as it is, and its "
                           f"FLUX path then multiplies the ID by it and fails; give a number from {SCALE_RANGE[0]} to "
                           f"{SCALE_RANGE[1]} (SD.Next's slider: 0 to 1), or leave it out for the default "
                           f"{PULID_ARGS['strength']}")  # fmt: skip
    if (isinstance(strength, bool) or not isinstance(strength, (int, float))
            or not SCALE_RANGE[0] <= strength <= SCALE_RANGE[1]):  # fmt: skip
        raise RequestError(f"{where['strength']}: expected a number from {SCALE_RANGE[0]} to {SCALE_RANGE[1]} "
                           f"(SD.Next's slider: 0 to 1), got {shown(strength)}")  # fmt: skip
    if not model:
        raise RequestError("script_name PuLID: no model to run it on; set override_settings.sd_model_checkpoint")
    pipeline = store.pipeline(model)
    if pipeline.spec.architecture != "flux":
        if pipeline.spec.family != "SDXL":
            raise UnsupportedError(f"script_name PuLID: SD.Next's PuLID script runs on SDXL and FLUX.1, and model "
                                   f"{pipeline.name} is {pipeline.spec.family}; pick a FLUX.1 model")  # fmt: skip
        zero, ortho = given["zero"], given["ortho"]
        unit = {"adapter": "PuLID SDXL v1.1", "images": ["..."], "scale": strength}
        if isinstance(zero, (int, float)) and not isinstance(zero, bool) and zero == int(zero) and 0 <= zero <= 80:
            unit["num_zero"] = int(zero)
        if ortho in ("off", "v1", "v2"):
            unit["ortho"] = ortho
        raise UnsupportedError(
            f"{where['sampler']}: on SDXL SD.Next's PuLID script samples with PuLID's own k-diffusion loop "
            f"({shown(given['sampler'])} on Karras sigmas, timesteps rounded to whole ones), which imprompt does not "
            f"run, so its picture cannot be drawn here. Send PuLID SDXL v1.1 as an ip_adapter unit instead "
            f"({json.dumps(unit)}) with a sampler_name"
        )
    warnings = [f"{where[name]}={shown(given[name])} has no effect on FLUX: SD.Next's PuLID script reads it on SDXL "
                f"only" for name in PULID_SDXL_ONLY if given[name] != PULID_ARGS[name]]  # fmt: skip
    warnings += [f"{where[name]}={shown(given[name])} is not true or false: SD.Next only tests it for truth, to decide "
                 f"what stays loaded after the run; no effect on the picture"
                 for name in ("restore", "offload") if not isinstance(given[name], bool)]  # fmt: skip
    adapter, why = flux_pulid_file(store, pipeline)
    warnings += [why] if why else []
    if len(images) > 1:
        warnings.append(f"{where['images']}: PuLID FLUX reads one face; the first of {len(images)} was used, as in "
                        f"SD.Next")  # fmt: skip
    payload = {k: v for k, v in payload.items() if k not in ("script_name", "script_args")}
    if isinstance(payload.get("batch_size"), int) and payload["batch_size"] > 1:
        warnings.append(f"batch_size={payload['batch_size']}: SD.Next's PuLID script runs a batch of one; so does "
                        f"imprompt (n_iter still repeats it)")  # fmt: skip
        payload["batch_size"] = 1
    unit = {"adapter": adapter, "images": images[:1], "scale": strength}
    payload["ip_adapter"] = [*(payload.get("ip_adapter") or []), unit]
    return payload, warnings


def flux_pulid_file(store: ModelStore, pipeline) -> tuple[str, str | None]:
    """The PuLID FLUX file for `pipeline`: v0.9.1, which SD.Next's FLUX PuLID loads (nunchaku 0.3.1 and later), where
    present and fitting; else another PuLID FLUX file that fits (said in a warning: v0.9.0 has v0.9.1's tensors,
    other weights); else the name v0.9.1, which the request then refuses saying what is missing or why it does not
    fit."""
    files = [e for e in store.current_of_kind("ip-adapter") if e.spec.variant == "pulid"]
    fitting = [e for e in files if fits(e, pipeline)]
    if not fitting:
        return (files[0].name if files else SDNEXT_FLUX_PULID), None
    fitting.sort(key=lambda e: (catalog.friendly_name(e.name) != SDNEXT_FLUX_PULID, str(e.path)))
    chosen = fitting[0]
    label = catalog.friendly_name(chosen.name) or chosen.name
    if label == SDNEXT_FLUX_PULID:
        return chosen.name, None
    return chosen.name, (f"script_name PuLID: SD.Next's FLUX PuLID (nunchaku 0.3.1 and later) loads "
                         f"pulid_flux_v0.9.1; imprompt has no such file for {pipeline.name} and used {label} "
                         f"({chosen.path.name})")  # fmt: skip
