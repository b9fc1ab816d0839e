"""Tiny random-weight models in the real on-disk formats: what the demo pack (and the tests) are made of.

The shapes that decide compatibility are the real ones (UNet cross-attention width 768 with SD 1.5's 16
cross-attention layers, SDXL's 70 at 2048; encoder projections 1024 for ViT-H and 1280 for ViT-bigG; h94 adapter
key layouts), while everything else is tiny, so a whole pack is built in a few seconds and a 64 px image takes a
fraction of one. Files are written exactly as users get them: diffusers pipeline folders, transformers encoder
folders (and ComfyUI-style single files), h94 adapter `.safetensors` in fp16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..models.single_file import write_clip_vocabulary
from .shapes import draw_shape

CROSS_ATTENTION_SD15 = 768
CROSS_ATTENTION_SDXL = 2048  # 768 (CLIP ViT-L text) + 1280 (OpenCLIP bigG text), concatenated

# Encoders: the real output widths that decide pairing, tiny elsewhere. Hidden sizes differ so that the
# hidden-state adapters (Plus, Full Face) pair with exactly one of them, as with the real ViT-H (1280) / bigG (1664).
TINY_VIT_H = dict(hidden_size=64, projection_dim=1024, num_layers=3, heads=4)
TINY_VIT_BIGG = dict(hidden_size=96, projection_dim=1280, num_layers=3, heads=4)
TINY_ENCODERS = {"vit-h": TINY_VIT_H, "vit-g": TINY_VIT_BIGG}


# ------------------------------------------------------------------------------------------------ the pipelines


def build_sd15_pipeline(folder: Path, seed: int = 0, cross_attention_dim: int = CROSS_ATTENTION_SD15,
                        clip_vocabulary: bool = False):  # fmt: skip
    """A diffusers StableDiffusionPipeline folder with SD 1.5's block structure at tiny widths.
    `clip_vocabulary`: CLIP's real 49,408-token vocabulary (as single files need) instead of the tiny one."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    tokenizer_dir = folder / "tokenizer"
    write_tokenizer(tokenizer_dir, clip_vocabulary)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=12,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    return save_sd15_pipeline(folder, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet)


def save_sd15_pipeline(folder: Path, vae, text_encoder, tokenizer, unet):
    """Components -> a diffusers StableDiffusionPipeline folder with SD 1.5's scheduler and no safety checker."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def sd15_scheduler():
    """SD 1.5's scheduler configuration (PNDM over the scaled-linear betas it was trained with)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


def build_sdxl_pipeline(folder: Path, seed: int = 3, clip_vocabulary: bool = False):
    """A diffusers StableDiffusionXLPipeline folder with SDXL's block structure (transformer depths 1/2/10, so
    70 cross-attention layers) and its real conditioning widths (text 768 + 1280 = 2048), tiny elsewhere."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    for sub in ("tokenizer", "tokenizer_2"):
        write_tokenizer(folder / sub, clip_vocabulary, pad="!" if sub == "tokenizer_2" else "<|endoftext|>")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
    torch.manual_seed(seed)

    def text_config(hidden, projection=None, act="quick_gelu"):
        return CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=hidden // 64, max_position_embeddings=77, projection_dim=projection or hidden,
            hidden_act=act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip

    text_encoder = CLIPTextModel(text_config(768))  # CLIP ViT-L's text tower
    text_encoder_2 = CLIPTextModelWithProjection(text_config(1280, projection=1280, act="gelu"))  # OpenCLIP bigG's
    time_embed = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(1, 1, 1),  # SDXL's convention: one head per 64 channels
        cross_attention_dim=CROSS_ATTENTION_SDXL,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + 1280,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return pipeline


def cross_attention_widths(unet) -> list[int]:
    """Hidden size of each cross-attention layer, in `attn_processors` order (the order h94 keys follow)."""
    return [
        module.to_q.weight.shape[0]
        for name, module in unet.named_modules()
        if name.endswith("attn2") and hasattr(module, "to_k")
    ]


# ------------------------------------------------------------------------------------------------ the tokenizer

# Words that become single tokens, so prompts tokenize the way CLIP's real vocabulary would tokenize them.
DEMO_WORDS = (
    "a an the of on in with and photo picture painting portrait face person cat dog red green blue yellow white "
    "black orange purple pink gray circle square triangle star shape background small large big style"
).split()


def write_tokenizer(folder: Path, clip_vocabulary: bool = False, pad: str = "<|endoftext|>") -> None:
    """A CLIP BPE tokenizer built offline: byte symbols plus whole-word merges, or with `clip_vocabulary` the real
    CLIP vocabulary from the openai-clip package's merges file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_tokenizer_config(folder, pad)
    if clip_vocabulary:
        write_clip_vocabulary(folder)
        return
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in DEMO_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair, current = (current, piece), current + piece
            if pair not in merges:
                merges.append(pair)
                vocab.append(current)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _write_tokenizer_config(folder: Path, pad: str) -> None:
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


# ------------------------------------------------------------------------------------------------- the encoders


def build_clip_vision(
    target: Path,
    hidden_size: int,
    projection_dim: int,
    num_layers: int,
    heads: int,
    seed: int,
    single_file: bool = False,
    dtype: torch.dtype = torch.float16,
    intermediate_size: int | None = None,
):
    """A CLIPVisionModelWithProjection at 224 px / patch 14 (257 tokens, like the real ones).

    `single_file=False` writes a transformers folder (config.json + model.safetensors, as in h94/IP-Adapter);
    `single_file=True` writes one `.safetensors` with transformers key names (as ComfyUI's clip_vision folder),
    with the config as JSON metadata since heads and activation cannot be read from shapes."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    config = clip_vision_config(hidden_size, projection_dim, num_layers, heads, intermediate_size)
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).to(dtype)
    target = Path(target)
    if single_file:
        target.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, target, metadata={"format": "pt", "config": config.to_json_string()})
    else:
        model.save_pretrained(target, safe_serialization=True)
    return model


def clip_vision_config(hidden_size: int, projection_dim: int, num_layers: int, heads: int, intermediate_size=None):
    """A CLIP vision tower at 224 px / patch 14 (257 tokens, like the real ones), tiny inside."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        projection_dim=projection_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
    )


