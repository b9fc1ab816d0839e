"""FLUX Redux: recognised from its tensors in every layout users keep it, refused before compute where it does not
fit, and pixel for pixel what diffusers' `FluxPriorReduxPipeline` feeding `FluxPipeline` gives.

The reference is diffusers' own (its prior over the same tiny SigLIP, built by transformers from the file, and a
`ReduxImageEncoder` filled from the Redux file). Where imprompt's unit goes beyond the prior (ComfyUI's strength
rule, several images appended in turn, `downsample`) the expected tokens are made from the prior's output by the
rule the test names, in plain tensor arithmetic.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import max_diff
from safetensors.torch import load_file

from imprompt import Engine
from imprompt.demo.pack import FLUX_ADAPTERS, FLUX_MODEL, SD35_MODEL, VIT_L_FILE
from imprompt.demo.tiny_dits import build_siglip_vision, transformer_config, write_redux
from imprompt.errors import IncompatibleError, RequestError
from imprompt.models.probe import probe

REDUX_FILE = "style_models/flux1-redux-dev.safetensors"  # ComfyUI's place for it
PRIOR = "Redux/FLUX.1-Redux-dev"  # the hub repository's diffusers folder
FLUX_V1 = list(FLUX_ADAPTERS)[0]
SIGLIP = "style_models/image_encoder"
TOKENS = 729  # 27 x 27


@pytest.fixture(scope="module")
def tree(pack, tmp_path_factory):
    """BFL's file in style_models/, diffusers' prior-redux folder (its own SigLIP beside its embedder) elsewhere,
    and a FLUX LoRA; the demo pack is the other root."""
    from diffusers import FluxTransformer2DModel
    from dit_loras import diffusers_lora, lora_pairs, write

    root = tmp_path_factory.mktemp("redux-tree")
    width = transformer_config(pack / "diffusers" / FLUX_MODEL)["joint_attention_dim"]
    write_redux(root / REDUX_FILE, width)
    # SigLIP so400m's own grid (27 x 27 patches at 384 px), beside the file (where the encoder rule looks first)
    build_siglip_vision(root / SIGLIP, dtype=torch.float32, image_size=384)
    prior = root / PRIOR
    write_redux(prior / "image_embedder", width, diffusers_folder=True)
    shutil.copytree(root / SIGLIP, prior / "image_encoder")
    (prior / "model_index.json").write_text(json.dumps({"_class_name": "FluxPriorReduxPipeline",
                                                        "image_embedder": ["diffusers", "ReduxImageEncoder"],
                                                        "image_encoder": ["transformers", "SiglipVisionModel"]}))  # fmt: skip
    transformer = FluxTransformer2DModel.from_pretrained(pack / "diffusers" / FLUX_MODEL / "transformer")
    write(root / "loras" / "flux-detail.safetensors", diffusers_lora(lora_pairs(transformer, 2, scale=0.2)))
    return root


@pytest.fixture(scope="module")
def engine(pack, tree):
    return Engine([pack, tree])


def prior(pack, tree):
    """diffusers' FluxPriorReduxPipeline over the same SigLIP, the Redux file and the FLUX model's text encoders."""
    from diffusers import FluxPipeline, FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionModel

    flux = FluxPipeline.from_pretrained(pack / "diffusers" / FLUX_MODEL)
    flux.set_progress_bar_config(disable=True)
    tensors = load_file(tree / REDUX_FILE)
    embedder = ReduxImageEncoder(redux_dim=tensors["redux_up.weight"].shape[1],
                                 txt_in_features=tensors["redux_down.weight"].shape[0])  # fmt: skip
    embedder.load_state_dict(tensors)
    redux = FluxPriorReduxPipeline(image_encoder=SiglipVisionModel.from_pretrained(tree / SIGLIP).eval(),
                                   feature_extractor=SiglipImageProcessor.from_pretrained(tree / SIGLIP),
                                   image_embedder=embedder, text_encoder=flux.text_encoder, tokenizer=flux.tokenizer,
                                   text_encoder_2=flux.text_encoder_2, tokenizer_2=flux.tokenizer_2)  # fmt: skip
    return redux, flux


def run(flux, embeds, pooled, **call):
    return flux(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=3, width=64, height=64,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(1), **call).images[0]  # fmt: skip


def request(*units, **fields) -> dict:
    return {"model": FLUX_MODEL, "prompt": "a red cat", "seed": 1, "steps": 3, "width": 64, "height": 64,
            "cfg_scale": 3.5, "ip_adapters": list(units), **fields}  # fmt: skip


def unit(*images, adapter="FLUX Redux", **fields) -> dict:
    return {"adapter": adapter, "images": list(images), **fields}


# ------------------------------------------------------------------------------------------------ what the files say


def test_redux_is_read_from_its_tensors_in_each_layout(pack, tree):
    for path in (tree / REDUX_FILE, tree / PRIOR / "image_embedder", tree / PRIOR):
        spec = probe(path)
        assert (spec.kind, spec.variant, spec.architecture, spec.family) == ("ip-adapter", "redux", "flux", "FLUX.1")
        assert (spec.consumes, spec.encoder_type, spec.embed_dim, spec.cross_attention_dim) == (
            "last_hidden_state", "siglip", 1152, 32)
        assert spec.needs == "siglip last_hidden_state[1152]"
    shutil.copy(tree / REDUX_FILE, tree / "renamed.safetensors")  # the name plays no part
    assert probe(tree / "renamed.safetensors").variant == "redux"
    (tree / "renamed.safetensors").unlink()


def test_the_listing_names_its_encoder_and_the_models_it_fits(engine, tree):
    from imprompt.plan import describe_store

    listed = {a["name"]: a for a in describe_store(engine.state.store)["adapters"]}
    bfl = listed["flux1-redux-dev"]
    assert bfl["friendly_name"] == "FLUX Redux" and bfl["variant"] == "redux"
    assert bfl["encoder"] == SIGLIP and bfl["fits_models"] == [FLUX_MODEL]  # the SigLIP beside it
    assert bfl["needs"].startswith("siglip last_hidden_state[1152]")
    folder = listed["FLUX.1-Redux-dev"]  # the prior folder pairs with the SigLIP beside its embedder
    assert folder["encoder"] == f"{PRIOR}/image_encoder" and folder["fits_models"] == [FLUX_MODEL]


# ------------------------------------------------------------------------------------------- diffusers' own pixels


def test_one_image_equals_diffusers_prior_feeding_flux(pack, tree, engine, red_circle):
    redux, flux = prior(pack, tree)
    embeds, pooled = redux(red_circle, prompt="a red cat", return_dict=False)
    got = engine.generate(request(unit(red_circle)))
    assert max_diff(got.images[0], run(flux, embeds, pooled)) <= 1
    info = got.info["ip_adapters"][0]
    assert (info["adapter"], info["tokens"], info["encoder"]) == ("FLUX Redux", TOKENS, SIGLIP)
    plain = engine.generate(request())
    assert max_diff(got.images[0], plain.images[0]) > 10  # the tokens act
    # ComfyUI's StyleModelApply strength ("multiply"): the image tokens scaled, the prompt's tokens as they were
    text = embeds.shape[1] - TOKENS
    scaled = torch.cat([embeds[:, :text], embeds[:, text:] * 0.6], dim=1)
    got = engine.generate(request(unit(red_circle, scale=0.6)))
    assert max_diff(got.images[0], run(flux, scaled, pooled)) <= 1
    # the folder layout is the same Redux: the same pixels
    folder = engine.generate(request(unit(red_circle, adapter="FLUX.1-Redux-dev")))
    assert max_diff(folder.images[0], run(flux, embeds, pooled)) <= 1


def test_several_images_appended_averaged_or_pooled(pack, tree, engine, red_circle, yellow_square):
    redux, flux = prior(pack, tree)
    red, pooled = redux(red_circle, prompt="a red cat", return_dict=False)
    yellow, _ = redux(yellow_square, prompt="a red cat", return_dict=False)
    text = red.shape[1] - TOKENS
    # appended in turn, as chained StyleModelApply nodes do
    both = torch.cat([red, yellow[:, text:]], dim=1)
    got = engine.generate(request(unit(red_circle, yellow_square)))
    assert max_diff(got.images[0], run(flux, both, pooled)) <= 1
    # averaged: diffusers' prior with both images at prompt_embeds_scale 1/2 each (its weighted sum)
    mean, mean_pooled = redux([red_circle, yellow_square], prompt="a red cat", prompt_embeds_scale=[0.5, 0.5],
                              pooled_prompt_embeds_scale=[0.5, 0.5], return_dict=False)  # fmt: skip
    got = engine.generate(request(unit(red_circle, yellow_square, average=True)))
    assert max_diff(got.images[0], run(flux, mean, mean_pooled)) <= 1
    # downsample 3: the 27 x 27 token grid averaged over 3 x 3 blocks, 81 tokens
    grid = red[:, text:].reshape(1, 27, 27, -1).permute(0, 3, 1, 2)
    pooled_tokens = torch.nn.functional.avg_pool2d(grid, 3).permute(0, 2, 3, 1).reshape(1, 81, -1)
    got = engine.generate(request(unit(red_circle, downsample=3)))
    assert got.info["ip_adapters"][0]["tokens"] == 81
    assert max_diff(got.images[0], run(flux, torch.cat([red[:, :text], pooled_tokens], dim=1), pooled)) <= 1


def test_mixed_with_an_xlabs_unit_equals_diffusers_and_runs_with_a_lora(pack, tree, engine, red_circle, yellow_square):
    from transformers import CLIPImageProcessor

    from imprompt.loading.encoders import load_encoder

    redux, flux = prior(pack, tree)
    embeds, pooled = redux(red_circle, prompt="a red cat", return_dict=False)
    flux.image_encoder = load_encoder(probe(pack / VIT_L_FILE), torch.device("cpu"), torch.float32)
    flux.feature_extractor = CLIPImageProcessor(size=224, crop_size=224)
    flux.load_ip_adapter(str(pack), weight_name=[FLUX_V1], subfolder=[""], image_encoder_pretrained_model_name_or_path=None)
    flux.set_ip_adapter_scale(0.7)
    mixed = request(unit(yellow_square, adapter="FLUX XLabs", scale=0.7), unit(red_circle))
    got = engine.generate(mixed)
    assert max_diff(got.images[0], run(flux, embeds, pooled, ip_adapter_image=yellow_square)) <= 1
    assert [u["adapter"] for u in got.info["ip_adapters"]] == ["FLUX XLabs", "FLUX Redux"]
    with_lora = engine.generate(mixed | {"prompt": "a red cat <lora:flux-detail:0.8>"})
    assert [lo["name"] for lo in with_lora.info["loras"]] == ["flux-detail"]
    assert max_diff(with_lora.images[0], got.images[0]) > 0  # the LoRA acts beside both units


# ------------------------------------------------------------------------------------------ refusals and history


@pytest.mark.parametrize("model, family", [(SD35_MODEL, "SD 3.5"), ("tiny-sd15", "SD 1.5"), ("tiny-sdxl", "SDXL")])
def test_redux_on_another_family_is_refused_before_compute(pack, tree, red_circle, model, family):
    engine = Engine([pack, tree])
    with pytest.raises(IncompatibleError) as raised:
        engine.generate(request(unit(red_circle), model=model))
    message = str(raised.value)
    assert "FLUX Redux" in message and "FLUX.1" in message and family in message and FLUX_MODEL in message
    info = engine.cache_info()
    assert info["encoders"]["entries"] == [] and info["pipelines"]["entries"] == []  # nothing loaded


@pytest.mark.parametrize("fields, words", [
    ({"masks": ["red"]}, "masks"), ({"start": 0.5}, "start"), ({"negative_images": ["red"]}, "negative_images"),
    ({"layers": [1.0, 1.0]}, "layers"), ({"downsample": 28}, "downsample"),
])  # fmt: skip
def test_what_redux_does_not_read_is_refused_naming_the_field(engine, red_circle, fields, words):
    fields = {k: [red_circle] if v == ["red"] else v for k, v in fields.items()}
    with pytest.raises(RequestError, match=words):
        engine.generate(request(unit(red_circle, **fields)))
    with pytest.raises(RequestError, match="downsample"):  # an IP-Adapter has no Redux tokens to pool
        engine.generate(request(unit(red_circle, adapter="FLUX XLabs", downsample=2)))


def test_switching_redux_plain_redux_leaves_nothing_behind(pack, tree, red_circle):
    engine = Engine([pack, tree])
    first = engine.generate(request(unit(red_circle)))
    plain = engine.generate(request())
    again = engine.generate(request(unit(red_circle)))
    assert max_diff(first.images[0], again.images[0]) == 0
    assert again.info["ip_adapters"][0]["embeddings"] == ["cache"]  # same image, same encoder: a cache hit
    assert max_diff(plain.images[0], Engine(pack).generate(request()).images[0]) == 0
