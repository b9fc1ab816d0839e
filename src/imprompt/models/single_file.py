"""A1111 / SD.Next single-file checkpoints: their model type and configs, offline.

A single file (`models/Stable-diffusion/*.safetensors`) holds weights in the original (LDM) layout and no
configuration. What kind of model it is comes from diffusers' own detection (`infer_diffusers_model_type`: SD 1.5,
SD 2, inpainting, SDXL base and refiner, Playground, upscalers, ...). Loading goes through diffusers'
`from_single_file`, which needs a diffusers config folder that it normally downloads: imprompt ships the small
SD 1.5 and SDXL config files (`configs/`), sets every width the tensors decide (channels, blocks per level,
transformer depths, conditioning widths, text-encoder sizes) and fills in what shapes cannot say (attention heads,
activations, VAE scaling) from the family's published convention. The CLIP tokenizer's vocabulary is built from
the BPE merges file of the `openai-clip` package on PyPI (`clip/bpe_simple_vocab_16e6.txt.gz`, the file OpenAI's
CLIP tokenizer ships), so nothing is downloaded at run time.

SD 3.x and FLUX.1 run from all-in-one single files (ComfyUI's `checkpoints/`: the transformer, the VAE and the text
encoders under `text_encoders.clip_l.` / `clip_g.` / `t5xxl.`), which is what diffusers' `from_single_file` loads
on its own. Their configs come the same way: SD 3.5 Large's and FLUX.1 dev's, with every width the tensors decide.
T5's tokenizer is in no checkpoint and cannot be built from one: it is taken from a ComfyUI install around the
model (which ships it) or from the Hugging Face cache, and the plan names the fix when neither has it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, MissingTokenizerError, UnsupportedError
from ..loading.tensors import REDOWNLOAD, TensorInfo, quantization
from . import catalog
from .specs import PipelineSpec, unet_layer_order

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CONFIGS = Path(__file__).parent / "configs"

# diffusers' model type -> (pipeline class, config folder, default image size): the types imprompt runs
RUNNABLE = {
    "v1": ("StableDiffusionPipeline", "sd15", 512),
    "xl_base": ("StableDiffusionXLPipeline", "sdxl", 1024),
}
# diffusers' model types, as users call them (for refusals)
TYPE_NAMES = {
    "v1": "SD 1.5", "v2": "SD 2.x", "xl_base": "SDXL", "xl_refiner": "SDXL refiner", "inpainting": "SD 1.5 inpainting",
    "inpainting_v2": "SD 2 inpainting", "xl_inpaint": "SDXL inpainting", "playground-v2-5": "Playground v2.5",
    "upscale": "SD x4 upscaler", "controlnet": "ControlNet", "sd3": "SD 3", "sd35_medium": "SD 3.5 Medium",
    "sd35_large": "SD 3.5 Large", "flux-dev": "FLUX.1 dev", "flux-schnell": "FLUX.1 schnell",
}  # fmt: skip
# diffusers' model type -> the pipeline class that runs it (for the listing of types imprompt does not run)
TYPE_PIPELINES = {
    "v2": "StableDiffusionPipeline", "inpainting": "StableDiffusionInpaintPipeline",
    "inpainting_v2": "StableDiffusionInpaintPipeline", "xl_inpaint": "StableDiffusionXLInpaintPipeline",
    "xl_refiner": "StableDiffusionXLImg2ImgPipeline", "playground-v2-5": "StableDiffusionXLPipeline",
    "upscale": "StableDiffusionUpscalePipeline", "sd3": "StableDiffusion3Pipeline",
    "sd35_medium": "StableDiffusion3Pipeline", "sd35_large": "StableDiffusion3Pipeline", "flux-dev": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
}  # fmt: skip
# cross-attention width -> model type, where diffusers' markers (a few layer indices of the full-size models,
# e.g. the 10th text-encoder block) are absent, as in checkpoints with shallower text encoders
BY_CROSS_ATTENTION = {768: "v1", 1024: "v2", 1280: "xl_refiner", 2048: "xl_base"}
# text encoders: config subfolder -> key prefix in the single file, and whether it is in OpenCLIP's layout
TEXT_ENCODERS = {
    "sd15": {"text_encoder": ("cond_stage_model.transformer.text_model.", False)},
    "sdxl": {
        "text_encoder": ("conditioner.embedders.0.transformer.text_model.", False),
        "text_encoder_2": ("conditioner.embedders.1.model.", True),
    },
}


# all-in-one SD 3.x / FLUX.1 files (ComfyUI's checkpoints/): text encoder -> key prefix
DIT_TEXT_ENCODERS = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                     "t5xxl": "text_encoders.t5xxl.transformer."}  # fmt: skip
# what each family's pipeline needs in the file, and the config subfolder each text encoder fills
DIT_NEEDS = {"sd3": ("clip_l", "clip_g"), "flux": ("clip_l", "t5xxl")}
DIT_SUBFOLDERS = {"sd3": {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
                  "flux": {"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}}  # fmt: skip
DIT_PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
# a transformer alone (ComfyUI's split layout): the parts it runs with, from other files (SD 3's T5 is optional)
SPLIT_PARTS = {"flux": ("vae", "clip_l", "t5xxl"), "sd3": ("vae", "clip_l", "clip_g")}
FLUX_SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}  # FLUX.1 schnell's, where dev's differ
# T5's tokenizer: where a ComfyUI install ships it, and the Hugging Face repositories (and subfolders) that hold it
COMFY_T5_TOKENIZER = Path("comfy") / "text_encoders" / "t5_tokenizer"
T5_TOKENIZER_REPOS = (("black-forest-labs/FLUX.1-schnell", "tokenizer_2"), ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
                      ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"),
                      ("stabilityai/stable-diffusion-3.5-medium", "tokenizer_3"), ("google/t5-v1_1-xxl", ""))  # fmt: skip
T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "special_tokens_map.json")
T5_TOKENIZER_FIX = ("Run `hf download black-forest-labs/FLUX.1-schnell tokenizer_2/tokenizer.json "
                    "tokenizer_2/tokenizer_config.json tokenizer_2/special_tokens_map.json` once (it lands in the "
                    "Hugging Face cache, where imprompt looks; FLUX.1 schnell's repository is not gated)")  # fmt: skip


def is_single_file_checkpoint(table: dict[str, TensorInfo]) -> bool:
    return any(k.startswith(UNET) for k in table)


def dit_architecture(table: dict[str, TensorInfo]) -> str | None:
    """"sd3" or "flux" for an all-in-one SD 3.x / FLUX.1 file, from its transformer's block names; None otherwise."""
    if UNET + "joint_blocks.0.x_block.attn.qkv.weight" in table:
        return "sd3"
    if UNET + "double_blocks.0.img_attn.qkv.weight" in table:
        return "flux"
    return None


