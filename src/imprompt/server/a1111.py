"""A1111 / SD.Next API shapes: payloads in (typed), responses out, and their conversion to a request.

Payloads are typed, so wrong types are a 422 naming the field; responses are what A1111 clients parse (`images` as
base64 PNG, `parameters`, and `info` as a JSON string). The dict form of a payload (`imprompt generate --request
payload.json`) goes through `from_sdnext_payload`.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine import Result
from ..errors import RequestError
from ..request import GenerateRequest, IPAdapterUnit, parse_request
from ..util.infotext import png_info


class IPAdapterPayload(BaseModel):
    """SD.Next's `ip_adapter` unit (images and masks as base64, with or without a data: prefix), plus imprompt's
    extra unit fields."""

    model_config = ConfigDict(extra="forbid")

    adapter: str
    images: list[str] = Field(default_factory=list)
    masks: list[str] | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    crop: bool = False
    average: bool = False
    layers: str | dict | None = None
    negative_images: list[str] | None = None
    embeddings: str | None = None
    encoder: str | None = None


class Txt2ImgPayload(BaseModel):
    """The A1111 txt2img fields imprompt uses; any other A1111 field is accepted and ignored, as A1111 does."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = Field(1, ge=1, le=16, description="batches run one after another, seeds counting on")
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    ip_adapter: list[IPAdapterPayload] = Field(default_factory=list)


class Img2ImgPayload(Txt2ImgPayload):
    init_images: list[str] = Field(min_length=1)
    denoising_strength: float = 0.75


class OptionsPayload(BaseModel):
    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str | None = None


UNIT_FIELDS = tuple(IPAdapterUnit.model_fields)


def from_sdnext_payload(payload: dict, img2img: bool | None = None) -> GenerateRequest:
    """An SD.Next / A1111 `txt2img` or `img2img` JSON payload -> GenerateRequest. A1111 fields imprompt has no use
    for (restore_faces, styles, alwayson_scripts, ...) are ignored, as A1111 ignores fields it does not know.
    `img2img`: None decides from the payload (init_images present); txt2img ignores init_images and
    denoising_strength (A1111 clients send the latter for hires fix)."""
    if not isinstance(payload, dict):
        raise RequestError(f"request must be a JSON object, got {type(payload).__name__}")
    overrides = payload.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise RequestError("override_settings must be a JSON object")
    units = payload.get("ip_adapter") or []
    if not isinstance(units, list):
        raise RequestError("ip_adapter must be a list of units")
    if img2img is None:
        img2img = bool(payload.get("init_images"))
    keys = ["prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "batch_size"]
    if img2img:
        keys += ["init_images", "denoising_strength"]
    fields: dict[str, Any] = {key: payload[key] for key in keys if payload.get(key) is not None}
    sampler = payload.get("sampler_name") or payload.get("sampler_index")
    if sampler:
        scheduler = str(payload.get("scheduler") or "").lower()
        fields["sampler"] = f"{sampler} Karras" if scheduler == "karras" and "karras" not in sampler.lower() else sampler
    if overrides.get("sd_model_checkpoint"):
        fields["model"] = overrides["sd_model_checkpoint"]
    fields["ip_adapters"] = []
    for i, unit in enumerate(units):
        if not isinstance(unit, dict):
            raise RequestError(f"ip_adapter.{i}: each unit must be a JSON object")
        if not unit.get("adapter") or str(unit["adapter"]).lower() == "none":
            continue  # SD.Next treats "None" as an empty unit
        fields["ip_adapters"].append(
            {k: unit[k] for k in UNIT_FIELDS if unit.get(k) is not None}
        )
    return parse_request(fields)


def to_request(payload: Txt2ImgPayload, model: str | None) -> GenerateRequest:
    """The payload as an engine request; the server's current model unless the payload overrides it."""
    data = payload.model_dump(exclude_none=True)
    data["ip_adapter"] = [unit.model_dump(exclude_none=True) for unit in payload.ip_adapter]
    if model and not (payload.override_settings or {}).get("sd_model_checkpoint"):
        data.setdefault("override_settings", {})["sd_model_checkpoint"] = model
    return from_sdnext_payload(data, img2img=isinstance(payload, Img2ImgPayload))


def to_response(results: list[Result], payload: Txt2ImgPayload) -> dict:
    """A1111's response: base64 PNGs that carry the `parameters` text chunk, and `info` as a JSON string."""
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
        "imprompt": [r.info for r in results],  # one entry per n_iter batch, with its own units and events
    }
    parameters = payload.model_dump(exclude={"ip_adapter"})
    parameters["ip_adapter"] = [{**u.model_dump(exclude={"images", "masks", "negative_images"}),
                                 "images": len(u.images)} for u in payload.ip_adapter]  # fmt: skip
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}
