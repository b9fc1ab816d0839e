"""diffusers' own pipelines, loaded and run the documented way: the references imprompt's pixels are held to."""

from __future__ import annotations

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

VIT_H = "IP-Adapter/models/image_encoder"
VIT_G = "IP-Adapter/sdxl_models/image_encoder"

PIPELINES = {
    ("tiny-sd15", False): StableDiffusionPipeline,
    ("tiny-sd15", True): StableDiffusionImg2ImgPipeline,
    ("tiny-sdxl", False): StableDiffusionXLPipeline,
    ("tiny-sdxl", True): StableDiffusionXLImg2ImgPipeline,
}


def pipeline(pack, model="tiny-sd15", img2img=False):
    cls = PIPELINES[(model, img2img)]
    extra = {"safety_checker": None, "requires_safety_checker": False} if model == "tiny-sd15" else {}
    pipe = cls.from_pretrained(pack / "diffusers" / model, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_adapters(pipe, pack, files, encoder=VIT_H):
    """`files`: adapter paths relative to the pack; `encoder`: encoder folder relative to the pack, or None."""
    files = [files] if isinstance(files, str) else files
    pipe.load_ip_adapter(
        str(pack), subfolder=[str(f.rsplit("/", 1)[0]) for f in files], weight_name=[f.rsplit("/", 1)[1] for f in files],
        image_encoder_folder=encoder,
    )  # fmt: skip
    return pipe


def run(pipe, seed=1, steps=4, size=64, **kwargs):
    if "image" not in kwargs:
        kwargs.update(width=size, height=size)
    return pipe(
        "a cat", num_inference_steps=steps, guidance_scale=7.0, generator=torch.Generator().manual_seed(seed), **kwargs
    ).images[0]


def encode(pack, folder, image, output="image_embeds"):
    """Encode with transformers directly, as a user wiring diffusers by hand would."""
    model = CLIPVisionModelWithProjection.from_pretrained(pack / folder, dtype=torch.float32).eval()
    pixels = CLIPImageProcessor(size=224, crop_size=224)(images=image, return_tensors="pt").pixel_values
    with torch.no_grad():
        if output == "image_embeds":
            return model(pixels).image_embeds
        return model(pixels, output_hidden_states=True).hidden_states[-2]
