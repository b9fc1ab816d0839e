"""LoRAs, textual inversions and VAEs for the demo pack's tiny models, in the formats users download: kohya LoRAs
(`lora_unet_...`, `lora_te_...`), A1111 embeddings (`emb_params`, SDXL's `clip_l` / `clip_g`), standalone VAEs.

The soak, the history tests and the LoRA tests point the engine at them, next to the pack.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")  # fmt: skip
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")


def kohya_lora(pipe, seed: int, rank: int = 4, text: bool = True, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A LoRA on every attention projection of the UNet (and of the text encoders), kohya names: `lora_unet_<module
    path with _>`, `lora_te_text_model_<...>` (`lora_te1_` / `lora_te2_` for SDXL's two encoders); alpha = rank."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}

    def pair(prefix: str, module: torch.nn.Linear) -> None:
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=generator) * scale
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank))

    for name, module in pipe.unet.named_modules():
        if name.endswith(UNET_LAYERS) and isinstance(module, torch.nn.Linear):
            pair("lora_unet_" + name.replace(".", "_"), module)
    if text:
        encoders = [("lora_te_", pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is not None:
            encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)]
        for prefix, encoder in encoders:
            for name, module in encoder.named_modules():
                if name.endswith(TEXT_LAYERS) and isinstance(module, torch.nn.Linear):
                    path = name if name.startswith("text_model.") else f"text_model.{name}"  # transformers 4 and 5
                    pair(prefix + path.replace(".", "_"), module)
    return tensors


def inversion(pipe, seed: int, vectors: int = 2) -> dict[str, torch.Tensor]:
    """An A1111 embedding: `emb_params` [vectors, width]; SDXL's `clip_l` and `clip_g`."""
    generator = torch.Generator().manual_seed(seed)
    if getattr(pipe, "text_encoder_2", None) is not None:
        return {"clip_l": torch.randn(vectors, pipe.text_encoder.config.hidden_size, generator=generator),
                "clip_g": torch.randn(vectors, pipe.text_encoder_2.config.hidden_size, generator=generator)}  # fmt: skip
    return {"emb_params": torch.randn(vectors, pipe.text_encoder.config.hidden_size, generator=generator)}


def altered_vae(pipe, seed: int):
    """The pipeline's VAE with its decoder's last layer changed: another VAE of the same family."""
    import copy

    vae = copy.deepcopy(pipe.vae)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(torch.randn(vae.decoder.conv_out.bias.shape, generator=generator) * 0.3)
    return vae


