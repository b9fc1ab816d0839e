"""SD 3.5 and FLUX image prompts: read from tensors, refused before compute when they do not fit, and pixel for
pixel what diffusers' own pipelines give with `load_ip_adapter`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import max_diff
from safetensors.torch import load_file, save_file

from imprompt import Engine
from imprompt.demo.pack import FLUX_ADAPTERS, FLUX_MODEL, SD35_ADAPTER, SD35_MODEL, SIGLIP_FILE, VIT_L_FILE
from imprompt.demo.tiny_dits import build_siglip_vision
from imprompt.errors import ImpromptError, IncompatibleError, RequestError, UnknownLoraError, UnsupportedError
from imprompt.loading.encoders import load_encoder
from imprompt.models.probe import probe

FLUX_V1, FLUX_V2 = list(FLUX_ADAPTERS)


def request(model: str, *units, **fields) -> dict:
    base = {"model": model, "prompt": "a red cat", "seed": 1, "steps": 3, "width": 64, "height": 64,
            "cfg_scale": 5.0 if model == SD35_MODEL else 3.5, "ip_adapters": list(units)}  # fmt: skip
    return base | fields


def unit(adapter: str, *images, **fields) -> dict:
    return {"adapter": adapter, "images": list(images), "scale": 0.6, **fields}


# ------------------------------------------------------------------------------------------------ what the files say


def test_the_probe_reads_each_family_from_tensors_alone(pack, tmp_path):
    sd35 = probe(pack / SD35_ADAPTER)
    assert (sd35.family, sd35.architecture, sd35.encoder_type, sd35.consumes, sd35.embed_dim) == (
        "SD 3.5", "sd3", "siglip", "hidden_states", 1152)
    assert (sd35.tokens, sd35.cross_attention_dim, len(sd35.layer_widths)) == (8, 32, 3)
    v1, v2 = probe(pack / FLUX_V1), probe(pack / FLUX_V2)
    assert (v1.family, v1.consumes, v1.embed_dim, v1.tokens, len(v1.layer_widths)) == ("FLUX.1", "image_embeds", 768, 4, 2)
    assert v2.tokens == 16  # rows / T5 width, at any width (diffusers assumes 4 unless the rows are 65536)
    # the same FLUX adapter in diffusers' names (image_proj.proj, ip_adapter.<n>.to_k_ip with bias), renamed
    tensors = load_file(pack / FLUX_V2)
    renamed = {k.replace("ip_adapter_proj_model.", "image_proj.").replace("double_blocks.", "ip_adapter.")
               .replace("processor.ip_adapter_double_stream_k_proj", "to_k_ip")
               .replace("processor.ip_adapter_double_stream_v_proj", "to_v_ip"): v for k, v in tensors.items()}  # fmt: skip
    save_file(renamed, tmp_path / "diffusers-names.safetensors")
    again = probe(tmp_path / "diffusers-names.safetensors")
    assert (again.architecture, again.tokens, again.embed_dim, again.layer_widths) == ("flux", 16, 768, v2.layer_widths)
    siglip, vit_l = probe(pack / SIGLIP_FILE), probe(pack / VIT_L_FILE)
    assert (siglip.model_type, siglip.hidden_size, siglip.projection_dim, siglip.outputs) == (
        "siglip", 1152, None, "siglip hidden_states[1152]")
    assert (vit_l.model_type, vit_l.projection_dim) == ("clip", 768)
    for name in ("tiny-sd35", "tiny-flux"):
        spec = probe(pack / "diffusers" / name)
        assert spec.unsupported is None and spec.architecture == {"tiny-sd35": "sd3", "tiny-flux": "flux"}[name]


def test_siglip_towers_in_every_layout_give_the_same_hidden_states(pack, tmp_path, red_circle):
    """A folder as google/siglip-so400m-patch14-384 has it, ComfyUI's single file, and a SiglipVisionModel saved
    by transformers 5 (no `vision_model.` prefix): the same tower, the same numbers as transformers' own."""
    from transformers import SiglipImageProcessor, SiglipVisionModel

    build_siglip_vision(tmp_path / "folder", dtype=torch.float32)
    SiglipVisionModel.from_pretrained(tmp_path / "folder").save_pretrained(tmp_path / "saved")
    shutil.copy(tmp_path / "folder" / "preprocessor_config.json", tmp_path / "saved")
    build_siglip_vision(tmp_path / "single.safetensors", single_file=True, dtype=torch.float32)
    model = SiglipVisionModel.from_pretrained(tmp_path / "folder").eval()
    pixels = SiglipImageProcessor.from_pretrained(tmp_path / "folder")(red_circle, return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True).hidden_states[-2]
    for name in ("folder", "saved", "single.safetensors"):
        spec = probe(tmp_path / name)
        assert spec.model_type == "siglip" and spec.hidden_size == 1152, name
        with torch.no_grad():
            found = load_encoder(spec, torch.device("cpu"), torch.float32)(pixels, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(found, expected), name


# ------------------------------------------------------------------------------------------ refused before compute


@pytest.mark.parametrize(("model", "adapter", "error", "words"), [
    (SD35_MODEL, "FLUX XLabs", IncompatibleError, ["FLUX.1", "SD 3.5", "double-stream blocks", "joint blocks", "width 32"]),
    (FLUX_MODEL, "SD3.5 Large", IncompatibleError, ["SD 3.5", "FLUX.1", "width 32"]),
    (FLUX_MODEL, "Base", IncompatibleError, ["SD 1.5", "FLUX.1", "768"]),
    ("tiny-sdxl", "FLUX XLabs v2", IncompatibleError, ["FLUX.1", "SDXL", "2048"]),
])  # fmt: skip
def test_every_cross_family_pairing_is_refused_in_the_plan(pack, red_circle, model, adapter, error, words):
    engine = Engine(pack)
    with pytest.raises(error) as caught:
        engine.generate(request(model, unit(adapter, red_circle)))
    assert all(w in str(caught.value) for w in words), str(caught.value)
    assert engine.cache_info()["pipelines"]["entries"] == []  # nothing loaded, nothing computed


@pytest.mark.parametrize(("model", "units", "fields", "error", "words"), [
    (FLUX_MODEL, [{"encoder": "IP-Adapter/sdxl_models/image_encoder"}], {}, IncompatibleError,
     ["image_embeds[1280]", "image_embeds[768]"]),
    (SD35_MODEL, [{"encoder": "clip_vision_l"}], {}, IncompatibleError, ["siglip hidden_states[1152]"]),
    (SD35_MODEL, [{}, {}], {}, UnsupportedError, ["one IP-Adapter", "2 units"]),
    (FLUX_MODEL, [{"masks": ["MASK"]}], {}, UnsupportedError, ["masks"]),
    (SD35_MODEL, [{"images": ["IMG", "IMG"]}], {}, UnsupportedError, ["average"]),
    (FLUX_MODEL, [{}], {"prompt": "a cat <lora:x:1>"}, UnknownLoraError, ["LoRA 'x' not found"]),
    (FLUX_MODEL, [{}], {"prompt": "a (cat:1.3)"}, UnsupportedError, ["attention weights"]),
    (FLUX_MODEL, [{}], {"true_cfg_scale": 3.0}, RequestError, ["negative_prompt"]),
    (FLUX_MODEL, [{"negative_images": ["IMG"]}], {}, RequestError, ["true_cfg_scale"]),
    ("tiny-sd15", [], {"true_cfg_scale": 3.0}, RequestError, ["FLUX"]),
    (FLUX_MODEL, [{"layers": [1.0]}], {}, RequestError, ["2 blocks"]),
    (FLUX_MODEL, [{"layers": "style"}], {}, RequestError, ["list of 2"]),
    (SD35_MODEL, [], {"sampler": "DPM++ 2M"}, UnsupportedError, ["flow-matching"]),
    (SD35_MODEL, [], {"init_images": ["IMG"]}, UnsupportedError, ["image-to-image"]),
])  # fmt: skip
def test_what_these_families_cannot_do_is_refused_naming_the_field(pack, red_circle, model, units, fields, error, words):
    engine = Engine(pack)
    adapter = {SD35_MODEL: "SD3.5 Large", FLUX_MODEL: "FLUX XLabs"}.get(model, "Base")

    def filled(value):
        return red_circle if value in ("IMG", "MASK") else value

    built = [unit(adapter, red_circle) | {k: [filled(x) for x in v] if isinstance(v, list) and k != "layers" else v
                                          for k, v in extra.items()} for extra in units]  # fmt: skip
    fields = {k: [filled(x) for x in v] if isinstance(v, list) else v for k, v in fields.items()}
    with pytest.raises(error) as caught:
        engine.generate(request(model, *built, **fields))
    assert all(w in str(caught.value) for w in words), str(caught.value)
    assert engine.cache_info()["pipelines"]["entries"] == []


# ------------------------------------------------------------------------------------------- diffusers' own pixels


def sd3_reference(pack, image, scale, **call):
    from diffusers import StableDiffusion3Pipeline
    from transformers import SiglipImageProcessor

    spec = probe(pack / SIGLIP_FILE)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        pack / "diffusers" / SD35_MODEL, text_encoder_3=None, tokenizer_3=None,  # saved without T5, as diffusers allows
        image_encoder=load_encoder(spec, torch.device("cpu"), torch.float32),
        feature_extractor=SiglipImageProcessor(size={"height": spec.image_size, "width": spec.image_size}),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    folder, name = SD35_ADAPTER.rsplit("/", 1)
    pipe.load_ip_adapter(str(pack / folder), weight_name=name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    return pipe("a red cat", num_inference_steps=3, width=64, height=64, generator=torch.Generator().manual_seed(1),
                ip_adapter_image=image, **call).images[0]  # fmt: skip


def flux_pipeline(pack, adapters: list[str]):
    from diffusers import FluxPipeline
    from transformers import CLIPImageProcessor

    spec = probe(pack / VIT_L_FILE)
    pipe = FluxPipeline.from_pretrained(pack / "diffusers" / FLUX_MODEL,
                                        image_encoder=load_encoder(spec, torch.device("cpu"), torch.float32),
                                        feature_extractor=CLIPImageProcessor(size=224, crop_size=224))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(pack), weight_name=adapters, subfolder=[""] * len(adapters),
                         image_encoder_pretrained_model_name_or_path=None)  # fmt: skip
    return pipe


def flux_run(pipe, images, **call):
    return pipe("a red cat", num_inference_steps=3, width=64, height=64, guidance_scale=3.5,
                generator=torch.Generator().manual_seed(1), ip_adapter_image=images, **call).images[0]  # fmt: skip


def test_sd35_equals_diffusers_load_ip_adapter(pack, engine, red_circle):
    got = engine.generate(request(SD35_MODEL, unit("SD3.5 Large", red_circle, scale=0.6), negative_prompt="blue"))
    expected = sd3_reference(pack, red_circle, 0.6, negative_prompt="blue", guidance_scale=5.0)
    assert max_diff(got.images[0], expected) <= 1
    plain = engine.generate(request(SD35_MODEL, negative_prompt="blue"))
    assert max_diff(got.images[0], plain.images[0]) > 10  # the adapter acts
    info = got.info["ip_adapters"][0]
    assert info["encoder"] == SIGLIP_FILE.removesuffix(".safetensors") or info["encoder"].endswith("siglip-so400m-patch14-384")


def test_flux_equals_diffusers_load_ip_adapter(pack, engine, red_circle):
    pipe = flux_pipeline(pack, [FLUX_V1])
    pipe.set_ip_adapter_scale(0.7)
    got = engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle, scale=0.7)))
    assert max_diff(got.images[0], flux_run(pipe, red_circle)) <= 1
    # per-block scales, as diffusers' FLUX set_ip_adapter_scale takes them
    pipe.set_ip_adapter_scale([[1.0, 0.2]])
    got = engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle, scale=1.0, layers=[1.0, 0.2])))
    assert max_diff(got.images[0], flux_run(pipe, red_circle)) <= 1
    # true CFG: diffusers' negative image is black unless one is given
    pipe.set_ip_adapter_scale(0.7)
    got = engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle, scale=0.7), negative_prompt="blue",
                                  true_cfg_scale=2.5))  # fmt: skip
    assert max_diff(got.images[0], flux_run(pipe, red_circle, negative_prompt="blue", true_cfg_scale=2.5)) <= 1