# ------------------------------------------------------------------------------------------------- the adapters


def write_adapter(
    path: Path,
    variant: str,
    embed_dim: int,
    layer_widths: list[int],
    cross_attention_dim: int,
    seed: int,
    tokens: int | None = None,
    dtype: torch.dtype = torch.float16,
    file_format: str = "safetensors",
    resampler_dim: int = 64,
) -> Path:
    """An IP-Adapter in the original h94 key layout (as the IP-Adapter repository's training code saves it).

    variant: "base" (ImageProjection over image_embeds, 4 tokens), "plus" (Resampler over hidden states,
    16 tokens; `resampler_dim` 768 is the real SD 1.5 size) or "full-face" (MLP over every hidden-state token).
    file_format "safetensors" writes flat
    `image_proj.*` / `ip_adapter.*` keys; "bin" writes the nested dict torch.save'd as h94's `.bin` files."""
    state = adapter_tensors(variant, embed_dim, layer_widths, cross_attention_dim, seed, tokens, dtype, resampler_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "safetensors":
        from safetensors.torch import save_file

        flat = {f"{part}.{k}": v for part, tensors in state.items() for k, v in tensors.items()}
        save_file(flat, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)
    return path


def adapter_tensors(
    variant: str,
    embed_dim: int,
    layer_widths: list[int],
    cross_attention_dim: int,
    seed: int,
    tokens: int | None = None,
    dtype: torch.dtype = torch.float16,
    resampler_dim: int = 64,
) -> dict[str, dict[str, torch.Tensor]]:
    """Random h94 adapter tensors, nested as `{"image_proj": {...}, "ip_adapter": {...}}` (see write_adapter)."""
    generator = torch.Generator().manual_seed(seed)

    def weight(rows, cols):
        return torch.randn(rows, cols, generator=generator) / cols**0.5

    def vector(n, center=0.0):
        return center + 0.02 * torch.randn(n, generator=generator)

    cross = cross_attention_dim
    proj: dict[str, torch.Tensor] = {}
    if variant == "base":
        tokens = tokens or 4
        proj = {
            "proj.weight": weight(tokens * cross, embed_dim),
            "proj.bias": vector(tokens * cross),
            "norm.weight": vector(cross, 1.0),
            "norm.bias": vector(cross),
        }
    elif variant == "plus":
        tokens, dim, heads = tokens or 16, resampler_dim, resampler_dim // 64  # diffusers: heads = to_q rows / 64
        inner = heads * 64
        proj = {
            "latents": torch.randn(1, tokens, dim, generator=generator) / dim**0.5,
            "proj_in.weight": weight(dim, embed_dim),
            "proj_in.bias": vector(dim),
            "proj_out.weight": weight(cross, dim),
            "proj_out.bias": vector(cross),
            "norm_out.weight": vector(cross, 1.0),
            "norm_out.bias": vector(cross),
        }
        for i in range(4):  # h94's Resampler has depth 4: PerceiverAttention + FeedForward per layer
            proj.update(
                {
                    f"layers.{i}.0.norm1.weight": vector(dim, 1.0),
                    f"layers.{i}.0.norm1.bias": vector(dim),
                    f"layers.{i}.0.norm2.weight": vector(dim, 1.0),
                    f"layers.{i}.0.norm2.bias": vector(dim),
                    f"layers.{i}.0.to_q.weight": weight(inner, dim),
                    f"layers.{i}.0.to_kv.weight": weight(2 * inner, dim),
                    f"layers.{i}.0.to_out.weight": weight(dim, inner),
                    f"layers.{i}.1.0.weight": vector(dim, 1.0),
                    f"layers.{i}.1.0.bias": vector(dim),
                    f"layers.{i}.1.1.weight": weight(4 * dim, dim),
                    f"layers.{i}.1.3.weight": weight(dim, 4 * dim),
                }
            )
    elif variant == "full-face":
        proj = {
            "proj.0.weight": weight(embed_dim, embed_dim),
            "proj.0.bias": vector(embed_dim),
            "proj.2.weight": weight(cross, embed_dim),
            "proj.2.bias": vector(cross),
            "proj.3.weight": vector(cross, 1.0),
            "proj.3.bias": vector(cross),
        }
    else:
        raise ValueError(f"unknown variant {variant!r}")
    attn = {}
    for j, width in enumerate(layer_widths):
        attn[f"{2 * j + 1}.to_k_ip.weight"] = weight(width, cross)
        attn[f"{2 * j + 1}.to_v_ip.weight"] = weight(width, cross)

    return {
        "image_proj": {k: v.to(dtype).contiguous() for k, v in proj.items()},
        "ip_adapter": {k: v.to(dtype).contiguous() for k, v in attn.items()},
    }


# ------------------------------------------------------------------------------------------- reference images


def draw_reference(shape: str, color, background, size: int = 96) -> Image.Image:
    """A flat shape on a flat background: a reference image whose content is easy to recognise."""
    image = Image.new("RGB", (size, size), background)
    m = size // 5
    draw_shape(ImageDraw.Draw(image), shape, (m, m, size - m, size - m), color)
    return image
