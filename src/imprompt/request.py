"""The one request shape (GenerateRequest and its IP-Adapter units) that the CLI, Python and HTTP all build.

The server builds it from A1111 / SD.Next payloads (`server/a1111.py`); the engine takes nothing else.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ImpromptError, LimitError, RequestError, shown

SCALE_RANGE = (-1.0, 5.0)  # ComfyUI_IPAdapter_plus's weight range; SD.Next's slider is the 0..1 part of it
LORA_WEIGHT_RANGE = (-10.0, 10.0)  # wider than any UI's slider (A1111 has none: the tag takes any number)

# Ceilings on what any request may hold, checked while it is parsed (pydantic's `max_length`), so that an absurd
# body (300,000 tiny units in 9 MiB) is refused before anything converts it. They are not the limits that apply:
# those are the engine's `max_units` and `max_images` (the server's --max-units / --max-images; 413 LimitError
# naming them), which may be set up to these ceilings and no higher. A list over a ceiling is a LimitError too.
MAX_UNITS = 64  # IP-Adapter units in a request (the engine's max_units: 8 by default)
MAX_IMAGES = 256  # images, masks, negative images or faces in a unit, init images in a request (max_images: 16)
MAX_LORAS = 64  # LoRAs in a request's `loras`
MAX_EMBEDDING_WIDTH = 4096  # floats in one given face embedding (FaceID's are 512)
MAX_BLOCK_WEIGHTS = 1024  # weights in a `layers` list (SD 3.5 large has 38 joint blocks, FLUX 19 double blocks)
MAX_NAME = 4096  # characters in a name or path (Linux's PATH_MAX)
# Characters in a prompt: each 75 tokens are one more text-encoder pass and 77 more tokens every cross-attention
# layer reads at every step, so a 60 MiB prompt would hold the server for hours; A1111 prompts are far shorter.
MAX_PROMPT = 32_768


def _unicode(value):
    """Text must be Unicode that UTF-8 can carry: JSON can send a lone surrogate ("\\ud800"), which would fail deep
    in a tokenizer or a file lookup (a 500) instead of here (a 422 naming the field)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"not valid Unicode text (a lone surrogate, {exc.object[exc.start]!r}, at character {exc.start}); "
                f"send UTF-8 text"
            ) from None
    return value


Text = Annotated[str, BeforeValidator(_unicode)]  # a prompt, a name or a path: checked before its length and type
Name = Annotated[Text, Field(max_length=MAX_NAME)]