def test_flux_encodes_its_black_negative_only_under_true_cfg(pack, red_circle):
    """FLUX's pipeline reads negative image embeddings only under true CFG: without it only the reference image
    is encoded; with it the black image diffusers uses is encoded once more."""
    engine = Engine(pack)
    engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle), steps=1))
    assert engine.cache_info()["embeddings"]["misses"] == 1
    engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle), steps=1, negative_prompt="blue", true_cfg_scale=2.0))
    assert engine.cache_info()["embeddings"]["misses"] == 2


def test_two_flux_adapters_equal_diffusers_with_both_loaded(pack, engine, red_circle, yellow_square):
    """Two units (diffusers' FLUX loader reads the same v1 file twice; imprompt builds it once and attaches it
    twice), and a negative image under true CFG."""
    pipe = flux_pipeline(pack, [FLUX_V1, FLUX_V1])
    pipe.set_ip_adapter_scale([0.5, 0.8])
    got = engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle, scale=0.5),
                                  unit("FLUX XLabs", yellow_square, scale=0.8, negative_images=[red_circle]),
                                  negative_prompt="blue", true_cfg_scale=2.0))  # fmt: skip
    from imprompt.loading.encoders import image_processor

    spec = probe(pack / VIT_L_FILE)
    encoder, processor = load_encoder(spec, torch.device("cpu"), torch.float32), image_processor(spec)

    def embeds(image):
        with torch.no_grad():
            return encoder(processor(images=image, return_tensors="pt").pixel_values).image_embeds[None]

    black = embeds(np.zeros((64, 64, 3), dtype=np.uint8))
    expected = pipe("a red cat", num_inference_steps=3, width=64, height=64, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(1), negative_prompt="blue", true_cfg_scale=2.0,
                    ip_adapter_image_embeds=[embeds(red_circle), embeds(yellow_square)],
                    negative_ip_adapter_image_embeds=[black, embeds(red_circle)]).images[0]  # fmt: skip
    assert max_diff(got.images[0], expected) <= 1
    assert [u["adapter"] for u in got.info["ip_adapters"]] == ["FLUX XLabs", "FLUX XLabs"]


