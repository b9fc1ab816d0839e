"""A1111 / SD.Next API shapes: payloads in (typed), responses out, and their conversion to a request.

Payloads are typed, so wrong types are a 422 naming the field; responses are what A1111 clients parse (`images` as
base64 PNG, `parameters`, and `info` as a JSON string). The dict form of a payload (`imprompt generate --request
payload.json`) goes through `from_sdnext_payload`.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RequestError, shown
from ..models.store import ModelStore
from ..request import (
    MAX_EMBEDDING_WIDTH,
    MAX_IMAGES,
    MAX_UNITS,
    GenerateRequest,
    IPAdapterUnit,
    describe_validation_error,
    parse_request,
    validation_error,
)
from ..preprocess.resize import fit
from ..result import Result
from ..util.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..util.infotext import png_info
from ..util.samplers import SAMPLERS
from .controlnet import ControlMap, InputMap, controlnet_units, detected_map


class IPAdapterPayload(BaseModel):
    """SD.Next's `ip_adapter` unit (images and masks as base64, with or without a data: prefix) with SD.Next's
    defaults (its `ItemIPAdapter`: a client that leaves a field out gets what SD.Next would give it), plus
    imprompt's extra unit fields. An empty `masks` list means no masks, as in SD.Next."""

    model_config = ConfigDict(extra="forbid")

    adapter: str = "Base"
    images: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
    masks: list[str] | None = Field(default_factory=list, max_length=MAX_IMAGES)
    scale: float = 0.5
    start: float = 0.0
    end: float = 1.0
    crop: bool = False
    average: bool = False
    layers: str | dict | None = None
    negative_images: list[str] | None = Field(None, max_length=MAX_IMAGES)
    embeddings: str | None = None
    face_embeddings: (
        Annotated[list[Annotated[list[float], Field(max_length=MAX_EMBEDDING_WIDTH)]], Field(max_length=MAX_IMAGES)] | None
    ) = None
    encoder: str | None = None
    structure: float = 1.0
    faceid_version: str | None = None
    controlnet_scale: float | None = None  # InstantID's IdentityNet weight, its keypoints picture, its ControlNet
    pose_image: str | None = None
    identitynet: str | None = None


class FacePayload(BaseModel):
    """SD.Next's `face` field (its Face script). Its FaceID mode is one FaceID unit, its InstantID mode one InstantID
    unit; the other modes (FaceSwap, PhotoMaker, ReSwapper) are other models, which imprompt does not run."""

    model_config = ConfigDict(extra="forbid")

    mode: str = "FaceID"
    source_images: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
    ip_model: str = "FaceID Base"
    ip_override_sampler: bool = True  # SD.Next then samples with DDIM
    ip_cache_model: bool = True  # no effect on the picture: imprompt keeps what it built
    ip_strength: float = Field(1.0, ge=0.0, le=2.0)
    ip_structure: float = Field(1.0, ge=0.0, le=1.0)
    # InstantID's (SD.Next's defaults): the adapter's scale and the IdentityNet's; they mean nothing to FaceID
    id_strength: float = 1.0
    id_conditioning: float = 0.5
    id_cache: bool = True
    pm_model: str | None = None
    pm_trigger: str = "person"
    pm_strength: float = 1.0
    pm_start: float = 0.5
    fs_cache: bool = True


class SDNextUnits(BaseModel):
    """A dict payload's `ip_adapter` list, typed as the server types it (errors name `ip_adapter.N.field`)."""

    ip_adapter: list[IPAdapterPayload] = Field(max_length=MAX_UNITS)