class LoraWeight(BaseModel):
    """A LoRA and how strongly it acts (also written in the prompt as `<lora:NAME:WEIGHT>`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: Name = Field(min_length=1, description="file stem (as in <lora:NAME:...>), relative path, or path")
    weight: float = Field(1.0, ge=LORA_WEIGHT_RANGE[0], le=LORA_WEIGHT_RANGE[1])


class IPAdapterUnit(BaseModel):
    """One image prompt: an adapter, its reference image(s) (or saved embeddings), and how strongly, when and
    where it acts."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", allow_inf_nan=False)

    adapter: Name = Field(min_length=1, description="friendly name (Base ViT-G), file stem, or path")
    images: list[Any] = Field(
        default_factory=list, max_length=MAX_IMAGES, description="PIL images, file paths, or base64 strings"
    )
    embeddings: Name | None = Field(None, description="saved embeddings (name or path) used instead of images")
    face_embeddings: (
        Annotated[list[Annotated[list[float], Field(max_length=MAX_EMBEDDING_WIDTH)]], Field(max_length=MAX_IMAGES)]
        | Name
        | None
    ) = Field(None, description="FaceID: face embeddings (512 floats per face, or a .npy / .safetensors file) instead of images")
    scale: float = Field(1.0, ge=SCALE_RANGE[0], le=SCALE_RANGE[1])
    start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps where the unit starts acting")
    end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps where it stops acting")
    encoder: Name | None = Field(None, description="force an image encoder; it must produce what the adapter needs")
    average: bool = Field(False, description="average the images' embeddings into one set of tokens")
    masks: list[Any] | None = Field(
        None, max_length=MAX_IMAGES, description="one mask per image (one if averaged): where the unit acts"
    )
    # the weights are checked (finite, in SCALE_RANGE) by `ipadapter.block_weights`, which knows the model's blocks
    layers: Name | dict | Annotated[list, Field(max_length=MAX_BLOCK_WEIGHTS)] | None = Field(
        None, description="per-block weights: style, composition, style+composition, or {down/mid/up: ...}; "
                          "SD 3.5 / FLUX: a list, one weight per block"
    )  # fmt: skip
    negative_images: list[Any] | None = Field(
        None, max_length=MAX_IMAGES, description='images encoded for the negative branch instead of zeros, or ["noise"]'
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
    downsample: int = Field(
        1, ge=1, le=27, description="FLUX Redux: pool each image's grid of tokens by this factor (27 x 27 -> 9 x 9 at 3)"
    )
    controlnet_scale: float | None = Field(
        None, ge=0.0, le=SCALE_RANGE[1],
        description="InstantID: its IdentityNet's weight (SD.Next's id_conditioning); default 0.8",
    )  # fmt: skip
    pose_image: Any | None = Field(
        None, description="InstantID: a picture whose face's keypoints the IdentityNet reads instead of the face's"
    )
    identitynet: Name | None = Field(
        None, description="InstantID: its IdentityNet ControlNet; default: the one beside the adapter or named so"
    )
    aligned_face: Any | None = Field(
        None, description="PuLID: the face already aligned to the FFHQ 512 template, read by EVA-CLIP beside "
                          "face_embeddings (antelopev2's raw embedding), instead of an image"
    )  # fmt: skip
    start_step: int | None = Field(
        None, ge=0, le=1000, description="PuLID: the first step its ID acts at (PuLID's start_step); else `start`"
    )
    num_zero: int | None = Field(
        None, ge=0, le=80, description="PuLID SDXL v1.1: zero tokens appended to the ID tokens (SD.Next's Zero); default 20"
    )
    ortho: Literal["off", "v1", "v2"] | None = Field(
        None, description="PuLID SDXL v1.1: how the ID attention is added (SD.Next's Ortho); default v2"
    )

    @field_validator("masks")
    @classmethod
    def _empty_masks_are_none(cls, value):
        return value or None  # `masks: []` (SD.Next's default) means no masks, as SD.Next reads it

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


# The A1111 ControlNet extension's control modes and resize modes, by name (its API also takes their index)
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
CONTROL_WEIGHT_RANGE = (0.0, 2.0)  # the extension's weight slider


class ControlNetUnit(BaseModel):
    """One ControlNet: a model, the picture it reads (made into a control image by a preprocessor, or given
    finished with `module="none"`), and how strongly and when it acts, as the A1111 ControlNet extension's unit."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", allow_inf_nan=False)

    model: Name = Field(min_length=1, description='file name, stem, folder name, "name [hash]" or path')
    image: Any = Field(description="the picture: PIL image, path or base64 (with module none: the control image)")
    module: Name = Field("none", description="the preprocessor (the extension's module names); none: the image is the control image")
    weight: float = Field(1.0, ge=CONTROL_WEIGHT_RANGE[0], le=CONTROL_WEIGHT_RANGE[1])
    start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps where it starts acting")
    end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps where it stops acting")
    control_mode: Literal[CONTROL_MODES] = "Balanced"  # type: ignore[valid-type]
    resize_mode: Literal[RESIZE_MODES] = "Crop and Resize"  # type: ignore[valid-type]
    processor_res: int | None = Field(None, ge=64, le=2048, description="the preprocessor's resolution; None: its default")
    threshold_a: float | None = Field(None, description="the preprocessor's first parameter; None: its default")
    threshold_b: float | None = Field(None, description="the preprocessor's second parameter; None: its default")
    pixel_perfect: bool = Field(False, description="the preprocessor's resolution from the image and output sizes")
    union_type: Name | int | None = Field(
        None, description="ControlNet Union / ProMax: the control type (name or index); None: from the preprocessor"
    )
    advanced_weighting: Annotated[list[Annotated[float, Field(ge=-10.0, le=10.0)]], Field(max_length=32)] | None = Field(
        None, description="the extension's per-residual scales (SD 1.5: 13, SDXL: 10; down blocks, then the middle "
                          "one), used instead of the weight and the control mode's scales"
    )  # fmt: skip

    @model_validator(mode="after")
    def _window(self):
        if self.start > self.end:
            raise ValueError(f"start ({self.start}) is after end ({self.end}); use start <= end")
        return self


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Name | None = Field(None, description="pipeline name; None: the engine's default model")
    prompt: Text = Field("", max_length=MAX_PROMPT)
    negative_prompt: Text = Field("", max_length=MAX_PROMPT)
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
    sampler: Name = "Default"
    ip_adapters: list[IPAdapterUnit] = Field(
        default_factory=list, max_length=MAX_UNITS, description="how many: see Engine(max_units)"
    )
    controlnets: list[ControlNetUnit] = Field(
        default_factory=list, max_length=MAX_UNITS, description="how many: see Engine(max_units)"
    )
    loras: list[LoraWeight] = Field(
        default_factory=list, max_length=MAX_LORAS, description="besides the <lora:...> tags in the prompt"
    )
    clip_skip: int = Field(1, ge=1, le=12, description="A1111's CLIP_stop_at_last_layers: 1 = the last layer")
    pad_cond_uncond: bool = Field(
        False, description="A1111's setting: a prompt and negative of unequal lengths padded with empty chunks and "
                           "run in one batch (cheaper; another picture); off: each at its own length, as A1111's default. "
                           "SD 1.5 / SDXL (SD 3.5 and FLUX pipelines read their prompts themselves)"
    )  # fmt: skip
    sdxl_clip_l_skip: bool = Field(
        False, description="A1111's setting: clip_skip acts on SDXL's CLIP-L (off: SDXL ignores clip_skip, as A1111); "
                           "no effect on other models"
    )
    vae: Name | None = Field(None, description="a VAE file from the models folders; None: the model's own (a "
                                                "transformer alone: the one found in the models folders)")
    text_encoders: list[Name] = Field(
        default_factory=list, max_length=4, description="a transformer alone (ComfyUI's split FLUX / SD 3.5 files): "
                                                        "its text encoder files (clip_l, clip_g, t5xxl); those not "
                                                        "given are found in the models folders"
    )  # fmt: skip
    init_images: list[Any] | None = Field(
        None, max_length=MAX_IMAGES, description="img2img: the image to start from (the first is used)"
    )
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0, description="img2img: how much of it is redrawn")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value):
        if value is not None and value % 8:
            raise ValueError(f"{value} is not a multiple of 8 (the VAE works on 8x8 pixel blocks)")
        return value


def parse_request(request: GenerateRequest | dict | None = None, **fields) -> GenerateRequest:
    """Validate a request given as a model, a dict or keyword arguments; errors become `RequestError` (a list over
    a ceiling: `LimitError`)."""
    if isinstance(request, GenerateRequest):
        return request.model_copy(update=fields) if fields else request
    try:
        return GenerateRequest.model_validate({**(request or {}), **fields})
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def parse_unit(unit: IPAdapterUnit | dict) -> IPAdapterUnit:
    if isinstance(unit, IPAdapterUnit):
        return unit
    try:
        return IPAdapterUnit.model_validate(unit)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def validation_error(errors: list[dict]) -> ImpromptError:
    """pydantic's (or FastAPI's) errors as one typed error: a `LimitError` (413) when a list is over its ceiling,
    else a `RequestError` (422)."""
    message = describe_errors(errors)
    return LimitError(message) if any(_list_too_long(err) for err in errors) else RequestError(message)


def _list_too_long(err: dict) -> bool:
    return err["type"] == "too_long" and not isinstance(err.get("input"), str)


def describe_validation_error(exc: ValidationError) -> str:
    return describe_errors(exc.errors())


def location(part) -> str:
    """A part of pydantic's error location as a client reads it: a field, an index, or for a field of several types
    the type that was tried (pydantic names it by its validators, `function-after[...]`, which says nothing)."""
    text = str(part)
    if "[" not in text:
        return text
    return next((kind for kind in ("list", "dict", "str") if text.startswith(f"{kind}[") or f" {kind}]" in text), "value")


def describe_errors(errors: list[dict]) -> str:
    """One message naming each field and what is wrong with it; the values a client sent are shown cut short (a
    1 MB string comes back as its first characters and its length), lists and objects not at all."""
    parts = []
    for err in errors:
        where = ".".join(location(p) for p in err["loc"] if p != "body") or "request"  # FastAPI's start at body
        ctx, found = err.get("ctx") or {}, err.get("input")
        if _list_too_long(err):
            message = f"{ctx.get('actual_length')} items, more than the {ctx['max_length']} any request may hold; send fewer"
        elif err["type"] in ("too_long", "string_too_long") and isinstance(found, str):
            message = f"{len(found)} characters, more than the {ctx['max_length']} accepted; send a shorter one"
            found = found[:20]
        elif err["type"] == "string_unicode":
            message = "not valid Unicode text (a lone surrogate); send UTF-8 text"
        else:
            message = err["msg"].removeprefix("Value error, ")
        got = "" if isinstance(found, (dict, list)) or found is None else f" (got {shown(found)})"
        parts.append(f"{where}: {message}{got}")
    return "invalid request: " + "; ".join(parts)