def write(path: Path, tensors: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


def write_extra_models(folder: Path, pack: Path) -> Path:
    """An A1111-style tree next to the pack: `Lora/` (an SD 1.5 LoRA with text-encoder parts, one UNet-only, an
    SDXL one, a truncated one), `embeddings/shiny.safetensors` (SD 1.5), `VAE/soft-vae.safetensors` (SD 1.5,
    diffusers names), `ipadapter/ip-adapter-faceid_sd15.safetensors` (FaceID Base with its LoRA) and
    `ip-adapter-faceid-plusv2_sd15.safetensors` (FaceID Plus v2, for the pack's ViT-H), and, where InsightFace is
    installed, a tiny `insightface/models/buffalo_l` (ComfyUI's place for it), `faces/face-<n>.png` and
    `faces/no-face.png`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sd15 = StableDiffusionPipeline.from_pretrained(pack / "diffusers" / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    sdxl = StableDiffusionXLPipeline.from_pretrained(pack / "diffusers" / "tiny-sdxl")
    write(folder / "Lora" / "detail-sd15.safetensors", kohya_lora(sd15, seed=1))
    write(folder / "Lora" / "style-sd15.safetensors", kohya_lora(sd15, seed=2, text=False))
    write(folder / "Lora" / "style-sdxl.safetensors", kohya_lora(sdxl, seed=3))
    good = (folder / "Lora" / "detail-sd15.safetensors").read_bytes()
    (folder / "Lora" / "broken-lora.safetensors").write_bytes(good[: len(good) // 2])
    write(folder / "embeddings" / "shiny.safetensors", inversion(sd15, seed=4))
    write(folder / "VAE" / "soft-vae.safetensors", altered_vae(sd15, seed=5).state_dict())
    write(folder / "ipadapter" / "ip-adapter-faceid_sd15.safetensors", faceid_adapter(sd15, seed=6))
    vit_h = json.loads((pack / "IP-Adapter" / "models" / "image_encoder" / "config.json").read_text())["hidden_size"]
    write(folder / "ipadapter" / "ip-adapter-faceid-plusv2_sd15.safetensors", faceid_plus_adapter(sd15, 7, vit_h))
    if importlib.util.find_spec("insightface") is not None:
        from .insightface_pack import face_image, no_face_image, write_insightface_pack

        write_insightface_pack(folder / "insightface")
        (folder / "faces").mkdir(exist_ok=True)
        for seed in (1, 2):
            face_image(seed).save(folder / "faces" / f"face-{seed}.png")
        no_face_image().save(folder / "faces" / "no-face.png")
    return folder


REDUX_FILE = "style_models/flux1-redux-dev.safetensors"  # ComfyUI's place for BFL's file
REDUX_SIGLIP = "style_models/image_encoder"  # beside it: the SigLIP the encoder rule pairs it with first


def write_redux_model(folder: Path, pack: Path) -> Path:
    """BFL's Redux file for the pack's tiny FLUX (`redux_down` as wide as its T5) in `folder/style_models/`, and a
    tiny SigLIP beside it with so400m's grid (27 x 27 patches at 384 px: 729 tokens; 16 tokens beside T5's 512 barely
    move the tiny FLUX); the demo pack's own writers (`imprompt.demo.tiny_dits`), as tests/test_redux.py uses them.
    Returns the Redux file."""
    from imprompt.demo.pack import FLUX_MODEL
    from imprompt.demo.tiny_dits import build_siglip_vision, transformer_config, write_redux

    width = transformer_config(Path(pack) / "diffusers" / FLUX_MODEL)["joint_attention_dim"]
    write_redux(Path(folder) / REDUX_FILE, width)
    build_siglip_vision(Path(folder) / REDUX_SIGLIP, dtype=torch.float32, image_size=384)
    return Path(folder) / REDUX_FILE


def faceid_adapter(pipe, seed: int, tokens: int = 4, lora_rank: int | None = 4, face_width: int = 512) -> dict:
    """An h94 FaceID adapter for the pipeline's UNet, flat safetensors keys: `image_proj.proj.0/2` and `norm` (the
    face-embedding MLP), `ip_adapter.<n>.to_k_ip/to_v_ip` on cross-attention processors, and (with `lora_rank`) the
    LoRA FaceID files embed, `ip_adapter.<n>.to_{q,k,v,out}_lora.{down,up}` on every attention processor."""
    generator = torch.Generator().manual_seed(seed)
    cross = pipe.unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.0.weight": torch.randn(2 * face_width, face_width, generator=generator) * 0.05,
        "image_proj.proj.0.bias": torch.zeros(2 * face_width),
        "image_proj.proj.2.weight": torch.randn(tokens * cross, 2 * face_width, generator=generator) * 0.05,
        "image_proj.proj.2.bias": torch.zeros(tokens * cross),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    modules = dict(pipe.unet.named_modules())
    for key_id, name in enumerate(pipe.unet.attn_processors):
        attention = modules[name.removesuffix(".processor")]
        hidden, source = attention.to_q.out_features, attention.to_k.in_features
        if name.endswith("attn2.processor"):
            for proj in ("to_k_ip", "to_v_ip"):
                tensors[f"ip_adapter.{key_id}.{proj}.weight"] = torch.randn(hidden, cross, generator=generator) * 0.1
        if lora_rank:
            for proj, width in (("to_q_lora", hidden), ("to_k_lora", source), ("to_v_lora", source), ("to_out_lora", hidden)):
                tensors[f"ip_adapter.{key_id}.{proj}.down.weight"] = torch.randn(lora_rank, width, generator=generator) * 0.1
                tensors[f"ip_adapter.{key_id}.{proj}.up.weight"] = torch.randn(hidden, lora_rank, generator=generator) * 0.1
    return tensors


def faceid_plus_adapter(pipe, seed: int, clip_width: int, lora_rank: int | None = 4, heads: int = 1) -> dict:
    """An h94 FaceID Plus / Plus v2 adapter (the two share their keys): the FaceID tensors, and the
    `perceiver_resampler` that reads CLIP hidden states [clip_width] of the face crop. Upstream and diffusers fix
    its shape: 4 tokens, 4 layers, 64-wide heads, feed-forward x4, its width the UNet's cross-attention width."""
    tensors = faceid_adapter(pipe, seed, tokens=4, lora_rank=lora_rank)
    generator = torch.Generator().manual_seed(seed + 1000)
    width, inner = pipe.unet.config.cross_attention_dim, 64 * heads

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / cols**0.5

    prefix = "image_proj.perceiver_resampler"
    tensors.update({
        f"{prefix}.proj_in.weight": weight(width, clip_width), f"{prefix}.proj_in.bias": torch.zeros(width),
        f"{prefix}.proj_out.weight": weight(width, width), f"{prefix}.proj_out.bias": torch.zeros(width),
        f"{prefix}.norm_out.weight": torch.ones(width), f"{prefix}.norm_out.bias": torch.zeros(width),
    })  # fmt: skip
    for i in range(4):
        layer = f"{prefix}.layers.{i}"
        for norm in (f"{layer}.0.norm1", f"{layer}.0.norm2", f"{layer}.1.0"):
            tensors[f"{norm}.weight"], tensors[f"{norm}.bias"] = torch.ones(width), torch.zeros(width)
        tensors[f"{layer}.0.to_q.weight"] = weight(inner, width)
        tensors[f"{layer}.0.to_kv.weight"] = weight(2 * inner, width)
        tensors[f"{layer}.0.to_out.weight"] = weight(width, inner)
        tensors[f"{layer}.1.1.weight"] = weight(4 * width, width)
        tensors[f"{layer}.1.3.weight"] = weight(width, 4 * width)
    return tensors
