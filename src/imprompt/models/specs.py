"""What a file is, as its tensors say (adapter, encoder, pipeline, LoRA, VAE, ...): plain data.

Every later stage works from these: the plan checks them against each other, loading builds modules from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from . import catalog

# Pipeline classes imprompt can run (read from model_index.json, or decided from a single file's tensors).
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
# pipeline class -> the denoiser architecture adapters attach to
ARCHITECTURES = {"StableDiffusionPipeline": "unet", "StableDiffusionXLPipeline": "unet",
                 "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}  # fmt: skip
# What a model's `imprompt.json` may suggest, and of which type: the web page's starting values.
MODEL_DEFAULTS = {"prompt": str, "negative_prompt": str, "steps": int, "cfg_scale": float, "sampler": str,
                  "width": int, "height": int, "ip_scale": float}  # fmt: skip


@dataclass(frozen=True)
class AdapterSpec:
    """An IP-Adapter as its tensors describe it."""

    path: str
    variant: str  # base | plus | full-face | faceid | faceid-plus | instantid | sd3 | flux | redux
    # image_embeds | hidden_states | faceid_embeds (buffalo_l's, FaceID) | face_embeds (antelopev2's raw ArcFace
    # embedding, InstantID) | last_hidden_state (SigLIP's, post-norm: Redux)
    consumes: str
    embed_dim: int  # width of the encoder output it consumes
    tokens: int  # image tokens it adds to cross-attention (Redux: 0, one per encoder patch, however many)
    cross_attention_dim: int  # UNet width it targets (Redux: the T5 width of the tokens it appends to the prompt's)
    layer_widths: tuple[int, ...] = field(repr=False)  # per cross-attention layer, in UNet processor order
    # FaceID only: the LoRA embedded in the file (its rank), the CLIP hidden-state width the Plus family also
    # consumes, and what tensors cannot tell: Plus v1 or v2, Portrait normalised or not (decided by the file name,
    # as every tool does; `faceid_from` says so)
    lora_rank: int | None = None
    clip_width: int | None = None
    faceid_version: str | None = None  # v1 | v2 (Plus), unnorm (Portrait SDXL unnorm); None for the others
    faceid_from: str | None = None  # how the version was decided
    # the denoiser it attaches to: unet (SD 1.5 / 2.x / SDXL), sd3 (SD 3.5, InstantX) or flux (FLUX.1, XLabs); for
    # transformers `cross_attention_dim` is the width of what its to_k_ip reads and `layer_widths` its blocks'.
    # FLUX Redux (variant "redux", `conditioning/redux.py`) is no IP-Adapter in diffusers' sense but pairs like one
    # (an image encoder's output in, chosen by the same rule): it attaches to no block (`layer_widths` empty) and
    # appends tokens of T5's width to the prompt's; `redux_hidden` is its up-projection's width (3 x T5's)
    architecture: str = "unet"
    encoder_type: str = "clip"  # clip | siglip | antelopev2 (InsightFace's pack): what produced what it consumes
    kind: str = "ip-adapter"
    redux_hidden: int | None = None
    # PuLID (variant "pulid": FLUX v0.9.x; "pulid-sdxl": SDXL v1.1): it consumes antelopev2's raw
    # face embedding (`embed_dim` 512) and an EVA02-CLIP tower's hidden states (`clip_width`, 1024) and cls output
    # (`eva_projection`, 768); `tokens` its ID tokens (32), `cross_attention_dim` the FLUX hidden width its CAs read
    # (3072), `layer_widths` one per CA (`conditioning/pulid.py`)
    eva_projection: int | None = None

    @property
    def family(self) -> str:
        return catalog.model_family(self.architecture, self.cross_attention_dim)

    @property
    def face_embedding(self) -> str | None:
        """FaceID: which InsightFace embedding it was trained on: "raw" (Portrait unnorm) or "normed"; None: no FaceID."""
        if self.consumes != "faceid_embeds":
            return None
        return "raw" if self.faceid_version == "unnorm" else "normed"

    @property
    def needs(self) -> str:
        """What it consumes, in words: `image_embeds[1024]`; FaceID Plus also names its face crop's encoder output."""
        if self.variant.startswith("pulid"):
            return (f"InsightFace antelopev2 face_embeds[{self.embed_dim}] + eva-clip hidden_states[{self.clip_width}] "
                    f"and cls[{self.eva_projection}] of the aligned face")  # fmt: skip
        crop = f" + hidden_states[{self.clip_width}] of the face crop" if self.clip_width else ""
        tower = {"siglip": "siglip ", "antelopev2": "InsightFace antelopev2 "}.get(self.encoder_type, "")
        return f"{tower}{self.consumes}[{self.embed_dim}]{crop}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = len(d.pop("layer_widths"))
        d["family"] = self.family
        return d


