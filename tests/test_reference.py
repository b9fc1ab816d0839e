"""imprompt's pixels equal diffusers' own pipeline for the same inputs, and what naive diffusers gets wrong."""

from __future__ import annotations

import diffusers_reference as reference
import pytest
import torch
from conftest import max_diff, request, unit

VIT_H = "models/image_encoder"
VIT_G = "sdxl_models/image_encoder"

# friendly name -> (h94 file, encoder folder the adapter was trained with)
VARIANTS = {
    "Base": ("ip-adapter_sd15.safetensors", VIT_H),
    "Light": ("ip-adapter_sd15_light.safetensors", VIT_H),
    "Plus": ("ip-adapter-plus_sd15.safetensors", VIT_H),
    "Plus Face": ("ip-adapter-plus-face_sd15.safetensors", VIT_H),
    "Full Face": ("ip-adapter-full-face_sd15.safetensors", VIT_H),
    "Base ViT-G": ("ip-adapter_sd15_vit-G.safetensors", VIT_G),
}


def diffusers_pipeline(pack):
    return reference.pipeline(pack)


def run(pipe, **kwargs):
    return reference.run(pipe, **kwargs)


@pytest.fixture(scope="module")
def no_adapter_image(engine):
    return engine.generate(request()).images[0]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_equals_diffusers_load_ip_adapter(pack, engine, red_circle, no_adapter_image, name):
    weight_name, encoder_folder = VARIANTS[name]
    pipe = diffusers_pipeline(pack)
    pipe.load_ip_adapter(
        pack / "IP-Adapter", subfolder="models", weight_name=weight_name, image_encoder_folder=encoder_folder
    )
    pipe.set_ip_adapter_scale(0.6)
    expected = run(pipe, ip_adapter_image=red_circle)

    result = engine.generate(request(unit(name, red_circle, scale=0.6)))

    assert max_diff(result.images[0], expected) <= 1
    # the adapter really acts: without it the picture is clearly different (the equality is not vacuous)
    assert max_diff(result.images[0], no_adapter_image) > 20
    info = result.info["ip_adapters"][0]
    assert info["file"].endswith(weight_name)
    assert info["encoder"] == f"IP-Adapter/{encoder_folder}"


def test_naive_diffusers_switch_fails_with_the_articles_error(pack, red_circle):
    """The failure the article reports, reproduced: diffusers keeps the first adapter's ViT-H encoder when
    Base ViT-G is loaded, and the first denoising step multiplies 1024-d embeddings by a 1280-d projection."""
    pipe = diffusers_pipeline(pack)
    pipe.load_ip_adapter(pack / "IP-Adapter", subfolder="models", weight_name=VARIANTS["Base"][0],
                         image_encoder_folder=VIT_H)  # fmt: skip
    run(pipe, ip_adapter_image=red_circle)  # Base works
    pipe.load_ip_adapter(pack / "IP-Adapter", subfolder="models", weight_name=VARIANTS["Base ViT-G"][0],
                         image_encoder_folder=VIT_G)  # fmt: skip  # loads "fine", keeps the ViT-H encoder
    with pytest.raises(RuntimeError, match=r"mat1 and mat2 shapes cannot be multiplied \(2x1024 and 1280x3072\)"):
        run(pipe, ip_adapter_image=red_circle)


def test_the_same_switch_in_imprompt_is_a_non_event(pack, red_circle):
    """imprompt does what the article's users did, Base then Base ViT-G then Base, in one engine."""
    from imprompt import Engine

    engine = Engine(pack)
    first = engine.generate(request(unit("Base", red_circle)))
    vit_g = engine.generate(request(unit("Base ViT-G", red_circle)))
    again = engine.generate(request(unit("Base", red_circle)))
    assert vit_g.info["ip_adapters"][0]["encoder"] == "IP-Adapter/sdxl_models/image_encoder"
    assert max_diff(first.images[0], again.images[0]) == 0
    assert max_diff(first.images[0], vit_g.images[0]) > 0


def test_mixed_encoders_in_one_image_equal_diffusers_with_per_encoder_embeddings(pack, engine, red_circle, yellow_square):
    """Base (ViT-H) + Base ViT-G (ViT-bigG) together: diffusers can run both adapters only when handed
    embeddings, each from its own encoder. imprompt does exactly that, automatically."""
    pipe = diffusers_pipeline(pack)
    pipe.load_ip_adapter(
        pack / "IP-Adapter",
        subfolder="models",
        weight_name=[VARIANTS["Base"][0], VARIANTS["Base ViT-G"][0]],
        image_encoder_folder=None,
    )
    pipe.set_ip_adapter_scale([0.6, 0.5])
    embeds = []
    for folder, image in ((VIT_H, red_circle), (VIT_G, yellow_square)):
        positive = reference.encode(pack, f"IP-Adapter/{folder}", image)[None]  # [1, images=1, dim]
        embeds.append(torch.cat([torch.zeros_like(positive), positive]))
    expected = run(pipe, ip_adapter_image_embeds=embeds)

    result = engine.generate(request(unit("Base", red_circle, 0.6), unit("Base ViT-G", yellow_square, 0.5)))

    assert max_diff(result.images[0], expected) <= 1
    units = result.info["ip_adapters"]
    assert [u["encoder"] for u in units] == ["IP-Adapter/models/image_encoder", "IP-Adapter/sdxl_models/image_encoder"]
    assert [u["consumes"] + str(u["embed_dim"]) for u in units] == ["image_embeds1024", "image_embeds1280"]
