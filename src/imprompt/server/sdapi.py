"""A1111 / SD.Next API shapes: request payloads (typed, so wrong types are a 422 naming the field), and the
responses A1111 clients parse (`images` as base64 PNG, `parameters`, and `info` as a JSON string)."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..engine import Result
from ..infotext import png_info
from ..schema import GenerateRequest, from_sdnext_payload


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
        for i, image in enumerate(result.images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=png_info(result.parameters))
            images.append(base64.b64encode(buffer.getvalue()).decode())
            infotexts.append(result.parameters)
            seeds.append(result.info["seed"] + i)
    first = results[0].info if results else {}
    info = {
        **first,
        "all_prompts": [first.get("prompt", "")] * len(images),
        "all_seeds": seeds,
        "infotexts": infotexts,
        "imprompt": [r.info for r in results],  # one entry per n_iter batch, with its own units and events
    }
    parameters = payload.model_dump(exclude={"ip_adapter"})
    parameters["ip_adapter"] = [{**u.model_dump(exclude={"images", "masks", "negative_images"}),
                                 "images": len(u.images)} for u in payload.ip_adapter]  # fmt: skip
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}