@dataclass(frozen=True)
class EncoderSpec:
    """A CLIP vision encoder as its tensors (and, for folders, its config) describe it."""

    path: str
    hidden_size: int
    projection_dim: int | None  # None: no visual projection, so no image_embeds
    num_layers: int
    image_size: int
    patch_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    architecture: str  # ViT-L-14 | ViT-H-14 | ViT-bigG-14 | SigLIP-so400m-14-384 | custom
    # clip (CLIPVisionModelWithProjection) | siglip (SiglipVisionModel: no projection) | eva-clip (EVA02-CLIP's
    # tower, imprompt's own module `ipadapter/eva_clip.py`: PuLID's face encoder, paired by `conditioning/pulid.py`)
    model_type: str = "clip"
    kind: str = "image-encoder"

    def produces(self, output: str, encoder_type: str = "clip") -> int | None:
        """Width of `output` ("image_embeds" | "hidden_states") this encoder gives, or None; None too when it is
        not the `encoder_type` asked for (a 1152-wide CLIP is no SigLIP)."""
        if encoder_type != self.model_type:
            return None
        return self.projection_dim if output == "image_embeds" else self.hidden_size

    @property
    def outputs(self) -> str:
        """What it produces, in words: `image_embeds[1024] and hidden_states[1280]`, `siglip hidden_states[1152]`."""
        if self.model_type == "siglip":
            return f"siglip hidden_states[{self.hidden_size}]"
        if self.model_type == "eva-clip":
            return f"eva-clip hidden_states[{self.hidden_size}] and cls[{self.projection_dim}]"
        parts = [f"hidden_states[{self.hidden_size}]"]
        if self.projection_dim:
            parts.insert(0, f"image_embeds[{self.projection_dim}]")
        return " and ".join(parts)

    def transformers_config(self):
        from transformers import CLIPVisionConfig, SiglipVisionConfig

        if self.model_type == "siglip":
            return SiglipVisionConfig(
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_attention_heads,
                image_size=self.image_size,
                patch_size=self.patch_size,
                hidden_act=self.hidden_act,
            )
        return CLIPVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            projection_dim=self.projection_dim or self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PipelineSpec:
    """A diffusers pipeline folder: its class and the UNet cross-attention layout adapters must match."""

    path: str
    pipeline_class: str
    cross_attention_dim: int
    layer_widths: tuple[int, ...] = field(repr=False)
    default_size: int
    layer_names: tuple[str, ...] = field(default=(), repr=False)  # "down_blocks.2.attentions.1.transformer_blocks.0"
    in_channels: int = 4  # of the UNet: 4 for text-to-image models, 9 for inpainting, 8 for instruct-pix2pix
    # settings the model's maker suggests (`imprompt.json` in its folder); the web page starts from them
    defaults: dict = field(default_factory=dict, compare=False, hash=False, repr=False)
    model_type: str = ""  # diffusers' name for what it is: v1, xl_base, inpainting, v2, ... ("" for folders)
    unsupported: str | None = None  # why imprompt cannot run it (said in the listing, raised by the plan)
    # unet | sd3 | flux. For transformers `cross_attention_dim` is the width their IP-Adapters' to_k_ip read (SD3:
    # the blocks' width; FLUX: T5's, its joint attention width) and `layer_widths` the width of each block an
    # adapter attaches to (SD3: every joint block; FLUX: the double-stream blocks)
    architecture: str = "unet"
    # all-in-one SD 3.x / FLUX.1 single files: the text encoders the file holds (clip_l, clip_g, t5xxl)
    text_encoders: tuple[str, ...] = ()
    # layers of its (first) CLIP text encoder, how far back clip skip can reach; 0: not known
    text_encoder_layers: int = 0
    # a transformer alone (ComfyUI's `diffusion_models/`): the parts it needs from other files ("vae", "clip_l",
    # "clip_g", "t5xxl"), and the text-encoder widths its tensors expect ((role, width), ...), which pair them
    parts: tuple[str, ...] = ()
    text_encoder_widths: tuple[tuple[str, int], ...] = ()
    # how its denoiser's weights are stored: "" (fp16 / bf16 / fp32), fp8_e4m3fn, fp8_e5m2, scaled_fp8, gguf_Q8_0, ...
    quantization: str = ""
    kind: str = "pipeline"
    single_blocks: int = 0  # FLUX: its single-stream blocks (PuLID's CAs follow some of them; folder and single-file
    # probes both count them); 0: not read, and PuLID is refused rather than guessed

    @property
    def family(self) -> str:
        return catalog.model_family(self.architecture, self.cross_attention_dim)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cross_attention_layers"] = len(d.pop("layer_widths"))
        d.pop("layer_names")
        d["family"] = self.family
        d["text_encoders"] = list(self.text_encoders)
        d["parts"] = list(self.parts)
        d["text_encoder_widths"] = dict(self.text_encoder_widths)
        return d


