"""Builds tiny random-weight models in the real on-disk formats: the demo model pack, and what tests need.

The shapes that decide compatibility are the real ones (UNet cross-attention width 768 with SD 1.5's 16
cross-attention layers; encoder projections 1024 for ViT-H and 1280 for ViT-bigG; h94 adapter key layouts), while
everything else is tiny, so a whole pack is built in a few seconds and a 64 px image takes a fraction of one.
Files are written exactly as users get them: diffusers pipeline folders, transformers encoder folders (and
ComfyUI-style single files), h94 adapter `.safetensors` in fp16.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw

log = logging.getLogger("imprompt")

PACK_VERSION = 4
SD15_MODEL = "tiny-sd15"
SDXL_MODEL = "tiny-sdxl"
CROSS_ATTENTION_SD15 = 768
CROSS_ATTENTION_SDXL = 2048  # 768 (CLIP ViT-L text) + 1280 (OpenCLIP bigG text), concatenated

# Encoders: the real output widths that decide pairing, tiny elsewhere. Hidden sizes differ so that the
# hidden-state adapters (Plus, Full Face) pair with exactly one of them, as with the real ViT-H (1280) / bigG (1664).
TINY_VIT_H = dict(hidden_size=64, projection_dim=1024, num_layers=3, heads=4)
TINY_VIT_BIGG = dict(hidden_size=96, projection_dim=1280, num_layers=3, heads=4)
TINY_ENCODERS = {"vit-h": TINY_VIT_H, "vit-g": TINY_VIT_BIGG}

# h94 file stem -> (variant, encoder it was trained against)
SD15_ADAPTERS = {
    "ip-adapter_sd15": ("base", TINY_VIT_H),
    "ip-adapter_sd15_light": ("base", TINY_VIT_H),
    "ip-adapter-plus_sd15": ("plus", TINY_VIT_H),
    "ip-adapter-plus-face_sd15": ("plus", TINY_VIT_H),
    "ip-adapter-full-face_sd15": ("full-face", TINY_VIT_H),
    "ip-adapter_sd15_vit-G": ("base", TINY_VIT_BIGG),
}

SDXL_ADAPTERS = {
    "ip-adapter_sdxl": ("base", TINY_VIT_BIGG),
    "ip-adapter_sdxl_vit-h": ("base", TINY_VIT_H),
    "ip-adapter-plus_sdxl_vit-h": ("plus", TINY_VIT_H),
    "ip-adapter-plus-face_sdxl_vit-h": ("plus", TINY_VIT_H),
}

# ostris' composition adapters are Plus-type (Resampler over ViT-H hidden states); ComfyUI keeps them in ipadapter/
COMPOSITION_ADAPTERS = {
    "ip_plus_composition_sd15": ("plus", TINY_VIT_H, SD15_MODEL),
    "ip_plus_composition_sdxl": ("plus", TINY_VIT_H, SDXL_MODEL),
}

# Colours from shapes.PALETTE, so the trained models recognise them.
REFERENCE_IMAGES = {
    "red-circle": ("circle", (220, 40, 40), (40, 70, 210)),
    "yellow-square": ("square", (240, 210, 40), (40, 170, 60)),
    "white-triangle": ("triangle", (245, 245, 245), (20, 20, 20)),
    "blue-star": ("star", (40, 70, 210), (240, 210, 40)),
}

# Where `python -m imprompt.training` writes by default, and where its files go in a pack.
DEMO_WEIGHTS = Path(__file__).parent / "demo_weights"
TRAINED_ENCODERS = {"vit-h": "IP-Adapter/models/image_encoder", "vit-g": "IP-Adapter/sdxl_models/image_encoder"}
TRAINED_ADAPTERS = ("ip-adapter_sd15", "ip-adapter_sd15_vit-G", "ip-adapter-plus_sd15")  # in IP-Adapter/models


def build_demo_pack(root: Path, force: bool = False, weights: Path | None = None) -> Path:
    """The demo model pack, skipped when already built:
    - `diffusers/tiny-sd15`, `diffusers/tiny-sdxl`: pipelines with SD 1.5's and SDXL's block structure;
    - `IP-Adapter/` in the h94 repository layout: ViT-H-like and ViT-bigG-like encoders, the six SD 1.5 adapters
      in `models/`, the four SDXL adapters in `sdxl_models/`;
    - `ipadapter/` in ComfyUI's layout: ostris' composition adapters for SD 1.5 and SDXL;
    - `images/`: reference images.

    Every model has random weights, unless `weights` names a folder written by `python -m imprompt.training`:
    then the SD 1.5 pipeline, both encoders and the Base, Base ViT-G and Plus SD 1.5 adapters are those trained
    weights (everything else stays random). The pack is rebuilt when the weights change."""
    root = Path(root)
    stamp = root / "pack.json"
    trained = weights is not None
    wanted = {"builder": "imprompt.pack", "version": PACK_VERSION, "weights": _weights_digest(weights) if trained else None}
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return root
    if root.exists():
        shutil.rmtree(root)
    log.info("building the demo model pack in %s (%s)", root, "trained" if trained else "random weights")
    sd15 = root / "diffusers" / SD15_MODEL
    widths = {
        SD15_MODEL: cross_attention_widths((build_trained_sd15(sd15, weights) if trained else build_sd15_pipeline(sd15)).unet),
        SDXL_MODEL: cross_attention_widths(build_sdxl_pipeline(root / "diffusers" / SDXL_MODEL, seed=3).unet),
    }
    cross = {SD15_MODEL: CROSS_ATTENTION_SD15, SDXL_MODEL: CROSS_ATTENTION_SDXL}
    h94 = root / "IP-Adapter"
    if trained:
        for name, folder in TRAINED_ENCODERS.items():
            write_trained_encoder(root / folder, name, weights)
    else:
        build_clip_vision(h94 / "models" / "image_encoder", seed=1, **TINY_VIT_H)
        build_clip_vision(h94 / "sdxl_models" / "image_encoder", seed=2, **TINY_VIT_BIGG)
    adapters = [(h94 / "models", stem, variant, encoder, SD15_MODEL) for stem, (variant, encoder) in SD15_ADAPTERS.items()]
    adapters += [(h94 / "sdxl_models", stem, v, e, SDXL_MODEL) for stem, (v, e) in SDXL_ADAPTERS.items()]
    adapters += [(root / "ipadapter", stem, v, e, m) for stem, (v, e, m) in COMPOSITION_ADAPTERS.items()]
    for seed, (folder, stem, variant, encoder, model) in enumerate(adapters, start=10):
        if trained and stem in TRAINED_ADAPTERS:
            write_trained_adapter(folder / f"{stem}.safetensors", stem, weights)
            continue
        embed_dim = encoder["projection_dim"] if variant == "base" else encoder["hidden_size"]
        write_adapter(folder / f"{stem}.safetensors", variant, embed_dim, widths[model], cross[model], seed)
    for name, (shape, color, background) in REFERENCE_IMAGES.items():
        (root / "images").mkdir(parents=True, exist_ok=True)
        draw_reference(shape, color, background).save(root / "images" / f"{name}.png")
    stamp.write_text(json.dumps(wanted))
    return root


# ------------------------------------------------------------------------------------- the trained demo weights


def _weights_digest(weights: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(Path(weights).glob("*.safetensors")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def read_demo_weights(name: str, weights: Path = DEMO_WEIGHTS) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One trained weights file, factors multiplied out, and its metadata (the model's config)."""
    tensors, metadata = read_factored_weights(Path(weights) / f"{name}.safetensors")
    return expand_factors(tensors), metadata


