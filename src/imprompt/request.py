"""The one request shape (GenerateRequest and its IP-Adapter units) that the CLI, Python and HTTP all build.

The server builds it from A1111 / SD.Next payloads (`server/a1111.py`); the engine takes nothing else.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RequestError

SCALE_RANGE = (-1.0, 5.0)  # ComfyUI_IPAdapter_plus's weight range; SD.Next's slider is the 0..1 part of it
LORA_WEIGHT_RANGE = (-10.0, 10.0)  # wider than any UI's slider (A1111 has none: the tag takes any number)


class LoraWeight(BaseModel):
    """A LoRA and how strongly it acts (also written in the prompt as `<lora:NAME:WEIGHT>`)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="file stem (as in <lora:NAME:...>), relative path, or path")
    weight: float = Field(1.0, ge=LORA_WEIGHT_RANGE[0], le=LORA_WEIGHT_RANGE[1])


class IPAdapterUnit(BaseModel):
    """One image prompt: an adapter, its reference image(s) (or saved embeddings), and how strongly, when and
    where it acts."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    adapter: str = Field(min_length=1, description="friendly name (Base ViT-G), file stem, or path")
    images: list[Any] = Field(default_factory=list, description="PIL images, file paths, or base64 strings")
    embeddings: str | None = Field(None, description="saved embeddings (name or path) used instead of images")
    face_embeddings: list[list[float]] | str | None = Field(
        None, description="FaceID: face embeddings (512 floats per face, or a .npy / .safetensors file) instead of images"
    )
    scale: float = Field(1.0, ge=SCALE_RANGE[0], le=SCALE_RANGE[1])
    start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps where the unit starts acting")
    end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps where it stops acting")
    encoder: str | None = Field(None, description="force an image encoder; it must produce what the adapter needs")
    average: bool = Field(False, description="average the images' embeddings into one set of tokens")
    masks: list[Any] | None = Field(None, description="one mask per image (one if averaged): where the unit acts")
    layers: str | dict | list[float] | None = Field(
        None, description="per-block weights: style, composition, style+composition, or {down/mid/up: ...}; "
                          "SD 3.5 / FLUX: a list, one weight per block"
    )  # fmt: skip
    negative_images: list[Any] | None = Field(
        None, description='images encoded for the negative branch instead of zeros, or ["noise"]'
    )
    crop: bool = Field(False, description="SD.Next's face crop of the images before encoding; not supported yet")
    structure: float = Field(
        1.0, ge=SCALE_RANGE[0], le=SCALE_RANGE[1],
        description="FaceID Plus v2: weight of the face-structure shortcut (SD.Next's ip_structure, diffusers' "
                    "shortcut_scale, ComfyUI's weight_faceidv2)",
    )  # fmt: skip
    faceid_version: Literal["v1", "v2"] | None = Field(
        None, description="FaceID Plus: v1 or v2 (the files have the same tensors); None: read from the file name"
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) is after end ({self.end}); use start <= end")
        given = [name for name in ("images", "embeddings", "face_embeddings") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                "give one of images, embeddings (saved with `imprompt embed`) or face_embeddings (FaceID), "
                f"not {' and '.join(given) or 'none'}"
            )
        faces = len(self.face_embeddings) if isinstance(self.face_embeddings, list) else 1
        count = 1 if self.average or self.embeddings else (faces if self.face_embeddings else len(self.images))
        if self.masks is not None and len(self.masks) != count:
            raise ValueError(
                f"{len(self.masks)} masks for {count} {'averaged image' if count == 1 and self.average else 'images'}; "
                f"give one mask per image{' (one in all when averaging)' if self.average else ''}"
            )
        if self.negative_images is not None and len(self.negative_images) not in (1, len(self.images)):
            raise ValueError(
                f"{len(self.negative_images)} negative images for {len(self.images)} images; give one, or one per image"
            )
        if self.negative_images is not None and (self.embeddings or self.face_embeddings):
            raise ValueError("negative_images cannot be combined with saved embeddings (they carry their negative)")
        if self.crop:
            raise ValueError("crop=true (SD.Next's face crop) is not supported yet; crop the image yourself")
        return self

    def active_at(self, step: int, total: int) -> bool:
        """Whether the unit acts at denoising step `step` of `total`: start <= step/total < end."""
        return self.start <= step / total < self.end


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="pipeline name; None: the engine's default model")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, lt=2**32, description="-1: a random seed (reported in the result)")
    steps: int = Field(20, ge=1, le=150)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0, description="FLUX: the embedded guidance (diffusers' guidance_scale)")
    true_cfg_scale: float = Field(
        1.0, ge=1.0, le=30.0, description="FLUX only: true classifier-free guidance (needs a negative prompt or a "
                                          "negative image); 1: off"
    )  # fmt: skip
    width: int | None = Field(None, ge=64, le=2048, description="None: the model's native size")
    height: int | None = Field(None, ge=64, le=2048)
    batch_size: int = Field(1, ge=1, le=8)
    sampler: str = "Default"
    ip_adapters: list[IPAdapterUnit] = Field(default_factory=list, description="how many: see Engine(max_units)")
    loras: list[LoraWeight] = Field(default_factory=list, description="besides the <lora:...> tags in the prompt")
    clip_skip: int = Field(1, ge=1, le=12, description="A1111's CLIP_stop_at_last_layers: 1 = the last layer")
    vae: str | None = Field(None, description="a VAE file from the models folders; None: the model's own")
    init_images: list[Any] | None = Field(None, description="img2img: the image to start from (the first is used)")
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0, description="img2img: how much of it is redrawn")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value):
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE works on 8x8 pixel blocks)")
        return value


def parse_request(request: GenerateRequest | dict | None = None, **fields) -> GenerateRequest:
    """Validate a request given as a model, a dict or keyword arguments; errors become `RequestError`."""
    if isinstance(request, GenerateRequest):
        return request.model_copy(update=fields) if fields else request
    try:
        return GenerateRequest.model_validate({**(request or {}), **fields})
    except ValidationError as exc:
        raise RequestError(describe_validation_error(exc)) from None


def parse_unit(unit: IPAdapterUnit | dict) -> IPAdapterUnit:
    if isinstance(unit, IPAdapterUnit):
        return unit
    try:
        return IPAdapterUnit.model_validate(unit)
    except ValidationError as exc:
        raise RequestError(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "request"
        message = err["msg"].removeprefix("Value error, ")
        found = err.get("input")
        shown = "" if isinstance(found, (dict, list)) or found is None else f" (got {str(found)[:60]!r})"
        parts.append(f"{where}: {message}{shown}")
    return "invalid request: " + "; ".join(parts)