@dataclass(frozen=True)
class EmbeddingsSpec:
    """Saved image embeddings (`imprompt embed`): which encoder output they are, so they pair like an encoder."""

    path: str
    output: str  # image_embeds | hidden_states | faceid_embeds
    width: int
    images: int  # sets of tokens (1 when averaged)
    tokens: int | None  # hidden-state tokens per image; None for image_embeds
    encoder: str
    encoder_architecture: str
    image_hashes: tuple[str, ...]
    clip_width: int | None = None  # FaceID: hidden states of the face crop saved beside (what Plus also reads)
    face_embedding: str | None = None  # FaceID: "normed" (what most FaceID adapters read) | "raw" (Portrait unnorm)
    kind: str = "ip-embeddings"

    @property
    def gives(self) -> str:
        crop = f" + hidden_states[{self.clip_width}] of the face crop" if self.clip_width else ""
        kind = f" ({self.face_embedding})" if self.face_embedding else ""
        return f"{self.output}[{self.width}]{kind}{crop}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_hashes"] = list(self.image_hashes)
        return d


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA (kohya / A1111 names, LyCORIS, diffusers / PEFT, XLabs, ComfyUI's BFL names), for the UNet or the
    transformer and, or, the text encoders."""

    path: str
    # UNet: cross-attention width of the models it is for (768 SD 1.5, 1024 SD 2.x, 2048 SDXL); transformers: the
    # blocks' width (FLUX.1 3072, SD 3.5 Large 2432, SD 3.x Medium 1536); None if nothing tells
    width: int | None
    format: str  # kohya | lycoris-loha | lycoris-lokr | lycoris | diffusers | xlabs | comfyui
    rank: int | None  # of its first low-rank pair (None where the format has no rank)
    parts: tuple[str, ...]  # unet or transformer, text_encoder, text_encoder_2, text_encoder_3
    kind: str = "lora"
    # the denoiser it is for: unet | sd3 | flux, or dit where the names are a transformer's but do not tell which
    # (diffusers' `transformer.transformer_blocks.*` alone, at a width neither family's published models have)
    architecture: str = "unet"

    @property
    def family(self) -> str:
        if self.architecture == "dit":
            return "SD 3.5 or FLUX.1"
        if self.architecture != "unet":
            return catalog.model_family(self.architecture, self.width or 0)
        return catalog.unet_family(self.width) if self.width else "unknown family"

    def to_dict(self) -> dict:
        return {**asdict(self), "family": self.family}


@dataclass(frozen=True)
class TextEncoderSpec:
    """A text encoder alone (ComfyUI's `text_encoders/` / `clip/`: clip_l, clip_g, t5xxl), as its tensors say."""

    path: str
    role: str  # clip | t5xxl
    width: int  # hidden size (CLIP) or d_model (T5)
    layers: int
    projection: int | None = None  # CLIP: the width of its text_projection, if it has one
    quantization: str = ""  # "" | fp8_e4m3fn | fp8_e5m2 | scaled_fp8 | gguf_<type>
    kind: str = "text-encoder"

    @property
    def family(self) -> str:
        return f"T5 ({self.width} wide)" if self.role == "t5xxl" else f"CLIP text ({self.width} wide)"

    @property
    def detail(self) -> str:
        """One line for a listing: "CLIP text encoder (12 layers, width 768, projection 768)", "T5 text encoder
        (24 layers, width 4096, fp8_e4m3fn)"."""
        what = "T5 text encoder" if self.role == "t5xxl" else "CLIP text encoder"
        projection = f", projection {self.projection}" if self.projection else ""
        stored = f", {self.quantization}" if self.quantization else ""
        return f"{what} ({self.layers} layers, width {self.width}{projection}{stored})"

    def to_dict(self) -> dict:
        return {**asdict(self), "family": self.family, "detail": self.detail}


@dataclass(frozen=True)
class VaeSpec:
    """A standalone VAE (A1111's VAE/, ComfyUI's vae/): single file in LDM or diffusers names, or a folder."""

    path: str
    format: str  # ldm | diffusers
    latent_channels: int  # 4: SD 1.x, 2.x and SDXL VAEs (same shapes); 16: SD 3 and FLUX
    kind: str = "vae"

    @property
    def family(self) -> str:
        return "SD 1.x / 2.x / SDXL" if self.latent_channels == 4 else f"{self.latent_channels} latent channels (SD 3 / FLUX)"

    def to_dict(self) -> dict:
        return {**asdict(self), "family": self.family}


@dataclass(frozen=True)
class TextualInversionSpec:
    """A textual-inversion embedding (A1111's embeddings/): token vectors for one text encoder, or SDXL's two."""

    path: str
    widths: tuple[int, ...]  # of its vectors, one per text encoder: (768,) SD 1.5, (1024,) SD 2.x, (768, 1280) SDXL
    vectors: int
    kind: str = "textual-inversion"

    @property
    def family(self) -> str:
        return TEXT_FAMILIES.get(self.widths, f"text encoders of width {' + '.join(map(str, self.widths))}")

    def fits(self, pipeline: PipelineSpec) -> bool:
        """Whether its vectors fit the pipeline's text encoders (their widths add up to the cross-attention width;
        SDXL's two need a two-encoder embedding)."""
        two_encoders = pipeline.pipeline_class.startswith("StableDiffusionXL")
        return sum(self.widths) == pipeline.cross_attention_dim and (len(self.widths) == 2) == two_encoders

    def to_dict(self) -> dict:
        return {**asdict(self), "family": self.family}


TEXT_FAMILIES = {(768,): "SD 1.5", (1024,): "SD 2.x", (768, 1280): "SDXL"}


@dataclass(frozen=True)
class OtherModelSpec:
    """A file imprompt recognises but does not run: ControlNet, T2I-Adapter, upscaler, face restorer, a text encoder
    or diffusion model on its own. Listed as what it is, so a whole A1111 / ComfyUI tree reads right."""

    path: str
    kind: str  # controlnet | t2i-adapter | upscaler | face-restorer | text-encoder | diffusion-model | unknown
    detail: str  # what the tensors say, in words ("SD 1.5 ControlNet (LDM names)", "ESRGAN (RRDBNet)", ...)

    def to_dict(self) -> dict:
        return asdict(self)


# The SDXL ControlNet Union / ProMax control types, in the order of their mode index (xinsir's and the A1111
# extension's: 0-5 in Union, 6 and 7 added by ProMax), and InstantX's / Shakker-Labs' FLUX Union modes.
UNION_TYPES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal", "segment",
               "tile", "repaint")  # fmt: skip
FLUX_UNION_TYPES = ("canny", "tile", "depth", "blur", "pose", "gray", "low quality")


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet (or a file of a kind the field keeps beside them: Control-LoRA, T2I-Adapter, ControlNet-XS,
    LLLite) as its tensors describe it: the denoiser it feeds and the width it was trained for, its Union modes."""

    path: str
    format: str  # diffusers | ldm (the original `control_model.*` / bare `input_blocks.*` names)
    architecture: str  # unet | sd3 | flux: the denoiser it feeds
    # UNet: the cross-attention width (768 SD 1.5, 1024 SD 2.x, 2048 SDXL); SD3: the blocks' width; FLUX: the
    # context (T5) width: the same numbers a PipelineSpec of that denoiser has
    cross_attention_dim: int
    union: bool = False
    control_types: tuple[str, ...] = ()  # Union modes in the order of their index
    variant: str = ""  # in words: "SD 1.5 ControlNet", "SDXL ControlNet Union ProMax", "FLUX ControlNet", ...
    unsupported: str | None = None  # why imprompt cannot run it, with the fix
    kind: str = "controlnet"  # "t2i-adapter" for T2I-Adapters (listed as what they are)

    @property
    def family(self) -> str:
        if not self.cross_attention_dim or self.architecture not in ARCHITECTURES.values():
            return "unknown family"
        return catalog.model_family(self.architecture, self.cross_attention_dim)

    def mismatch(self, pipeline: PipelineSpec) -> str | None:
        """None if it can run with `pipeline`; else a sentence naming both (family and width)."""
        if self.architecture == pipeline.architecture and self.cross_attention_dim == pipeline.cross_attention_dim:
            return None
        name = Path(self.path).name
        model = Path(pipeline.path).name
        return (f"ControlNet {name} is for {self.family} models (width {self.cross_attention_dim}), but model {model} is "
                f"{pipeline.family} (width {pipeline.cross_attention_dim}). Choose a ControlNet made for "
                f"{pipeline.family}, or a {self.family} model")  # fmt: skip

    @property
    def detail(self) -> str:
        """One line for a listing: what it is, in which names, and why it cannot run if it cannot."""
        modes = f", {len(self.control_types)} modes" if self.union else ""
        refused = f"; not supported: {self.unsupported}" if self.unsupported else ""
        return f"{self.variant} ({self.format} names{modes}){refused}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["control_types"] = list(self.control_types)
        d["family"] = self.family
        d["detail"] = self.detail
        return d


EMBEDDINGS_FORMAT = "imprompt.ip-embeddings.v1"

Spec = (AdapterSpec | EncoderSpec | PipelineSpec | EmbeddingsSpec | LoraSpec | VaeSpec | TextualInversionSpec
        | ControlNetSpec | TextEncoderSpec | OtherModelSpec)
SPEC_CLASSES = (AdapterSpec, EncoderSpec, PipelineSpec, EmbeddingsSpec, LoraSpec, VaeSpec, TextualInversionSpec,
                ControlNetSpec, TextEncoderSpec)  # fmt: skip


def spec_to_json(spec: Spec) -> dict:
    """A spec as JSON, to keep probe results on disk (models/probe_cache.py)."""
    return {"class": type(spec).__name__, **asdict(spec)}


def spec_from_json(data: dict) -> Spec:
    """The inverse of `spec_to_json` (tuples come back as tuples)."""
    classes = {cls.__name__: cls for cls in (*SPEC_CLASSES, OtherModelSpec)}
    data = dict(data)
    cls = classes[data.pop("class")]
    tuples = {f.name for f in fields(cls) if str(f.type).startswith("tuple")}
    return cls(**{k: _tuples(v) if k in tuples else v for k, v in data.items()})


def _tuples(value):
    """JSON's lists back as the (possibly nested) tuples they were."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def unet_layer_order(name: str):
    """Sort key matching `UNet2DConditionModel.attn_processors` order: down blocks, up blocks, then mid block.
    `PipelineSpec.layer_names` and the h94 adapter keys (1, 3, 5, ...) follow it."""
    parts = name.split(".")
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}.get(parts[0], 3)
    return group, tuple(int(p) for p in parts if p.isdigit())