class Txt2ImgPayload(BaseModel):
    """The A1111 txt2img fields imprompt reads. Every other field is kept and judged by `check_fields`: ignored
    when it cannot change the picture, refused (422) or reported in `info.warnings` when it would. SD.Next's and
    A1111's own request models make every field Optional, so null is read as the field left out."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_left_out(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0
    true_cfg_scale: float | None = Field(None, description="FLUX only: true classifier-free guidance (1: off)")
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = Field(1, ge=1, le=16, description="batches run one after another, seeds counting on")
    sampler_name: str | None = None
    sampler_index: int | str | None = Field(None, description="SD.Next: a name, or a place in /sdapi/v1/samplers")
    scheduler: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    ip_adapter: list[IPAdapterPayload] = Field(default_factory=list, max_length=MAX_UNITS)
    face: FacePayload | None = Field(None, description="SD.Next's Face script: FaceID mode, as a FaceID unit")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="the ControlNet extension's units")
    controlnets: list[dict[str, Any]] = Field(
        default_factory=list, max_length=MAX_UNITS, description="imprompt's own ControlNet units (base64 images); "
                                                                "their control images come back in `control_images`"
    )  # fmt: skip


class Img2ImgPayload(Txt2ImgPayload):
    init_images: list[str] = Field(min_length=1, max_length=MAX_IMAGES)
    denoising_strength: float = 0.75


UNIT_FIELDS = tuple(IPAdapterUnit.model_fields)

# What imprompt does with each A1111 / SD.Next field (the README's table says the same):
READ = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "batch_size", "n_iter",
        "sampler_name", "sampler_index", "scheduler", "override_settings", "ip_adapter", "alwayson_scripts",
        "init_images", "denoising_strength", "clip_skip", "face", "true_cfg_scale", "controlnets", "text_encoders"}  # fmt: skip
# no effect on the picture (or only together with a field that must stay off, below)
IGNORED = {"send_images", "save_images", "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards",
           "force_task_id", "comments", "infotext", "include_init_images", "script_args", "image_cfg_scale",
           "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
           "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
           "hr_additional_modules", "hr_cfg", "hr_distilled_cfg", "subseed", "refiner_switch_at", "mask_blur",
           "mask_blur_x", "mask_blur_y", "mask_round", "inpainting_fill", "inpaint_full_res",
           "inpaint_full_res_padding", "inpainting_mask_invert", "s_tmin", "s_tmax", "distilled_cfg_scale",
           "disable_extra_networks", "firstpass_image", "user"}  # fmt: skip
# honoured only at the values A1111 treats as off: anything else would change the picture, and is refused
OFF = {"restore_faces": (False, None), "tiling": (False, None), "enable_hr": (False, None),
       "subseed_strength": (0, None), "seed_resize_from_h": (-1, 0, None), "seed_resize_from_w": (-1, 0, None),
       "styles": ([], None), "script_name": (None, "", "None"), "refiner_checkpoint": (None, "", "None"),
       "mask": (None, ""), "latent_mask": (None, ""), "initial_noise_multiplier": (None, 1), "resize_mode": (0, None)}  # fmt: skip
WHY_OFF = {"restore_faces": "face restoration", "tiling": "tiling", "enable_hr": "hires fix",
           "subseed_strength": "variation seeds", "seed_resize_from_h": "seed resize", "seed_resize_from_w": "seed resize",
           "styles": "A1111 styles (put their text into the prompt)", "script_name": "A1111 scripts",
           "refiner_checkpoint": "a refiner", "mask": "inpainting", "latent_mask": "inpainting",
           "initial_noise_multiplier": "extra initial noise", "resize_mode": "resize modes but 0 (just resize)"}  # fmt: skip
# sampler options A1111 applies and imprompt does not: carried on, with a warning, as A1111 does for what it lacks
WARN_UNLESS = {"s_churn": (0, None), "s_noise": (1, None), "s_min_uncond": (0, None)}
SETTINGS_READ = {"sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "control_net_no_detectmap",
                 "pad_cond_uncond", "sdxl_clip_l_skip", "forge_additional_modules"}  # fmt: skip
PROMPT_SETTINGS = ("pad_cond_uncond", "sdxl_clip_l_skip")  # A1111's settings of how prompts are read: request fields
# what POST /sdapi/v1/options can set, beside sd_model_checkpoint, and its value before any client sets it
OPTION_DEFAULTS = {"sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, "control_net_no_detectmap": False,
                   "pad_cond_uncond": False, "sdxl_clip_l_skip": False, "forge_additional_modules": []}  # fmt: skip
# settings that change pictures, at the values imprompt computes (A1111's defaults): any other is refused
SETTINGS_OFF = {"eta_noise_seed_delta": (None, 0), "use_old_scheduling": (None, False),
                "pad_cond_uncond_v0": (None, False)}  # fmt: skip
OWN_VAE = (None, "", "None", "Automatic")  # sd_vae values meaning the model's own VAE
ETA_DEFAULT = {"Euler a": 1.0, "DDIM": 0.0}  # samplers eta changes; eta means nothing to the others


@dataclass
class Converted:
    """A payload as a request, and what the client should hear about it."""

    request: GenerateRequest
    warnings: list[str]  # fields A1111 would honour that imprompt carried on without
    modules: list[str | None]  # per unit: the ControlNet-extension preprocessor it named (None: an SD.Next unit)
    input_maps: list[InputMap | ControlMap]  # the extension's input maps, returned after the generated images
    control_wheres: list[str] = field(default_factory=list)  # each ControlNet unit as the client named it
    own_controlnets: int = 0  # how many of the request's ControlNet units (the last ones) came in imprompt's form


def check_fields(payload: dict, img2img: bool) -> list[str]:
    """Judge every field of a payload: raise a RequestError naming a field that would change the picture and that
    imprompt cannot honour; return warnings for those A1111 would honour and imprompt carries on without."""
    warnings = []
    for name, value in payload.items():
        if name in READ or name in IGNORED:
            continue
        if name in OFF:
            if value not in OFF[name]:
                raise RequestError(f"{name}: {value!r} asks for {WHY_OFF[name]}, which imprompt does not do; leave it out")
        elif name in WARN_UNLESS:
            if value not in WARN_UNLESS[name]:
                warnings.append(f"{name}={value!r} is not applied (imprompt's samplers use their defaults)")
        elif name == "eta":
            sampler = sampler_of(payload) or ""
            default = ETA_DEFAULT.get(sampler)
            if value is not None and default is not None and value != default:
                warnings.append(f"eta={value!r} is not applied: {sampler} uses eta {default}")
        else:
            warnings.append(f"{name}: not an A1111 field imprompt knows; ignored")
    if not img2img and payload.get("init_images"):
        warnings.append("init_images: ignored by txt2img (send the request to /sdapi/v1/img2img)")
    settings = payload.get("override_settings") or {}
    for name, value in settings.items():
        if name in SETTINGS_READ:
            continue
        if name in SETTINGS_OFF:
            if value not in SETTINGS_OFF[name]:
                raise RequestError(f"override_settings.{name}: {value!r} is not supported yet; leave it out")
        else:
            warnings.append(f"override_settings.{name}: not a setting imprompt has; ignored")
    return warnings


def sampler_of(payload: dict) -> str | None:
    """The sampler a payload names: `sampler_name`, else `sampler_index`, a name or (SD.Next's integer) a place in
    the sampler list, as SD.Next's processing reads it (`samplers[index]`; 0 is "Default")."""
    if payload.get("sampler_name"):
        return payload["sampler_name"]
    index = payload.get("sampler_index")
    if isinstance(index, int) and not isinstance(index, bool):
        names = list(SAMPLERS)
        if not 0 <= index < len(names):
            raise RequestError(
                f"sampler_index: {index} is not a place in the sampler list (0 to {len(names) - 1}, in the order "
                f"GET /sdapi/v1/samplers gives); give one of those, or a sampler_name"
            )
        return names[index]
    return index or None


def from_sdnext_payload(payload: dict, img2img: bool | None = None, store: ModelStore | None = None,
                        settings: dict | None = None) -> Converted:  # fmt: skip
    """An SD.Next / A1111 `txt2img` or `img2img` JSON payload -> a request, with SD.Next's `ip_adapter` units and
    the ControlNet extension's IP-Adapter units (`alwayson_scripts`; resolving their models needs `store`).
    `img2img`: None decides from the payload (init_images present). `settings`: the server's options (POST
    /sdapi/v1/options, `sd_model_checkpoint` included), which the payload's override_settings and fields override."""
    if not isinstance(payload, dict):
        raise RequestError(f"request must be a JSON object, got {type(payload).__name__}")
    overrides = payload.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise RequestError("override_settings must be a JSON object")
    chosen = {**(settings or {}), **{k: v for k, v in overrides.items() if v is not None}}
    units = payload.get("ip_adapter") or []
    if not isinstance(units, list):
        raise RequestError("ip_adapter must be a list of units")
    try:
        units = SDNextUnits.model_validate({"ip_adapter": units}).ip_adapter  # SD.Next's defaults
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None  # a list over its ceiling: 413
    scripts = payload.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts must be a JSON object")
    if img2img is None:
        img2img = bool(payload.get("init_images"))
    warnings = check_fields(payload, img2img)
    keys = ["prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "batch_size", "true_cfg_scale"]
    if img2img:
        keys += ["init_images", "denoising_strength"]
    fields: dict[str, Any] = {key: payload[key] for key in keys if payload.get(key) is not None}
    sampler = sampler_of(payload)
    if sampler:
        scheduler = str(payload.get("scheduler") or "").lower()
        fields["sampler"] = f"{sampler} Karras" if scheduler == "karras" and "karras" not in sampler.lower() else sampler
    if chosen.get("sd_model_checkpoint"):
        if not isinstance(chosen["sd_model_checkpoint"], str):
            raise RequestError(f"override_settings.sd_model_checkpoint: expected a model name, got "
                               f"{shown(chosen['sd_model_checkpoint'])}; GET /sdapi/v1/sd-models lists them")  # fmt: skip
        fields["model"] = chosen["sd_model_checkpoint"]
    if payload.get("distilled_cfg_scale") is not None and store is not None and fields.get("model"):
        model = store.pipeline(fields["model"])
        if model.spec.architecture == "flux":  # Forge's FLUX guidance field; imprompt reads cfg_scale, as SD.Next
            warnings.append(f"distilled_cfg_scale={payload['distilled_cfg_scale']} (Forge's FLUX guidance) is not "
                            f"read: imprompt takes FLUX's guidance from cfg_scale ({payload.get('cfg_scale', 7.0)}), "
                            f"as SD.Next does; set cfg_scale to the guidance you want")  # fmt: skip
    if chosen.get("sd_vae") not in OWN_VAE:
        fields["vae"] = chosen["sd_vae"]
    if chosen.get("forge_additional_modules") and store is not None:
        modules = forge_modules(chosen["forge_additional_modules"], store)
        if "vae" in modules and "vae" in fields and store.vae(fields["vae"]).path != store.vae(modules["vae"]).path:
            raise RequestError(f"sd_vae ({fields['vae']}) and forge_additional_modules' VAE ({modules['vae']}) name "
                               f"different VAEs; give one (sd_vae \"Automatic\" leaves the VAE to the modules)")  # fmt: skip
        fields.update(modules)
    given = payload.get("text_encoders")
    if given is not None:  # imprompt's own field, beside Forge's modules
        if not isinstance(given, list) or not all(isinstance(name, str) for name in given):
            raise RequestError(f"text_encoders: expected a list of text encoder file names, got {shown(given)}; "
                               f"GET /sdapi/v1/sd-modules lists them")  # fmt: skip
        fields["text_encoders"] = [*fields.get("text_encoders", []), *given]
    clip_skip = next((v for v in (overrides.get("CLIP_stop_at_last_layers"), payload.get("clip_skip"),
                                  chosen.get("CLIP_stop_at_last_layers")) if v is not None), None)  # fmt: skip
    if clip_skip is not None:
        fields["clip_skip"] = clip_skip
    for setting in PROMPT_SETTINGS:
        if chosen.get(setting) is not None:
            fields[setting] = chosen[setting]
    fields["ip_adapters"], modules, input_maps = [], [], []
    for i, given in enumerate(units):
        if not given.adapter or given.adapter.lower() == "none":
            continue  # SD.Next treats "None" as an empty unit
        if not (given.images or given.embeddings or given.face_embeddings):
            warnings.append(f"ip_adapter.{i}: unit skipped (no images), as SD.Next skips a unit without images")
            continue
        unit = given.model_dump(exclude_none=True)
        if not unit.get("masks"):
            unit.pop("masks", None)  # SD.Next's default, []: no masks
        fields["ip_adapters"].append({k: unit[k] for k in UNIT_FIELDS if k in unit})
        modules.append(None)
    if payload.get("face") is not None:
        face_unit, face_warnings = sdnext_face_unit(payload["face"], store)
        if face_unit is not None:
            fields["ip_adapters"].append(face_unit)
            modules.append(None)
            warnings += face_warnings
            faceid = str(payload["face"].get("mode") or "FaceID").lower() == "faceid"  # the setting is FaceID's
            if faceid and payload["face"].get("ip_override_sampler", True):
                fields["sampler"] = "DDIM"  # what SD.Next's FaceID does with "Override sampler" (its default)
    fields["controlnets"], wheres = [], []
    if scripts:
        if store is None:
            raise RequestError("alwayson_scripts: ControlNet units need the models folder to resolve their models")
        init = (payload.get("init_images") or [None])[0] if img2img else None
        controlnet = controlnet_units(scripts, store, init if isinstance(init, str) else None)
        fields["ip_adapters"] += controlnet.units
        fields["controlnets"] += controlnet.controlnets
        wheres += controlnet.wheres
        modules += controlnet.modules
        warnings += controlnet.warnings
        if not chosen.get("control_net_no_detectmap"):  # the extension's switch for them, off by default
            input_maps += controlnet.input_maps
    own = payload.get("controlnets") or []
    if not isinstance(own, list):
        raise RequestError("controlnets must be a list of ControlNet units")
    fields["controlnets"] += own
    wheres += [f"controlnets.{i}" for i in range(len(own))]
    return Converted(parse_request(fields), warnings, modules, input_maps, wheres, len(own))


def sdnext_face_unit(face, store: ModelStore | None) -> tuple[dict | None, list[str]]:
    """SD.Next's `face` payload in FaceID mode -> a FaceID unit (None for mode "None"). `ip_structure` acts, as in
    SD.Next, on FaceID Plus v2 only (its shortcut); elsewhere it is said to have no effect."""
    try:
        face = FacePayload.model_validate(face)
    except ValidationError as exc:
        raise RequestError(describe_validation_error(exc).replace("invalid request: ", "invalid request: face.")) from None
    if face.mode.lower() == "none":
        return None, []
    # InstantID mode: an InstantID unit, id_strength its adapter scale, id_conditioning its IdentityNet's. Two known
    # differences from SD.Next (modules/face/instantid.py): its "largest face" sort key computes w * y2 - y1 (operator
    # precedence), so with several faces in the picture it may take another face than imprompt's largest box; and it
    # forces prompt_attention "fixed" for the run, so there `(word:1.3)` is plain text, here it is weighted as usual
    if face.mode.lower() == "instantid":
        if not face.source_images:
            raise RequestError("face.source_images: InstantID needs an image of the face (base64)")
        unit = {"adapter": "InstantID", "images": face.source_images[:1], "scale": face.id_strength,
                "controlnet_scale": face.id_conditioning}  # fmt: skip
        more = [f"face.source_images: InstantID reads one face; the first of {len(face.source_images)} was used"]
        return unit, more if len(face.source_images) > 1 else []
    if face.mode.lower() != "faceid":
        raise RequestError(
            f"face.mode: {face.mode!r} runs SD.Next's {face.mode} models, which imprompt does not have; use mode "
            f"FaceID (an IP-Adapter FaceID unit) or InstantID, or leave face out"
        )
    if not face.source_images:
        raise RequestError("face.source_images: FaceID needs at least one image of the face (base64)")
    unit = {"adapter": face.ip_model, "images": face.source_images, "scale": face.ip_strength}
    warnings = []
    if face.ip_structure != 1.0:
        version = store.adapter(face.ip_model).spec.faceid_version if store is not None else None
        if version == "v2":
            unit["structure"] = face.ip_structure
        else:
            warnings.append(f"face.ip_structure={face.ip_structure} has no effect on {face.ip_model}: it weights "
                            f"FaceID Plus v2's face-structure shortcut (as in SD.Next)")  # fmt: skip
    return unit, warnings


def to_request(payload: Txt2ImgPayload, model: str | None, store: ModelStore, settings: dict | None = None) -> Converted:
    """The payload as an engine request; the server's current model and options (`settings`) unless the payload
    overrides them."""
    data = payload.model_dump()
    data["ip_adapter"] = [unit.model_dump(exclude_none=True) for unit in payload.ip_adapter]
    data["face"] = payload.face.model_dump() if payload.face is not None else None
    settings = {**(settings or {}), **({"sd_model_checkpoint": model} if model else {})}
    return from_sdnext_payload(data, img2img=isinstance(payload, Img2ImgPayload), store=store, settings=settings)


def forge_modules(modules, store: ModelStore) -> dict:
    """Forge's `forge_additional_modules` (the VAE and text-encoder files a FLUX / SD 3.5 transformer alone runs
    with, as paths on the Forge machine or file names) as imprompt's `vae` and `text_encoders`: each file is looked up
    (a path in the models folders, as GET /sdapi/v1/sd-modules lists it: that very file; another path: by its file
    name) and sorted by what its tensors are, never by its folder: a VAE file is the VAE, a text-encoder file a text
    encoder, anything else (or nothing found) refused. Each comes out under a name that resolves to that file."""
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise RequestError(f"forge_additional_modules: expected a list of file names, got {shown(modules)}; GET "
                           f"/sdapi/v1/sd-modules lists them")  # fmt: skip
    fields: dict[str, Any] = {"text_encoders": []}
    for module in modules:
        entry = store.find(module, kinds=("vae", "text-encoder"))
        if entry is None or entry.kind not in ("vae", "text-encoder"):
            there = sorted(e.path.name for kind in ("vae", "text-encoder") for e in store.of_kind(kind))
            what = "not in the models folders" if entry is None else \
                f"{entry.path}, {_a(entry.kind)}, neither a VAE nor a text encoder"  # fmt: skip
            raise RequestError(f"forge_additional_modules: {module!r} is {what}. The VAEs and text encoders there: "
                               f"{', '.join(there) or 'none'} (GET /sdapi/v1/sd-modules lists them)")  # fmt: skip
        name = store.name_of(entry)
        if entry.kind == "text-encoder":
            fields["text_encoders"].append(name)
        elif "vae" in fields:
            raise RequestError(f"forge_additional_modules: two VAEs ({fields['vae']}, {name}); give one")
        else:
            fields["vae"] = name
    return fields


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def vae_option(entry, store: ModelStore) -> str:
    """A VAE as A1111's `sd_vae` option names it (its file name), unless another file has that name: then a name
    that resolves to this one (`store.name_of`), so a later request gets the file the client chose."""
    return entry.path.name if store.vae(entry.path.name).path == entry.path else store.name_of(entry)


def apply_options(current: dict, given: dict, store: ModelStore) -> tuple[dict, dict]:
    """POST /sdapi/v1/options: the server's options after `given`, and the answer (SD.Next's `updated`, plus
    `warnings`). The options that change pictures are checked (an unknown model or VAE, a clip skip out of range, a
    setting imprompt cannot honour: an error naming it, and nothing is set); the others change nothing and are
    named in `warnings`. null leaves an option as it is."""
    chosen, updated, warnings = dict(current), [], []
    for name, value in given.items():
        if value is None:
            updated.append({name: False})
            continue
        if name == "sd_model_checkpoint":
            value = store.name_of(store.pipeline(str(value)))  # 404 naming it if unknown; a name for that very file
        elif name == "sd_vae":
            value = "Automatic" if value in OWN_VAE else vae_option(store.vae(str(value)), store)  # 404 if unknown
        elif name == "CLIP_stop_at_last_layers":
            try:
                value = parse_request(clip_skip=value).clip_skip
            except RequestError as exc:
                raise RequestError(f"CLIP_stop_at_last_layers: {value!r} is not a clip skip imprompt takes "
                                   f"({str(exc).removeprefix('invalid request: ')})") from None  # fmt: skip
        elif name == "forge_additional_modules":
            forge_modules(value, store)  # refused here: a malformed list, a module that is no VAE / text encoder
        elif name in ("control_net_no_detectmap", *PROMPT_SETTINGS):
            if not isinstance(value, bool):
                raise RequestError(f"{name}: expected true or false, got {shown(value)}")
        elif name in SETTINGS_OFF:
            if value not in SETTINGS_OFF[name]:
                raise RequestError(f"{name}: {value!r} is not supported yet; leave it out")
            updated.append({name: False})
            continue
        else:
            warnings.append(f"{name}: not a setting imprompt has; ignored")
            updated.append({name: False})
            continue
        updated.append({name: chosen.get(name) != value})
        chosen[name] = value
    return chosen, {"updated": updated, "warnings": warnings}


def to_response(results: list[Result], payload: Txt2ImgPayload, warnings: list[str] | None = None,
                input_maps: list[InputMap | ControlMap] | None = None, image_limits: tuple[int, int] = (DEFAULT_MAX_PIXELS,
                DEFAULT_MAX_BYTES), own_controlnets: int = 0) -> dict:  # fmt: skip
    """A1111's response: base64 PNGs that carry the `parameters` text chunk, then (as the ControlNet extension
    appends them) the maps of its units (`input_maps`: an IP-Adapter unit's input image, read under `image_limits`,
    the engine's pixels and bytes; a ControlNet unit's detected map at the generation size, once per request as the
    extension does, not per n_iter batch), and `info` as a JSON string, with `warnings`: what the request asked for
    that imprompt carried on without. The control images of imprompt's own `controlnets` units (the last
    `own_controlnets` of the request's) come in `control_images`, as the engine made them. A job interrupted between
    its n_iter batches has fewer results than n_iter: `interrupted` says so."""
    warnings = list(warnings or [])
    for result in results:  # the engine's own (a LoRA that acts only in part), once each
        warnings += [w for w in result.info.get("warnings", []) if w not in warnings]
    images, infotexts, seeds = [], [], []
    for result in results:
        for image, infotext, seed in zip(result.images, result.infotexts, result.info["all_seeds"]):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=png_info(infotext))
            images.append(base64.b64encode(buffer.getvalue()).decode())
            infotexts.append(infotext)
            seeds.append(seed)
    first = results[0].info if results else {}
    info = {
        **first,
        "all_prompts": [first.get("prompt", "")] * len(images),
        "all_negative_prompts": [first.get("negative_prompt", "")] * len(images),
        "all_seeds": seeds,
        "infotexts": infotexts,
        "interrupted": len(results) < payload.n_iter or any(r.info["interrupted"] for r in results),
        "warnings": warnings,
        "imprompt": [r.info for r in results],  # one entry per n_iter batch, with its own units and events
    }
    controls = results[0].control_images if results else []
    for item in input_maps or []:
        if isinstance(item, ControlMap):
            if item.index >= len(controls):
                continue  # an interrupted job that made no image
            picture, warning = fit(controls[item.index], first["width"], first["height"], item.resize_mode), None
        else:
            picture, warning = detected_map(item, *image_limits)
        images.append(png_base64(picture))
        if warning:
            warnings.append(warning)
    parameters = payload.model_dump(exclude={"ip_adapter", "alwayson_scripts", "init_images", "face", "controlnets"})
    parameters["controlnets"] = [{k: v for k, v in u.items() if k != "image"} for u in payload.controlnets]
    if payload.face is not None:
        parameters["face"] = {**payload.face.model_dump(exclude={"source_images"}),
                              "source_images": len(payload.face.source_images)}  # fmt: skip
    parameters["ip_adapter"] = [{**u.model_dump(exclude={"images", "masks", "negative_images"}),
                                 "images": len(u.images)} for u in payload.ip_adapter]  # fmt: skip
    answer = {"images": images, "parameters": parameters, "info": json.dumps(info)}
    if own_controlnets:
        answer["control_images"] = [png_base64(image) for image in controls[len(controls) - own_controlnets:]]
    return answer


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