def test_switching_across_four_families_in_one_process_is_a_non_event(pack, red_circle):
    """SD 1.5, SD 3.5, SDXL, FLUX and back, each with its adapter, in one engine: every image equals that
    request alone in a fresh engine, and each encoder was loaded once."""
    requests = [
        request("tiny-sd15", unit("Base", red_circle)),
        request(SD35_MODEL, unit("SD3.5 Large", red_circle)),
        request("tiny-sdxl", unit("Base SDXL", red_circle)),
        request(FLUX_MODEL, unit("FLUX XLabs v2", red_circle)),
        request(SD35_MODEL, unit("SD3.5 Large", red_circle)),
        request("tiny-sd15", unit("Base", red_circle)),
        request(FLUX_MODEL, unit("FLUX XLabs", red_circle), unit("FLUX XLabs v2", red_circle)),
    ]
    engine = Engine(pack)
    results = [engine.generate(r) for r in requests]
    fresh = {}
    for i, (req, result) in enumerate(zip(requests, results)):
        key = repr(req)
        fresh.setdefault(key, Engine(pack).generate(req).images[0])
        assert max_diff(result.images[0], fresh[key]) == 0, i
    loads = [e["encoder"] for r in results for e in r.info["events"] if e["event"] == "encoder_loaded"]
    assert len(loads) == len(set(loads)) == 4  # ViT-H, bigG, SigLIP, ViT-L: each once


