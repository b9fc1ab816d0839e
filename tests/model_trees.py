"""Whole A1111 and ComfyUI `models/` trees for the tests, written by the tests: tiny files in the real formats and
the real sub-folder names (checkpoints, LoRAs and LyCORIS, VAEs, embeddings, ControlNets, upscalers, face
restorers, text encoders, UNets alone, IP-Adapters and image encoders), plus one broken file.

`EXPECTED` says what each file is, which is what the store must read from its tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from single_files import single_file_tensors, write_single_file

from imprompt.demo.tiny_models import build_sd15_pipeline


def _safetensors(path: Path, tensors: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


def _pickle(path: Path, obj, legacy: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def kohya_lora(cross: int, text: dict[str, int], rank: int = 4) -> dict:
    """A kohya-named LoRA: one UNet cross-attention key projection, one text-encoder projection per encoder."""
    out = {}
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    out |= {f"{name}.lora_down.weight": torch.randn(rank, cross), f"{name}.lora_up.weight": torch.zeros(64, rank),
            f"{name}.alpha": torch.tensor(float(rank))}  # fmt: skip
    for prefix, width in text.items():
        te = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj"
        out |= {f"{te}.lora_down.weight": torch.randn(rank, width), f"{te}.lora_up.weight": torch.zeros(width, rank)}
    return out


def loha(cross: int, rank: int = 4) -> dict:
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    return {f"{name}.hada_w1_a": torch.randn(64, rank), f"{name}.hada_w1_b": torch.randn(rank, cross),
            f"{name}.hada_w2_a": torch.randn(64, rank), f"{name}.hada_w2_b": torch.randn(rank, cross),
            f"{name}.alpha": torch.tensor(float(rank))}  # fmt: skip


def peft_lora(cross: int, rank: int = 4) -> dict:
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    return {f"{name}.lora_A.weight": torch.randn(rank, cross), f"{name}.lora_B.weight": torch.zeros(64, rank)}


def ldm_controlnet(cross: int) -> dict:
    return {"control_model.input_hint_block.0.weight": torch.randn(16, 3, 3, 3),
            "control_model.zero_convs.0.0.weight": torch.zeros(32, 32, 1, 1),
            "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(32, cross)}  # fmt: skip


def build_trees(root: Path, pack: Path) -> dict[str, Path]:
    """`root/a1111` (its `models/` and the webui's `embeddings/` beside it) and `root/comfyui/models`."""
    pipeline = build_sd15_pipeline(root / "source" / "sd15", seed=5, clip_vocabulary=True)
    unet_only = {k.removeprefix("model.diffusion_model."): v for k, v in single_file_tensors(pipeline).items()
                 if k.startswith("model.diffusion_model.")}  # fmt: skip
    vae_ldm = {k.removeprefix("first_stage_model."): v for k, v in single_file_tensors(pipeline).items()
               if k.startswith("first_stage_model.")}  # fmt: skip
    text_encoder = {("" if k.startswith("text_model.") else "text_model.") + k: v  # the released files' names
                    for k, v in pipeline.text_encoder.state_dict().items() if not k.endswith("position_ids")}  # fmt: skip
    ip = pack / "IP-Adapter"

    a1111 = root / "a1111" / "models"
    write_single_file(pipeline, a1111 / "Stable-diffusion" / "tiny-sd15-single.safetensors")
    _safetensors(a1111 / "Lora" / "detail-sd15.safetensors", kohya_lora(768, {"lora_te_": 768}))
    _safetensors(a1111 / "Lora" / "style-sdxl.safetensors", kohya_lora(2048, {"lora_te1_": 768, "lora_te2_": 1280}))
    _safetensors(a1111 / "LyCORIS" / "texture-loha.safetensors", loha(768))
    _safetensors(a1111 / "VAE" / "tiny-vae.safetensors", vae_ldm)
    _pickle(a1111 / "VAE" / "tiny-vae.vae.pt", {"state_dict": vae_ldm})
    _pickle(a1111 / "ControlNet" / "control_tiny_canny.pth", ldm_controlnet(768))
    shutil.copy(ip / "models" / "ip-adapter_sd15.safetensors", a1111 / "ControlNet" / "ip-adapter_sd15.safetensors")
    _pickle(a1111 / "ESRGAN" / "4x-tiny.pth", {"model.0.weight": torch.randn(8, 3, 3, 3),
                                                 "model.1.sub.0.RDB1.conv1.0.weight": torch.randn(8, 8, 3, 3)})  # fmt: skip
    _pickle(a1111 / "RealESRGAN" / "tiny-x4plus.pth", {"params_ema": {
        "conv_first.weight": torch.randn(8, 3, 3, 3), "body.0.rdb1.conv1.weight": torch.randn(8, 8, 3, 3),
        "conv_body.weight": torch.randn(8, 8, 3, 3), "conv_last.weight": torch.randn(3, 8, 3, 3)}}, legacy=True)  # fmt: skip
    _pickle(a1111 / "GFPGAN" / "tiny-gfpgan.pth", {"toRGB.0.weight": torch.randn(3, 8, 1, 1),
                                                     "stylegan_decoder.style_mlp.1.weight": torch.randn(8, 8)})  # fmt: skip
    (a1111 / "Stable-diffusion" / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    embeddings = root / "a1111" / "embeddings"
    _pickle(embeddings / "bad-hands.pt", {"string_to_param": {"*": torch.randn(2, 768)}, "name": "bad-hands", "step": 100})
    _safetensors(embeddings / "painterly-sdxl.safetensors", {"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)})

    comfy = root / "comfyui" / "models"
    write_single_file(pipeline, comfy / "checkpoints" / "tiny-comfy.safetensors")
    _safetensors(comfy / "loras" / "peft-sd15.safetensors", peft_lora(768))
    pipeline.vae.save_pretrained(comfy / "vae" / "tiny-vae-folder")
    _safetensors(comfy / "embeddings" / "emb-sd15.safetensors", {"emb_params": torch.randn(4, 768)})
    _safetensors(comfy / "controlnet" / "control_tiny.safetensors",
                 {k.removeprefix("control_model."): v for k, v in ldm_controlnet(768).items()})  # fmt: skip
    _safetensors(comfy / "upscale_models" / "compact.safetensors",
                 {"body.0.weight": torch.randn(8, 3, 3, 3), "body.0.bias": torch.zeros(8), "body.2.weight": torch.randn(3, 8, 3, 3)})  # fmt: skip
    _safetensors(comfy / "clip" / "clip_l.safetensors", text_encoder)
    _safetensors(comfy / "unet" / "tiny-unet.safetensors", unet_only)
    shutil.copytree(ip / "models" / "image_encoder", comfy / "clip_vision" / "ViT-H")
    (comfy / "ipadapter").mkdir()
    shutil.copy(ip / "sdxl_models" / "ip-adapter_sdxl.safetensors", comfy / "ipadapter" / "ip-adapter_sdxl.safetensors")
    return {"a1111": a1111, "a1111-embeddings": embeddings, "comfyui": comfy}


# relative path -> the kind the store must read from its tensors (and a word of what it says)
EXPECTED = {
    "a1111": {
        "Stable-diffusion/tiny-sd15-single.safetensors": ("pipeline", "StableDiffusionPipeline"),
        "Lora/detail-sd15.safetensors": ("lora", "SD 1.5"),
        "Lora/style-sdxl.safetensors": ("lora", "SDXL"),
        "LyCORIS/texture-loha.safetensors": ("lora", "lycoris-loha"),
        "VAE/tiny-vae.safetensors": ("vae", "ldm"),
        "VAE/tiny-vae.vae.pt": ("vae", "ldm"),
        "ControlNet/control_tiny_canny.pth": ("controlnet", "SD 1.5 ControlNet"),
        "ControlNet/ip-adapter_sd15.safetensors": ("ip-adapter", "base"),
        "ESRGAN/4x-tiny.pth": ("upscaler", "ESRGAN"),
        "RealESRGAN/tiny-x4plus.pth": ("upscaler", "RRDBNet"),
        "GFPGAN/tiny-gfpgan.pth": ("face-restorer", "GFPGAN"),
        "Stable-diffusion/broken.safetensors": ("unreadable", "not a valid safetensors file"),
    },
    "a1111-embeddings": {
        "bad-hands.pt": ("textual-inversion", "SD 1.5"),
        "painterly-sdxl.safetensors": ("textual-inversion", "SDXL"),
    },
    "comfyui": {
        "checkpoints/tiny-comfy.safetensors": ("pipeline", "StableDiffusionPipeline"),
        "loras/peft-sd15.safetensors": ("lora", "diffusers"),
        "vae/tiny-vae-folder": ("vae", "diffusers"),
        "embeddings/emb-sd15.safetensors": ("textual-inversion", "SD 1.5"),
        "controlnet/control_tiny.safetensors": ("controlnet", "SD 1.5 ControlNet"),
        "upscale_models/compact.safetensors": ("upscaler", "compact"),
        "clip/clip_l.safetensors": ("text-encoder", "CLIP text encoder"),
        "unet/tiny-unet.safetensors": ("diffusion-model", "SD 1.5 UNet alone"),
        "clip_vision/ViT-H": ("image-encoder", "custom"),
        "ipadapter/ip-adapter_sdxl.safetensors": ("ip-adapter", "base"),
    },
}
