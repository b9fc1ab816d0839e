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
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, UnsupportedError
from ..loading.tensors import REDOWNLOAD, TensorInfo
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


def is_single_file_checkpoint(table: dict[str, TensorInfo]) -> bool:
    return any(k.startswith(UNET) for k in table)


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


def single_file_spec(path: Path, table: dict[str, TensorInfo]) -> PipelineSpec:
    """The pipeline spec of a single file: its model type, and its cross-attention layers renamed from LDM to
    diffusers order. A type imprompt cannot run is listed as what it is, with the reason the plan will give."""
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
    )


# ----------------------------------------------------------------------------------------- the config folder


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

    vae = _read(folder / "vae" / "config.json")
    levels = sorted({int(k.split(".")[3]) for k in table if k.startswith(VAE + "encoder.down.")})
    vae.update(
        block_out_channels=[table[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels],
        layers_per_block=len({k.split(".")[5] for k in table if k.startswith(f"{VAE}encoder.down.0.block.")}),
        latent_channels=table[f"{VAE}post_quant_conv.weight"].shape[0],
        in_channels=table[f"{VAE}encoder.conv_in.weight"].shape[1],
    )
    _write(folder / "vae" / "config.json", vae)

    for sub, (prefix, open_clip) in TEXT_ENCODERS[name].items():
        config = _read(folder / sub / "config.json")
        config.update(_text_encoder_widths(path, table, prefix, open_clip))
        _write(folder / sub / "config.json", config)
    for tokenizer in folder.glob("tokenizer*"):
        write_clip_vocabulary(tokenizer)


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
