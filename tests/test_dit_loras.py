"""FLUX and SD 3.5 LoRAs in the formats users download (kohya, diffusers / PEFT, XLabs, ComfyUI's BFL names): read
from tensors, refused before compute on a model of another family, and pixel for pixel what diffusers' own
`load_lora_weights` + `set_adapters` give; switched per request with nothing left behind."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff
from dit_loras import (comfy_lora, diffusers_lora, kohya_lora, lora_pairs, original_pairs, write, xlabs_lora,
                       xlabs_pairs)  # fmt: skip

from imprompt import Engine
from imprompt.demo.tiny_dits import build_flux_pipeline, build_sd3_pipeline
from imprompt.errors import IncompatibleError, RequestError
from imprompt.models.probe import probe

FLUX, SD35 = "tiny-flux", "tiny-sd35"


def no_fused_single(pairs: dict) -> dict:
    """Without FLUX's single-block linear1 (q, k, v and the MLP in one): diffusers' kohya converter splits it at
    FLUX.1's own widths (3072 x 3 + 12288), so a tiny model's cannot be read by it."""
    return {n: p for n, p in pairs.items() if not (n.startswith("single_") and n.endswith(("to_q", "to_k", "to_v", "proj_mlp")))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit-loras")
    flux = build_flux_pipeline(root / "diffusers" / FLUX).transformer
    sd3 = build_sd3_pipeline(root / "diffusers" / SD35).transformer
    lora, ref = root / "Lora", root / "reference"
    pairs = no_fused_single(lora_pairs(flux, 1))
    write(lora / "flux-kohya.safetensors", kohya_lora(original_pairs(pairs, flux)))
    write(lora / "flux-diffusers.safetensors", diffusers_lora(lora_pairs(flux, 2)))
    pairs = no_fused_single(lora_pairs(flux, 3))
    write(lora / "flux-comfy.safetensors", comfy_lora(original_pairs(pairs, flux)))
    # the same file with kohya's spelling of the pair, which diffusers' converter reads in ComfyUI's names
    write(ref / "flux-comfy.safetensors", {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v
                                           for k, v in comfy_lora(original_pairs(pairs, flux)).items()})  # fmt: skip
    write(lora / "flux-xlabs.safetensors", xlabs_lora(original_pairs(xlabs_pairs(lora_pairs(flux, 4)), flux)))
    write(lora / "sd35-diffusers.safetensors", diffusers_lora(lora_pairs(sd3, 5)))
    pairs = lora_pairs(sd3, 6)
    write(lora / "sd35-kohya.safetensors", kohya_lora(original_pairs(pairs, sd3)))
    write(ref / "sd35-kohya.safetensors", diffusers_lora(pairs))  # the same pairs in diffusers' names
    generator = torch.Generator().manual_seed(7)
    write(lora / "style-sdxl.safetensors", {  # an SDXL UNet LoRA (2048-wide cross-attention)
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.randn(4, 2048, generator=generator),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.randn(640, 4, generator=generator)})  # fmt: skip
    return root


@pytest.fixture(scope="module")
def engine(tree):
    return Engine(tree)


def generate(engine, model, prompt="a red cat", **fields):
    return engine.generate(model=model, prompt=prompt, seed=1, steps=3, width=64, height=64,
                           cfg_scale=3.5 if model == FLUX else 5.0, **fields)  # fmt: skip


def reference(tree, model, loras: dict):
    """diffusers' documented way: the pipeline from the folder, load_lora_weights per file, set_adapters."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if model == FLUX:
        pipe = FluxPipeline.from_pretrained(tree / "diffusers" / FLUX)
    else:  # saved without T5, as diffusers allows
        pipe = StableDiffusion3Pipeline.from_pretrained(tree / "diffusers" / SD35, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    for i, (path, _) in enumerate(loras.items()):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"a{i}")
    if loras:
        pipe.set_adapters([f"a{i}" for i in range(len(loras))], list(loras.values()))
    return pipe("a red cat", num_inference_steps=3, width=64, height=64, guidance_scale=3.5 if model == FLUX else 5.0,
                generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip


def test_the_probe_reads_each_lora_family_and_format(tree):
    lora = tree / "Lora"
    found = {p.stem: probe(p) for p in sorted(lora.glob("*.safetensors"))}
    said = {name: (s.architecture, s.format, s.width, s.rank, s.parts) for name, s in found.items()}
    assert said == {
        "flux-kohya": ("flux", "kohya", 32, 4, ("transformer",)),
        "flux-diffusers": ("flux", "diffusers", 32, 4, ("transformer",)),
        "flux-comfy": ("flux", "comfyui", 32, 4, ("transformer",)),
        "flux-xlabs": ("flux", "xlabs", 32, 4, ("transformer",)),
        # diffusers' names of joint / double-stream blocks alone, at a width no published model has: either family
        "sd35-diffusers": ("dit", "diffusers", 32, 4, ("transformer",)),
        "sd35-kohya": ("sd3", "kohya", 32, 4, ("transformer",)),
        "style-sdxl": ("unet", "kohya", 2048, 4, ("unet",)),
    }
    assert found["flux-kohya"].family == "FLUX.1" and found["sd35-kohya"].family == "SD 3.5"


@pytest.mark.parametrize(
    ("name", "weight", "reference_file", "by_tag"),
    [
        ("flux-kohya", 0.8, "Lora", True),
        ("flux-xlabs", 1.0, "Lora", False),
        ("flux-diffusers", -0.6, "Lora", True),
        ("flux-comfy", 0.9, "reference", False),  # ComfyUI's lora_A spelling, which diffusers does not read itself
    ],
)
def test_flux_loras_in_each_format_equal_diffusers(tree, engine, name, weight, reference_file, by_tag):
    if by_tag:
        got = generate(engine, FLUX, f"a red cat <lora:{name}:{weight}>")
    else:
        got = generate(engine, FLUX, loras=[{"name": name, "weight": weight}])
    expected = reference(tree, FLUX, {tree / reference_file / f"{name}.safetensors": weight})
    assert max_diff(got.images[0], expected) <= 1
    assert max_diff(got.images[0], generate(engine, FLUX).images[0]) > 10  # the LoRA acts
    assert [(lo["name"], lo["weight"]) for lo in got.info["loras"]] == [(name, weight)]
    assert got.info["prompt"].startswith("a red cat") and not got.info["warnings"]


@pytest.mark.parametrize(("name", "reference_file"), [("sd35-diffusers", "Lora"), ("sd35-kohya", "reference")])
def test_sd35_loras_equal_diffusers(tree, engine, name, reference_file):
    got = generate(engine, SD35, f"a red cat <lora:{name}:0.7>")
    expected = reference(tree, SD35, {tree / reference_file / f"{name}.safetensors": 0.7})
    assert max_diff(got.images[0], expected) <= 1
    assert max_diff(got.images[0], generate(engine, SD35).images[0]) > 10


def test_two_flux_loras_switched_and_back_leave_nothing_behind(tree, engine):
    both = generate(engine, FLUX, "a red cat <lora:flux-kohya:0.5>", loras=[{"name": "flux-xlabs", "weight": 0.7}])
    expected = reference(tree, FLUX, {tree / "Lora" / "flux-kohya.safetensors": 0.5,
                                      tree / "Lora" / "flux-xlabs.safetensors": 0.7})  # fmt: skip
    assert max_diff(both.images[0], expected) <= 1
    one = generate(engine, FLUX, "a red cat <lora:flux-diffusers:1>")
    plain = generate(engine, FLUX)
    again = generate(engine, FLUX, "a red cat <lora:flux-diffusers:1>")
    assert not [e for e in again.info["events"] if e["event"] == "lora_loaded"]  # switched, not reloaded
    fresh = Engine(tree)
    assert max_diff(plain.images[0], generate(fresh, FLUX).images[0]) == 0
    assert max_diff(one.images[0], again.images[0]) == 0
    assert max_diff(one.images[0], generate(fresh, FLUX, "a red cat <lora:flux-diffusers:1>").images[0]) == 0


@pytest.mark.parametrize(
    ("model", "prompt", "words"),
    [
        (SD35, "a red cat <lora:flux-kohya:1>", ["flux-kohya", "FLUX.1", "tiny-sd35", "SD 3.5", "sd35-kohya"]),
        (FLUX, "a red cat <lora:style-sdxl:1>", ["style-sdxl", "SDXL", "tiny-flux", "FLUX.1", "flux-kohya", "flux-xlabs"]),
        (FLUX, "a red cat <lora:sd35-kohya:1>", ["sd35-kohya", "SD 3.5", "tiny-flux", "FLUX.1", "sd35-diffusers"]),
    ],
)
def test_a_lora_of_another_family_is_refused_before_compute(tree, model, prompt, words):
    engine = Engine(tree)
    with pytest.raises(IncompatibleError) as caught:
        generate(engine, model, prompt)
    for word in words:
        assert word in str(caught.value)
    assert engine.state.pipelines.all() == []  # refused in the plan: nothing was loaded


def test_lora_tags_in_a_flux_negative_prompt_are_refused(engine):
    with pytest.raises(RequestError, match="only in the prompt"):
        generate(engine, FLUX, negative_prompt="<lora:flux-kohya:1>", true_cfg_scale=2.0)


@pytest.fixture(scope="module")
def fp8_tree(tmp_path_factory):
    """A ComfyUI FLUX tree whose transformer file is fp8 (e4m3fn), the other parts float32 (only the transformer
    rounded), a diffusers-format LoRA in `models/loras/`, and the diffusers folder it was all written from."""
    import shutil

    from comfy_trees import fp8_tensors, save_part, split_tensors

    from imprompt.models.single_file import COMFY_T5_TOKENIZER

    root = tmp_path_factory.mktemp("fp8-flux")
    flux = build_flux_pipeline(root / "reference", seed=5, clip_vocabulary=True)  # CLIP-L files hold its whole vocabulary
    parts, models = split_tensors(flux), root / "models"
    save_part(fp8_tensors(parts["transformer"]), models / "diffusion_models" / "flux1-dev-fp8.safetensors", None)
    for part, name in (("vae", "vae/ae"), ("clip_l", "text_encoders/clip_l"), ("t5xxl", "text_encoders/t5xxl_fp16")):
        save_part(parts[part], models / f"{name}.safetensors", None)
    write(models / "loras" / "flux-detail.safetensors", diffusers_lora(lora_pairs(flux.transformer, 2)))
    shutil.copytree(root / "reference" / "tokenizer_2", root / COMFY_T5_TOKENIZER)
    return root


def test_a_lora_on_an_fp8_transformer_equals_diffusers_with_the_lora_unrounded(fp8_tree):
    """A transformer whose linear layers stay fp8 in memory (diffusers' layerwise casting, as fp8 files load) takes a
    LoRA at its own values: the pixels equal diffusers' pipeline whose transformer has the same fp8-rounded weights
    and the LoRA loaded by `load_lora_weights` unrounded (PEFT would make the LoRA's layers fp8, beside their base
    layers: up to 7/255 apart here). The base weights stay fp8; the LoRA switched off leaves the plain model."""
    from comfy_trees import fp8_rounded
    from diffusers import FluxPipeline

    engine = Engine(fp8_tree / "models")
    fields = {"model": "flux1-dev-fp8", "seed": 1, "steps": 3, "width": 64, "height": 64, "cfg_scale": 3.5}
    got = engine.generate(prompt="a red cat <lora:flux-detail:0.8>", **fields)
    pipeline = engine.state.pipelines.on_device.values()[0].pipeline
    assert torch.float8_e4m3fn in {m.weight.dtype for m in pipeline.transformer.modules() if isinstance(m, torch.nn.Linear)}
    plain = engine.generate(prompt="a red cat", **fields)

    expected = FluxPipeline.from_pretrained(fp8_tree / "reference")
    expected.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for p in expected.transformer.parameters():
            p.copy_(fp8_rounded(p))

    def run(pipe):
        return pipe("a red cat", num_inference_steps=3, width=64, height=64, guidance_scale=3.5,
                    generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip

    expected_plain = run(expected)
    lora = fp8_tree / "models" / "loras" / "flux-detail.safetensors"
    expected.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="detail")
    expected.set_adapters(["detail"], [0.8])
    assert max_diff(got.images[0], run(expected)) <= 1
    assert max_diff(got.images[0], plain.images[0]) > 10  # the LoRA acts
    assert max_diff(plain.images[0], expected_plain) <= 1