def test_a_request_that_fails_on_flux_leaves_the_engine_as_able(pack, red_circle):
    engine = Engine(pack)
    first = engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle)))
    with pytest.raises(ImpromptError):
        engine.generate(request(FLUX_MODEL, unit("SD3.5 Large", red_circle)))
    again = engine.generate(request(FLUX_MODEL, unit("FLUX XLabs", red_circle)))
    assert max_diff(first.images[0], again.images[0]) == 0


def test_a1111_payloads_carry_true_cfg_and_name_forges_distilled_cfg(pack, red_circle):
    """`true_cfg_scale` reaches the request; Forge's `distilled_cfg_scale` (its FLUX guidance) is not read, and on
    a FLUX model the response says so instead of dropping it silently (on other models it has no effect)."""
    from imprompt.models.store import ModelStore
    from imprompt.server.a1111 import from_sdnext_payload
    from imprompt.util.images import image_to_base64

    store = ModelStore([pack])
    base = {"prompt": "a cat", "negative_prompt": "blue", "cfg_scale": 3.5, "true_cfg_scale": 2.0,
            "distilled_cfg_scale": 3.5, "ip_adapter": [{"adapter": "FLUX XLabs", "images": [image_to_base64(red_circle)]}]}  # fmt: skip
    flux = from_sdnext_payload({**base, "override_settings": {"sd_model_checkpoint": "tiny-flux"}}, store=store)
    assert flux.request.true_cfg_scale == 2.0 and flux.request.cfg_scale == 3.5
    assert any("distilled_cfg_scale" in w and "cfg_scale" in w for w in flux.warnings), flux.warnings
    sd15 = from_sdnext_payload({"prompt": "a cat", "distilled_cfg_scale": 3.5,
                                "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}, store=store)  # fmt: skip
    assert sd15.warnings == []


def test_flux_v2_at_t5s_full_width_equals_diffusers(tmp_path, red_circle):
    """XLabs v2 (16 tokens) against diffusers: its FLUX loader counts 16 tokens only when the projection has
    65536 rows (16 x 4096), so this FLUX has T5's real width (4096) and its encoder a narrow projection (64),
    which keeps the file small. imprompt reads the 16 tokens from rows / width, here and at any width."""
    from transformers import CLIPImageProcessor

    from imprompt.demo.tiny_dits import build_flux_pipeline, transformer_config, write_flux_adapter
    from imprompt.demo.tiny_models import build_clip_vision

    build_flux_pipeline(tmp_path / "diffusers" / "flux-4096", t5_width=4096)
    build_clip_vision(tmp_path / "clip_vision" / "narrow.safetensors", hidden_size=48, projection_dim=64, num_layers=2,
                      heads=4, seed=8, single_file=True)  # fmt: skip
    write_flux_adapter(tmp_path / "flux-ip-adapter-v2.safetensors", transformer_config(tmp_path / "diffusers" / "flux-4096"),
                       seed=61, embed_dim=64, tokens=16)  # fmt: skip
    assert probe(tmp_path / "flux-ip-adapter-v2.safetensors").tokens == 16
    got = Engine(tmp_path).generate(request("flux-4096", unit("flux-ip-adapter-v2", red_circle, scale=0.8)))

    from diffusers import FluxPipeline

    spec = probe(tmp_path / "clip_vision" / "narrow.safetensors")
    pipe = FluxPipeline.from_pretrained(tmp_path / "diffusers" / "flux-4096",
                                        image_encoder=load_encoder(spec, torch.device("cpu"), torch.float32),
                                        feature_extractor=CLIPImageProcessor(size=224, crop_size=224))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(tmp_path), weight_name="flux-ip-adapter-v2.safetensors",
                         image_encoder_pretrained_model_name_or_path=None)  # fmt: skip
    assert pipe.transformer.encoder_hid_proj.image_projection_layers[0].num_image_text_embeds == 16
    pipe.set_ip_adapter_scale(0.8)
    assert max_diff(got.images[0], flux_run(pipe, red_circle)) <= 1


def test_instantx_bin_pickle_reads_as_its_safetensors(pack, tmp_path, red_circle):
    """InstantX ships `ip-adapter.bin`, a nested {"image_proj": ..., "ip_adapter": ...} pickle: read weights-only,
    probed and run exactly as the flat safetensors of the same tensors."""
    tensors = load_file(pack / SD35_ADAPTER)
    nested = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        group, _, name = key.partition(".")
        nested[group][name] = value
    root = tmp_path / "models"
    shutil.copytree(pack / "diffusers" / SD35_MODEL, root / SD35_MODEL)
    shutil.copy(pack / SIGLIP_FILE, root / "siglip.safetensors")
    torch.save(nested, root / "ip-adapter.bin")
    spec = probe(root / "ip-adapter.bin")
    assert (spec.architecture, spec.encoder_type, spec.tokens) == ("sd3", "siglip", 8)
    got = Engine(root).generate(request(SD35_MODEL, unit("ip-adapter", red_circle)))
    expected = Engine(pack).generate(request(SD35_MODEL, unit("SD3.5 Large", red_circle)))
    assert max_diff(got.images[0], expected.images[0]) == 0


def test_a_second_sd35_adapter_or_a_rewritten_one_builds_while_another_is_attached(pack, red_circle, tmp_path):
    """diffusers' SD3 converter numbers blocks by the transformer's live attention processors, which an attached
    adapter's image projection adds to: a second adapter file, or the same file rewritten, must still build (and
    every later request on the model must not fail)."""
    from imprompt.demo.tiny_dits import transformer_config, write_sd3_adapter

    folder = tmp_path / "ipadapter"
    folder.mkdir()
    config = transformer_config(pack / "diffusers" / SD35_MODEL)
    write_sd3_adapter(folder / "second-sd35.safetensors", config, seed=77)
    engine = Engine([pack, tmp_path])
    first = engine.generate(request(SD35_MODEL, unit("SD3.5 Large", red_circle)))
    second = engine.generate(request(SD35_MODEL, unit("second-sd35", red_circle)))
    assert max_diff(second.images[0], Engine([pack, tmp_path]).generate(
        request(SD35_MODEL, unit("second-sd35", red_circle))).images[0]) == 0
    assert max_diff(first.images[0], second.images[0]) > 0
    file = folder / "second-sd35.safetensors"
    file.write_bytes(file.read_bytes())  # the same bytes, a new file version: built again while it is attached
    again = engine.generate(request(SD35_MODEL, unit("second-sd35", red_circle)))
    assert max_diff(again.images[0], second.images[0]) == 0
    assert max_diff(engine.generate(request(SD35_MODEL, unit("SD3.5 Large", red_circle))).images[0],
                    first.images[0]) == 0  # fmt: skip


def test_sd35_saved_embeddings_of_several_images_are_refused_or_averaged(pack, red_circle, yellow_square, tmp_path):
    """An SD 3.5 adapter reads one image: saved embeddings of two are refused before compute, as two images are,
    unless the unit averages them; then they give what averaging the images gives."""
    engine = Engine(pack)
    saved = engine.save_embeddings({"adapter": "SD3.5 Large", "images": [red_circle, yellow_square]},
                                   tmp_path / "two.safetensors")  # fmt: skip
    with pytest.raises(UnsupportedError, match=r"ip_adapters\.0\.embeddings: .*2 images.*average"):
        engine.generate(request(SD35_MODEL, {"adapter": "SD3.5 Large", "embeddings": str(saved), "scale": 0.6}))
    averaged = engine.generate(request(SD35_MODEL, {"adapter": "SD3.5 Large", "embeddings": str(saved), "scale": 0.6,
                                                    "average": True}))  # fmt: skip
    expected = engine.generate(request(SD35_MODEL, unit("SD3.5 Large", red_circle, yellow_square, average=True)))
    assert max_diff(averaged.images[0], expected.images[0]) == 0
    assert averaged.info["ip_adapters"][0]["averaged"] is True