def model_type(table: dict[str, TensorInfo]) -> str:
    """diffusers' name for what the checkpoint is ("v1", "xl_base", "inpainting", "v2", ...)."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    found = infer_diffusers_model_type(table)
    if found == "v1":  # diffusers' answer when none of its markers is present: decide by the conditioning width
        widths = {info.shape[-1] for key, info in table.items() if key.startswith(UNET) and key.endswith("attn2.to_k.weight")}
        if len(widths) == 1:
            found = BY_CROSS_ATTENTION.get(widths.pop(), "unknown")
    return found


def describe_type(name: str) -> str:
    return TYPE_NAMES.get(name, f"diffusers model type {name!r}")


@dataclass(frozen=True)
class UNetLayout:
    """What the UNet tensors of a single file say about its structure."""

    layers_per_block: int
    block_out_channels: tuple[int, ...]
    depth: tuple[int, ...]  # transformer blocks per attention block, per level (0: no attention)
    cross_attention_dim: int
    linear_projection: bool
    in_channels: int
    out_channels: int
    addition_input_dim: int | None  # SDXL's projection_class_embeddings_input_dim


def unet_layout(path, table: dict[str, TensorInfo]) -> UNetLayout:
    def shape(key):
        info = table.get(UNET + key)
        if info is None:
            raise CheckpointError(path, f"single-file checkpoint lacks {UNET}{key}", REDOWNLOAD)
        return info.shape

    cross = {info.shape[1] for key, info in table.items() if key.startswith(UNET) and key.endswith("attn2.to_k.weight")}
    if len(cross) != 1:
        raise CheckpointError(path, f"single-file UNet has cross-attention widths {sorted(cross)}, expected one")
    indices = sorted({int(k[len(UNET) :].split(".")[1]) for k in table if k.startswith(UNET + "input_blocks.")})
    channels, depth, per_level, level = [], [], [], 0
    blocks_in_level = 0
    for k in indices[1:]:
        if UNET + f"input_blocks.{k}.0.op.weight" in table:  # a downsampler closes the level
            per_level.append(blocks_in_level)
            level, blocks_in_level = level + 1, 0
            continue
        blocks_in_level += 1
        out = shape(f"input_blocks.{k}.0.out_layers.3.weight")[0]
        transformer = {
            int(key[len(UNET) :].split(".")[4]) for key in table
            if key.startswith(UNET + f"input_blocks.{k}.1.transformer_blocks.")
        }  # fmt: skip
        if len(channels) == level:
            channels.append(out)
            depth.append(len(transformer))
    per_level.append(blocks_in_level)
    if len(set(per_level)) != 1 or not channels:
        raise CheckpointError(path, f"unexpected UNet layout in single file (resnets per level {per_level})", REDOWNLOAD)
    proj_in = [info for key, info in table.items() if key.startswith(UNET) and key.endswith(".1.proj_in.weight")]
    if not proj_in:
        raise CheckpointError(path, "single-file UNet has no attention block (no *.1.proj_in.weight)", REDOWNLOAD)
    label = table.get(UNET + "label_emb.0.0.weight")
    return UNetLayout(
        layers_per_block=per_level[0],
        block_out_channels=tuple(channels),
        depth=tuple(depth),
        cross_attention_dim=next(iter(cross)),
        linear_projection=len(proj_in[0].shape) == 2,
        in_channels=shape("input_blocks.0.0.weight")[1],
        out_channels=shape("out.2.weight")[0],
        addition_input_dim=label.shape[1] if label is not None else None,
    )


def single_file_spec(path: Path, table: dict[str, TensorInfo], metadata: dict | None = None) -> PipelineSpec:
    """The pipeline spec of a single file: its model type, and its cross-attention layers renamed from LDM to
    diffusers order. A type imprompt cannot run is listed as what it is, with the reason the plan will give."""
    architecture = dit_architecture(table)
    if architecture is not None:
        return transformer_single_file_spec(path, table, architecture, metadata or {})
    kind = model_type(table)
    if kind not in RUNNABLE:
        widths = {info.shape[-1] for key, info in table.items() if key.startswith(UNET) and key.endswith("attn2.to_k.weight")}
        return PipelineSpec(
            path=str(path),
            pipeline_class=TYPE_PIPELINES.get(kind, "unknown"),
            cross_attention_dim=widths.pop() if len(widths) == 1 else 0,
            layer_widths=(),
            default_size=0,
            model_type=kind,
            unsupported=(
                f"{path}: a {describe_type(kind)} single-file checkpoint (diffusers model type {kind!r}); imprompt "
                f"runs {' and '.join(describe_type(t) for t in RUNNABLE)} checkpoints (text-to-image and "
                f"image-to-image). Use another checkpoint"
            ),
        )
    pipeline_class, _, size = RUNNABLE[kind]
    layout = unet_layout(path, table)
    step = layout.layers_per_block + 1
    layers = []
    for key, info in table.items():
        if not (key.startswith(UNET) and key.endswith(".attn2.to_k.weight")):
            continue
        parts = key[len(UNET) :].split(".")  # input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight
        k = int(parts[1])
        t = int(parts[3] if parts[0] == "middle_block" else parts[4])  # middle_block.1.transformer_blocks.0...
        if parts[0] == "input_blocks":
            name = f"down_blocks.{(k - 1) // step}.attentions.{(k - 1) % step}.transformer_blocks.{t}"
        elif parts[0] == "output_blocks":
            name = f"up_blocks.{k // step}.attentions.{k % step}.transformer_blocks.{t}"
        else:
            name = f"mid_block.attentions.0.transformer_blocks.{t}"
        layers.append((name, info.shape[0]))
    layers.sort(key=lambda item: unet_layer_order(item[0]))
    return PipelineSpec(
        path=str(path),
        pipeline_class=pipeline_class,
        cross_attention_dim=layout.cross_attention_dim,
        layer_widths=tuple(width for _, width in layers),
        default_size=size,
        layer_names=tuple(name for name, _ in layers),
        model_type=kind,
        text_encoder_layers=clip_l_layers(table),
    )


def clip_l_layers(table: dict[str, TensorInfo]) -> int:
    """Layers of the CLIP-L text encoder an SD 1.5 / SDXL file holds (transformers names in both)."""
    marker = "transformer.text_model.encoder.layers."
    found = {int(k.split(marker, 1)[1].split(".")[0]) for k in table if marker in k}
    return max(found) + 1 if found else 0


# ------------------------------------------------------------------------------------- SD 3.x and FLUX.1 files


def transformer_model_type(table: dict[str, TensorInfo], architecture: str) -> str:
    """diffusers' names: sd3 (SD 3 Medium: no q/k norms), sd35_medium (dual-attention blocks), sd35_large;
    flux-dev (guidance embedding), flux-schnell; flux-fill / flux-depth by their input channels."""
    if architecture == "sd3":
        if not any(k.startswith(UNET) and ".attn.ln_q." in k for k in table):
            return "sd3"
        return "sd35_medium" if any(k.startswith(UNET) and ".x_block.attn2." in k for k in table) else "sd35_large"
    image_in = table.get(UNET + "img_in.weight")
    channels = image_in.shape[1] if image_in is not None else 64
    if channels != 64:
        return {384: "flux-fill", 128: "flux-depth"}.get(channels, "flux-dev")
    return "flux-dev" if UNET + "guidance_in.in_layer.weight" in table else "flux-schnell"


def transformer_config(path, table: dict[str, TensorInfo], architecture: str) -> dict:
    """The transformer config fields the tensors decide (diffusers' names). Two things shapes cannot say come from
    the families' convention: SD 3 Medium's head width (64; SD 3.5's q/k norms give theirs), and how FLUX splits a
    head into rotary axes (FLUX.1's 16 / 56 / 56 of 128, scaled to the head width)."""

    def shape(key):
        info = table.get(UNET + key)
        if info is None:
            raise CheckpointError(path, f"single-file checkpoint lacks {UNET}{key}", REDOWNLOAD)
        return info.shape

    if architecture == "sd3":
        blocks = _block_indices(table, "joint_blocks.")
        width, in_channels, patch, _ = shape("x_embedder.proj.weight")
        norm = table.get(UNET + "joint_blocks.0.x_block.attn.ln_q.weight")
        head = norm.shape[0] if norm is not None else 64
        return {
            "num_layers": len(blocks), "attention_head_dim": head, "num_attention_heads": width // head,
            "patch_size": patch, "in_channels": in_channels,
            "out_channels": shape("final_layer.linear.weight")[0] // (patch * patch),
            "joint_attention_dim": shape("context_embedder.weight")[1],
            "caption_projection_dim": shape("context_embedder.weight")[0],
            "pooled_projection_dim": shape("y_embedder.mlp.0.weight")[1],
            "pos_embed_max_size": math.isqrt(shape("pos_embed")[1]),
            "dual_attention_layers": [i for i in blocks if UNET + f"joint_blocks.{i}.x_block.attn2.qkv.weight" in table],
            "qk_norm": "rms_norm" if norm is not None else None,
        }  # fmt: skip
    width, in_channels = shape("img_in.weight")
    head = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    return {
        "num_layers": len(_block_indices(table, "double_blocks.")),
        "num_single_layers": len(_block_indices(table, "single_blocks.")),
        "attention_head_dim": head, "num_attention_heads": width // head, "in_channels": in_channels,
        "joint_attention_dim": shape("txt_in.weight")[1], "pooled_projection_dim": shape("vector_in.in_layer.weight")[1],
        "guidance_embeds": UNET + "guidance_in.in_layer.weight" in table,
        "axes_dims_rope": [head // 8, head * 7 // 16, head * 7 // 16],
    }  # fmt: skip


def _block_indices(table: dict[str, TensorInfo], name: str) -> list[int]:
    return sorted({int(k[len(UNET + name) :].split(".")[0]) for k in table if k.startswith(UNET + name)})


def transformer_alone_architecture(table: dict[str, TensorInfo]) -> str | None:
    """"sd3" or "flux" for an SD 3.x / FLUX.1 transformer alone in its makers' bare names (ComfyUI's
    `diffusion_models/`: `flux1-dev.safetensors`, `sd3.5_large.safetensors`, city96's `.gguf`); None otherwise."""
    if "final_layer.linear.weight" not in table:  # a ControlNet or an adapter in the same block names
        return None
    return dit_architecture({UNET + key: table[key] for key in DIT_MARKERS if key in table})


DIT_MARKERS = ("joint_blocks.0.x_block.attn.qkv.weight", "double_blocks.0.img_attn.qkv.weight")


def transformer_alone_spec(path: Path, table: dict[str, TensorInfo], metadata: dict) -> PipelineSpec:
    """A transformer alone in bare names: read as the all-in-one file it would be a part of (its names under
    `model.diffusion_model.`), so it has the layers, widths and family of its diffusers folder."""
    prefixed = {UNET + key: info for key, info in table.items()}
    return transformer_single_file_spec(path, prefixed, dit_architecture(prefixed), metadata)


def transformer_single_file_spec(path: Path, table: dict[str, TensorInfo], architecture: str,
                                 metadata: dict | None = None) -> PipelineSpec:  # fmt: skip
    """An all-in-one SD 3.x / FLUX.1 file: the blocks its IP-Adapters attach to, as the folder probe reports them
    (SD 3: every joint block, reading image tokens of its own width; FLUX: the double-stream blocks, reading T5's
    width), and the text encoders it holds. A file that holds the transformer and nothing else (no VAE, no text
    encoder) is ComfyUI's split layout: it runs with the `parts` it names, paired by `text_encoder_widths`."""
    kind = transformer_model_type(table, architecture)
    config = transformer_config(path, table, architecture)
    block, qkv = ("joint_blocks", "x_block.attn.qkv") if architecture == "sd3" else ("double_blocks", "img_attn.qkv")
    blocks = _block_indices(table, block + ".")
    widths = tuple(table[UNET + f"{block}.{i}.{qkv}.weight"].shape[0] // 3 for i in blocks)
    text_encoders = tuple(name for name in DIT_TEXT_ENCODERS if _has_text_encoder(table, name))
    alone = not text_encoders and not any(k.startswith(VAE) for k in table)
    if alone:
        unsupported = split_transformer_unsupported(path, architecture, kind, config)
    else:
        unsupported = transformer_single_file_unsupported(path, table, architecture, kind, config, text_encoders)
    pooled = "clip" if architecture == "flux" else "clip_pooled"  # FLUX: CLIP-L's pooled output; SD 3: both CLIPs'
    return PipelineSpec(
        path=str(path),
        pipeline_class=DIT_PIPELINES[architecture],
        cross_attention_dim=widths[0] if architecture == "sd3" else config["joint_attention_dim"],
        layer_widths=widths,
        default_size=1024,  # SD 3.5 and FLUX.1: 128 x 128 latents
        layer_names=tuple(f"transformer_blocks.{i}" for i in blocks),
        in_channels=config["in_channels"],
        model_type=kind,
        unsupported=unsupported,
        architecture=architecture,
        text_encoders=text_encoders,
        parts=SPLIT_PARTS[architecture] if alone else (),
        text_encoder_widths=((pooled, config["pooled_projection_dim"]), ("t5xxl", config["joint_attention_dim"])),
        quantization=quantization(path, {k: v for k, v in table.items() if k.startswith(UNET)}, metadata or {}),
        single_blocks=config["num_single_layers"] if architecture == "flux" else 0,  # PuLID's CAs follow some
    )


def split_transformer_unsupported(path: Path, architecture: str, kind: str, config: dict) -> str | None:
    """Why a transformer alone cannot run, naming it and the fix (None: it can, with its parts): not text-to-image
    (FLUX Fill / Depth), or heads whose width its shapes do not say."""
    channels = wrong_input_channels(architecture, config["in_channels"])
    if channels:
        return f"{path}: a {describe_type(kind)} transformer whose {channels}. Choose another model"
    return config_unsupported(path, architecture, config)


def config_unsupported(path: Path, architecture: str, config: dict) -> str | None:
    """What the family's convention cannot fill in for these shapes: SD 3's head width (64) without q/k norms to
    read it from, FLUX.1's rotary split (16 / 56 / 56 of 128) of another head width."""
    head = config["attention_head_dim"]
    if architecture == "sd3" and config["qk_norm"] is None and config["caption_projection_dim"] % head:
        return (f"{path}: an SD 3-shaped transformer {config['caption_projection_dim']} wide without q/k norms, so its "
                f"head width cannot be read from the file, and SD 3's (64) does not divide it. Use its diffusers "
                f"folder, whose config names it")  # fmt: skip
    if architecture == "flux" and (sum(config["axes_dims_rope"]) != head or any(a % 2 for a in config["axes_dims_rope"])):
        return (f"{path}: a FLUX-shaped transformer with {head}-wide attention heads, which FLUX.1's rotary split "
                f"(16 / 56 / 56 of 128) does not divide. Use its diffusers folder, whose config names the split")  # fmt: skip
    return None


def clip_widths(table: dict[str, TensorInfo]) -> dict[str, int]:
    """The width of each CLIP tower an all-in-one file holds (clip_l, clip_g)."""
    return {name: table[DIT_TEXT_ENCODERS[name] + "text_model.embeddings.position_embedding.weight"].shape[-1]
            for name in ("clip_l", "clip_g") if _has_text_encoder(table, name)}  # fmt: skip


def _has_text_encoder(table: dict[str, TensorInfo], name: str) -> bool:
    marker = "shared.weight" if name == "t5xxl" else "text_model.embeddings.position_embedding.weight"
    return DIT_TEXT_ENCODERS[name] + marker in table


def transformer_single_file_unsupported(path: Path, table, architecture: str, kind: str, config: dict,
                                        text_encoders: tuple[str, ...]) -> str | None:  # fmt: skip
    """Why an all-in-one SD 3.x / FLUX.1 file cannot run, in words that name it and the fix (None: it can)."""
    family = catalog.DIT_FAMILIES[architecture]
    channels = wrong_input_channels(architecture, config["in_channels"])
    if channels:
        return f"{path}: a {describe_type(kind)} single-file checkpoint whose {channels}. Choose another model"
    # ComfyUI's scaled fp8 runs: `loading/split_files.py` dequantizes it (weight x scale_weight) at load
    missing = [name for name in DIT_NEEDS[architecture] if name not in text_encoders]
    if not any(k.startswith(VAE) for k in table):
        missing.insert(0, "VAE")
    if missing:
        return (f"{path}: a {describe_type(kind)} single file without its {' and '.join(missing)} (its transformer "
                f"alone, as the model's own repository ships it); imprompt runs all-in-one {family} files (transformer, "
                f"VAE and text encoders in one, as in ComfyUI's checkpoints/) and diffusers folders. Use one of those")  # fmt: skip
    return config_unsupported(path, architecture, config)


def wrong_input_channels(architecture: str, in_channels: int) -> str | None:
    """How an SD 3 / FLUX transformer that is not text-to-image (Fill, Depth, ...) differs, for a refusal."""
    usual = 16 if architecture == "sd3" else 64
    if in_channels == usual:
        return None
    return (f"transformer takes {in_channels} input channels, where text-to-image {catalog.DIT_FAMILIES[architecture]} "
            f"takes {usual}")  # fmt: skip


def t5_tokenizer_folder(checkpoint: Path) -> Path | None:
    """The folder of T5's tokenizer, which no checkpoint holds: ComfyUI ships it (`comfy/text_encoders/
    t5_tokenizer/`, found from the checkpoint's folders upwards, as in `ComfyUI/models/checkpoints/`), and diffusers
    users have it in the Hugging Face cache (a FLUX / SD 3.5 repository's copy, or T5 v1.1 XXL's). A `tokenizer.json`
    anywhere comes first; a bare `spiece.model` (google's repository) only when `sentencepiece` can convert it."""
    for parent in Path(checkpoint).resolve().parents:
        if (parent / COMFY_T5_TOKENIZER / "tokenizer.json").is_file():
            return parent / COMFY_T5_TOKENIZER
    from huggingface_hub import try_to_load_from_cache

    names = ["tokenizer.json"] + (["spiece.model"] if importlib.util.find_spec("sentencepiece") else [])
    for name in names:
        for repo, subfolder in T5_TOKENIZER_REPOS:
            found = try_to_load_from_cache(repo, f"{subfolder}/{name}".lstrip("/"))
            if isinstance(found, str):
                return Path(found).parent
    return None


def require_t5_tokenizer(spec: PipelineSpec) -> Path | None:
    """For a single file that holds T5: its tokenizer's folder, or a refusal that says where imprompt looked."""
    if "t5xxl" not in spec.text_encoders:
        return None
    found = t5_tokenizer_folder(Path(spec.path))
    if found is None:
        raise MissingTokenizerError(
            f"model {Path(spec.path).stem} ({spec.path}) holds a T5 text encoder, and T5's tokenizer is in no "
            f"checkpoint: imprompt looked for it in a ComfyUI install around the model ({COMFY_T5_TOKENIZER}/) and in "
            f"the Hugging Face cache, and found none. {T5_TOKENIZER_FIX}"
        )
    return found


# ----------------------------------------------------------------------------------------- the config folder


def write_transformer_config_folder(path: Path, table: dict[str, TensorInfo], folder: Path, architecture: str,
                                    t5_tokenizer: Path | None) -> None:  # fmt: skip
    """SD 3.5 Large's or FLUX.1 dev's configs with every width the tensors decide; the CLIP vocabularies, and T5's
    tokenizer copied from where it was found. Text encoders the file lacks (SD 3 without T5) are left out of it."""
    shutil.copytree(CONFIGS / architecture, folder, dirs_exist_ok=True)
    transformer = _read(folder / "transformer" / "config.json")
    transformer.update(transformer_config(path, table, architecture))
    _write(folder / "transformer" / "config.json", transformer)
    if transformer_model_type(table, architecture) == "flux-schnell":
        scheduler = _read(folder / "scheduler" / "scheduler_config.json")
        _write(folder / "scheduler" / "scheduler_config.json", {**scheduler, **FLUX_SCHNELL_SCHEDULER})
    _write_vae_widths(folder, table)
    for name, sub in DIT_SUBFOLDERS[architecture].items():
        if not _has_text_encoder(table, name):
            continue
        config = _read(folder / sub / "config.json")
        prefix = DIT_TEXT_ENCODERS[name]
        if name == "t5xxl":
            config.update(_t5_widths(path, table, prefix))
        else:
            config.update(_text_encoder_widths(path, table, prefix + "text_model.", open_clip=False))
            projection = table.get(prefix + "text_projection.weight")
            if name == "clip_g" and projection is not None:
                config["projection_dim"] = projection.shape[0]
            elif name == "clip_l":  # diffusers reads SD 3's CLIP-L pooled output unprojected (an identity)
                config["projection_dim"] = config["hidden_size"]
        _write(folder / sub / "config.json", config)
    for tokenizer in folder.glob("tokenizer*"):
        write_clip_vocabulary(tokenizer)
    if t5_tokenizer is not None:
        target = folder / ("tokenizer_3" if architecture == "sd3" else "tokenizer_2")
        target.mkdir(exist_ok=True)
        for name in T5_TOKENIZER_FILES:
            if (t5_tokenizer / name).is_file():
                shutil.copyfile(t5_tokenizer / name, target / name)


def _t5_widths(path, table: dict[str, TensorInfo], prefix: str) -> dict:
    """A T5 encoder's sizes from its tensors: heads from the relative-position bias, gated GELU when wi_0 exists."""
    attention = prefix + "encoder.block.0.layer.0.SelfAttention."
    bias, query = table.get(attention + "relative_attention_bias.weight"), table.get(attention + "q.weight")
    if bias is None or query is None:
        raise CheckpointError(path, f"single-file checkpoint lacks its T5 attention ({attention}*)", REDOWNLOAD)
    buckets, heads = bias.shape
    vocab, width = table[prefix + "shared.weight"].shape
    gated = prefix + "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in table
    feed = table[prefix + "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    layers = {int(k[len(prefix + "encoder.block.") :].split(".")[0]) for k in table if k.startswith(prefix + "encoder.block.")}
    return {
        "vocab_size": vocab, "d_model": width, "num_heads": heads, "d_kv": query.shape[0] // heads,
        "d_ff": feed.shape[0], "num_layers": max(layers) + 1, "relative_attention_num_buckets": buckets,
        "feed_forward_proj": "gated-gelu" if gated else "relu", "is_gated_act": gated,
        "dense_act_fn": "gelu_new" if gated else "relu",
    }  # fmt: skip



def write_config_folder(path: Path, table: dict[str, TensorInfo], folder: Path) -> None:
    """The family's shipped configs with every width the tensors decide, plus tokenizer vocabularies."""
    layout = unet_layout(path, table)
    _, name, _ = RUNNABLE[model_type(table)]
    shutil.copytree(CONFIGS / name, folder, dirs_exist_ok=True)

    unet = _read(folder / "unet" / "config.json")
    attention = [d > 0 for d in layout.depth]
    unet.update(
        layers_per_block=layout.layers_per_block,
        block_out_channels=list(layout.block_out_channels),
        transformer_layers_per_block=[max(1, d) for d in layout.depth],
        cross_attention_dim=layout.cross_attention_dim,
        use_linear_projection=layout.linear_projection,
        in_channels=layout.in_channels,
        out_channels=layout.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
    )
    if name == "sdxl":  # 64 channels per attention head, by SDXL's convention
        unet["attention_head_dim"] = [max(1, c // 64) for c in layout.block_out_channels]
    if layout.addition_input_dim is not None:
        pooled = table["conditioner.embedders.1.model.text_projection"].shape[1]
        unet.update(
            projection_class_embeddings_input_dim=layout.addition_input_dim,
            addition_time_embed_dim=(layout.addition_input_dim - pooled) // 6,
        )
    _write(folder / "unet" / "config.json", unet)

    if "v_pred" in table:  # v-prediction SDXL fine-tunes (NoobAI-XL v-pred, ...) mark themselves with this key
        scheduler = _read(folder / "scheduler" / "scheduler_config.json")
        scheduler.update(prediction_type="v_prediction", rescale_betas_zero_snr="ztsnr" in table)
        _write(folder / "scheduler" / "scheduler_config.json", scheduler)

    _write_vae_widths(folder, table)

    for sub, (prefix, open_clip) in TEXT_ENCODERS[name].items():
        config = _read(folder / sub / "config.json")
        config.update(_text_encoder_widths(path, table, prefix, open_clip))
        _write(folder / sub / "config.json", config)
    for tokenizer in folder.glob("tokenizer*"):
        write_clip_vocabulary(tokenizer)


def _write_vae_widths(folder: Path, table: dict[str, TensorInfo]) -> None:
    """The VAE's channels per level, blocks per level, latent and image channels; 32 norm groups, or fewer where a
    level has fewer channels than that."""
    vae = _read(folder / "vae" / "config.json")
    levels = sorted({int(k.split(".")[3]) for k in table if k.startswith(VAE + "encoder.down.")})
    channels = [table[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    vae.update(
        block_out_channels=channels,
        layers_per_block=len({k.split(".")[5] for k in table if k.startswith(f"{VAE}encoder.down.0.block.")}),
        latent_channels=table[f"{VAE}decoder.conv_in.weight"].shape[1],
        in_channels=table[f"{VAE}encoder.conv_in.weight"].shape[1],
        norm_num_groups=math.gcd(32, *channels),
    )
    _write(folder / "vae" / "config.json", vae)


def _text_encoder_widths(path, table, prefix: str, open_clip: bool) -> dict:
    """Widths of a CLIP text encoder from its tensors (transformers or OpenCLIP names); 64 channels per head."""
    if open_clip:
        tokens, positions = table.get(prefix + "token_embedding.weight"), table.get(prefix + "positional_embedding")
        layer_key, fc1 = prefix + "transformer.resblocks.", "mlp.c_fc.weight"
    else:
        tokens = table.get(prefix + "embeddings.token_embedding.weight")
        positions = table.get(prefix + "embeddings.position_embedding.weight")
        layer_key, fc1 = prefix + "encoder.layers.", "mlp.fc1.weight"
    if tokens is None or positions is None:
        raise CheckpointError(path, f"single-file checkpoint lacks its text encoder ({prefix}*)", "Download it again")
    layers = {int(k[len(layer_key) :].split(".")[0]) for k in table if k.startswith(layer_key)}
    vocab, hidden = tokens.shape
    widths = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_attention_heads": max(1, hidden // 64),
        "num_hidden_layers": max(layers) + 1,
        "intermediate_size": table[f"{layer_key}0.{fc1}"].shape[0],
        "max_position_embeddings": positions.shape[0],
    }
    if open_clip and prefix + "text_projection" in table:
        widths["projection_dim"] = table[prefix + "text_projection"].shape[1]
    return widths


def write_clip_vocabulary(folder: Path) -> None:
    """vocab.json + merges.txt of OpenAI's CLIP tokenizer, built from the BPE merges file as CLIP builds it:
    the 256 byte symbols, the same with `</w>`, one token per merge (48,894 of them), then the two specials."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def clip_bpe_file() -> Path:
    """OpenAI's CLIP BPE merges, from the installed `clip` package (PyPI: openai-clip), without importing it."""
    spec = importlib.util.find_spec("clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.is_file():
            return candidate
    raise UnsupportedError(
        "single-file checkpoints need the CLIP tokenizer vocabulary from the openai-clip package; "
        "run `pip install openai-clip`"
    )


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2))