def read_factored_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A file as `imprompt.training` writes it: tensors (low-rank ones as factors) and metadata."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def expand_factors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`<key>:up` and `<key>:down` (a low-rank weight as trained and shipped) become `<key>` = up @ down, in
    fp32; other tensors are kept as they are."""
    expanded = {k: v for k, v in tensors.items() if not k.endswith((":up", ":down"))}
    for key in tensors:
        if key.endswith(":up"):
            name = key.removesuffix(":up")
            expanded[name] = tensors[key].float() @ tensors[f"{name}:down"].float()
    return expanded


def build_trained_sd15(folder: Path, weights: Path = DEMO_WEIGHTS):
    """The trained tiny SD 1.5 pipeline as a diffusers folder (its tokenizer, text encoder, UNet, VAE and the
    PNDM scheduler the random pipeline has)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    def model(factory, name):
        tensors, metadata = read_demo_weights(name, weights)
        instance = factory(json.loads(metadata["config"]))
        instance.load_state_dict(tensors, strict=True)
        return instance

    return save_sd15_pipeline(
        folder,
        vae=model(AutoencoderKL.from_config, "vae"),
        text_encoder=model(lambda config: CLIPTextModel(CLIPTextConfig.from_dict(config)), "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(Path(weights) / "tokenizer"),
        unet=model(UNet2DConditionModel.from_config, "unet"),
    )


def write_trained_encoder(folder: Path, name: str, weights: Path = DEMO_WEIGHTS) -> None:
    """A trained image encoder as a transformers folder (config.json + model.safetensors, fp16, as h94's)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    tensors, metadata = read_demo_weights(f"image_encoder_{name}", weights)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(json.loads(metadata["config"])))
    encoder.load_state_dict(tensors, strict=True)
    encoder.to(torch.float16).save_pretrained(folder, safe_serialization=True)


def write_trained_adapter(path: Path, stem: str, weights: Path = DEMO_WEIGHTS) -> None:
    """A trained adapter as an h94 `.safetensors` (flat image_proj.* / ip_adapter.* keys, fp16)."""
    from safetensors.torch import save_file

    tensors, _ = read_demo_weights(stem, weights)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------ the pipeline


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
_WORDS = (
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
        from .single_file import write_clip_vocabulary

        write_clip_vocabulary(folder)
        return
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
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


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's order (printable bytes first, then
    the others mapped past 255), which is the order of the vocabulary's first 256 tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


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
    from .shapes import draw_shape

    image = Image.new("RGB", (size, size), background)
    m = size // 5
    draw_shape(ImageDraw.Draw(image), shape, (m, m, size - m, size - m), color)
    return image


# -------------------------------------------------------------------------------------- A1111 single files


def write_single_file(pipeline, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save a diffusers SD 1.5 / SDXL pipeline as an A1111-style single checkpoint (original LDM key names), the
    way users download base models. The inverse of diffusers' `from_single_file` conversion, which reads it."""
    from safetensors.torch import save_file

    tensors = single_file_tensors(pipeline)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


def single_file_tensors(pipeline) -> dict[str, torch.Tensor]:
    """The pipeline's tensors under their A1111/LDM names (works on meta tensors too: names and shapes only)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    unet_config = pipeline.unet.config
    tensors = {}
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    state = pipeline.unet.state_dict()
    with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    for key, tensor in state.items():
        tensors["model.diffusion_model." + (fixed.get(key) or _ldm_unet_key(key, unet_config.layers_per_block, with_attention))] = tensor
    for key, tensor in pipeline.vae.state_dict().items():
        ldm, tensor = _ldm_vae_key(key, tensor, len(pipeline.vae.config.block_out_channels))
        tensors["first_stage_model." + ldm] = tensor
    if hasattr(pipeline, "text_encoder_2"):
        prefixes = ("conditioner.embedders.0.transformer.",)
        tensors.update(_open_clip_tensors(pipeline.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        prefixes = ("cond_stage_model.transformer.",)
    for key, tensor in pipeline.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            tensors[prefixes[0] + ("" if key.startswith("text_model.") else "text_model.") + key] = tensor
    return tensors


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _ldm_unet_key(key: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    parts = key.split(".")
    step = layers_per_block + 1

    def resnet(rest):
        return ".".join([_RESNET_TO_LDM[rest[0]], *rest[1:]])

    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.weight
            return f"input_blocks.{step * (i + 1)}.0.op.{parts[-1]}"
        j = int(parts[3])
        where = f"input_blocks.{step * i + j + 1}"
        return f"{where}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{where}.1.{'.'.join(parts[4:])}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if i in up_with_attention else 1
            return f"output_blocks.{step * i + layers_per_block}.{slot}.conv.{parts[-1]}"
        j = int(parts[3])
        where = f"output_blocks.{step * i + j}"
        return f"{where}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{where}.1.{'.'.join(parts[4:])}"
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return f"middle_block.1.{'.'.join(parts[3:])}"
        return f"middle_block.{2 * int(parts[2])}.{resnet(parts[3:])}"
    raise ValueError(f"no LDM name for UNet tensor {key}")


def _ldm_vae_key(key: str, tensor: torch.Tensor, levels: int) -> tuple[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    if key in DIFFUSERS_TO_LDM_MAPPING["vae"]:
        return DIFFUSERS_TO_LDM_MAPPING["vae"][key], tensor
    parts = key.split(".")
    side = parts[0]  # encoder | decoder
    if parts[1] in ("down_blocks", "up_blocks"):
        i = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])  # the decoder counts levels upwards
        level = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}", tensor
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{level}.block.{parts[4]}.{rest}", tensor
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}", tensor
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        name = names[parts[4]]
        if name != "norm" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        return f"{side}.mid.attn_1.{name}.{parts[-1]}", tensor
    raise ValueError(f"no LDM name for VAE tensor {key}")


def _open_clip_tensors(text_encoder, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's names (SDXL's second text encoder)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
             for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}  # fmt: skip
    out = {}
    for key, ldm in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items():
        out[prefix + ldm] = state.pop(key).T.contiguous() if ldm == "text_projection" else state.pop(key)
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for n in layers:
        source, target = f"text_model.encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[target + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(source + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for diffusers_name, ldm_name in names.items():
                out[target + f"{ldm_name}.{kind}"] = state.pop(source + f"{diffusers_name}.{kind}")
    if state:
        raise ValueError(f"text encoder tensors without an OpenCLIP name: {sorted(state)[:4]}")
    return out
