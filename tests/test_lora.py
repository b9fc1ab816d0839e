"""LoRAs, textual inversions, VAEs and clip skip from an A1111 tree: each request's picture equals diffusers' own
path with the same pieces set by hand, and nothing one request used reaches the next."""

from __future__ import annotations

import pytest
import torch
from conftest import max_diff
from diffusers_reference import load_adapters, pipeline
from safetensors.torch import load_file
from single_files import single_file_tensors

from imprompt import Engine
from imprompt.errors import (CheckpointError, IncompatibleError, RequestError, UnknownLoraError, UnknownVaeError,
                             UnsupportedError)
from tools.extra_models import altered_vae, kohya_lora, write, write_extra_models

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def extras(pack, tmp_path_factory):
    return write_extra_models(tmp_path_factory.mktemp("a1111"), pack)


@pytest.fixture(scope="module")
def lora_engine(pack, extras):
    return Engine([pack, extras])


def generate(engine, prompt="a cat", model="tiny-sd15", **fields):
    return engine.generate(model=model, prompt=prompt, seed=1, steps=STEPS, width=SIZE, height=SIZE, **fields)


def reference(pipe, prompt="a cat", **kwargs):
    return pipe(prompt, num_inference_steps=STEPS, width=SIZE, height=SIZE, guidance_scale=7.0,
                generator=torch.Generator().manual_seed(1), **kwargs).images[0]  # fmt: skip


def with_loras(pipe, extras, weights: dict[str, float]):
    """diffusers' documented way: load_lora_weights per file, then set_adapters with the weights."""
    for name in weights:
        pipe.load_lora_weights(str(extras / "Lora"), weight_name=f"{name}.safetensors", adapter_name=name.replace("-", "_"))
    pipe.set_adapters([n.replace("-", "_") for n in weights], list(weights.values()))
    return pipe


def test_lora_tag_equals_diffusers_set_adapters(pack, extras, lora_engine):
    result = generate(lora_engine, "a cat <lora:detail-sd15:0.7>")
    expected = reference(with_loras(pipeline(pack), extras, {"detail-sd15": 0.7}))
    assert max_diff(result.images[0], expected) <= 1
    plain = generate(lora_engine, "a cat")
    assert max_diff(result.images[0], plain.images[0]) > 10  # the LoRA acts
    assert [(lo["name"], lo["weight"], lo["source"]) for lo in result.info["loras"]] == [("detail-sd15", 0.7, "prompt")]


def test_two_loras_with_an_ip_adapter_equal_diffusers(pack, extras, lora_engine, red_circle):
    unit = {"adapter": "Base", "images": [red_circle], "scale": 0.6}
    result = generate(lora_engine, "a cat <lora:detail-sd15:0.7>", loras=[{"name": "style-sd15", "weight": -0.5}],
                      ip_adapters=[unit])  # fmt: skip
    pipe = load_adapters(pipeline(pack), pack, "IP-Adapter/models/ip-adapter_sd15.safetensors")
    pipe.set_ip_adapter_scale(0.6)
    expected = reference(with_loras(pipe, extras, {"detail-sd15": 0.7, "style-sd15": -0.5}), ip_adapter_image=red_circle)
    assert max_diff(result.images[0], expected) <= 1
    # the infotext reads back: the prompt keeps its tag, the field's LoRA is written as one, hashes follow
    text = result.parameters
    assert text.startswith("a cat <lora:detail-sd15:0.7> <lora:style-sd15:-0.5>")
    assert 'Lora hashes: "detail-sd15: ' in text and "style-sd15: " in text


def test_sdxl_lora_equals_diffusers(pack, extras, lora_engine):
    result = generate(lora_engine, "a cat <lora:style-sdxl:0.8>", model="tiny-sdxl")
    expected = reference(with_loras(pipeline(pack, "tiny-sdxl"), extras, {"style-sdxl": 0.8}))
    assert max_diff(result.images[0], expected) <= 1


def test_switching_lora_sets_leaves_nothing_and_reloads_nothing(lora_engine):
    plain = generate(lora_engine).images[0]
    a = generate(lora_engine, "a cat <lora:detail-sd15:1>").images[0]
    generate(lora_engine, "a cat <lora:style-sd15:1> <lora:detail-sd15:0.3>")
    assert max_diff(generate(lora_engine).images[0], plain) == 0
    again = generate(lora_engine, "a cat <lora:detail-sd15:1>")
    assert max_diff(again.images[0], a) == 0
    assert not [e for e in again.info["events"] if e["event"] == "lora_loaded"]  # switched, not reloaded
    loaded = {p.name: len(p.loras.names) for p in lora_engine.state.pipelines.all()}  # other tests' too
    assert loaded["tiny-sd15"] == 2
    assert lora_engine.clear_cache()["loras"] == sum(loaded.values())  # unloaded from every resident model
    assert all(not p.loras.names for p in lora_engine.state.pipelines.all())
    reloaded = generate(lora_engine, "a cat <lora:detail-sd15:1>")
    assert max_diff(reloaded.images[0], a) == 0 and [e for e in reloaded.info["events"] if e["event"] == "lora_loaded"]


def test_lora_budget_evicts_and_unloads(pack, extras):
    engine = Engine([pack, extras], lora_cache_budget=1)  # one LoRA at a time stays loaded
    first = generate(engine, "a cat <lora:detail-sd15:1>").images[0]
    second = generate(engine, "a cat <lora:style-sd15:1>")
    assert [e["lora"] for e in second.info["events"] if e["event"] == "lora_evicted"] == ["detail-sd15"]
    both = generate(engine, "a cat <lora:style-sd15:1> <lora:detail-sd15:1>")  # both needed: neither evicted
    assert len(both.info["loras"]) == 2
    assert max_diff(generate(engine, "a cat <lora:detail-sd15:1>").images[0], first) == 0


@pytest.mark.parametrize(
    ("prompt", "fields", "error", "words"),
    [
        ("a <lora:nope:1>", {}, UnknownLoraError, ["nope", "detail-sd15", "style-sd15"]),
        ("a <lora:style-sdxl:1>", {}, IncompatibleError, ["style-sdxl", "SDXL", "tiny-sd15", "SD 1.5"]),
        ("a <lora:broken-lora:1>", {}, CheckpointError, ["broken-lora.safetensors"]),
        ("a <lora:detail-sd15:30>", {}, RequestError, ["detail-sd15", "30", "-10.0..10.0"]),
        ("a <lora:detail-sd15:x>", {}, RequestError, ["'x'", "<lora:detail-sd15:0.8>"]),
        ("a <lora:detail-sd15:1:0.5>", {}, RequestError, ["<lora:NAME:WEIGHT>"]),
        ("a <hypernet:foo:1>", {}, RequestError, ["hypernetwork"]),
        ("a <lora:detail-sd15:1>", {"loras": [{"name": "detail-sd15"}]}, RequestError, ["twice"]),
        ("a cat", {"negative_prompt": "<lora:detail-sd15:1>"}, RequestError, ["only in the prompt"]),
        ("a cat", {"vae": "nope.safetensors"}, UnknownVaeError, ["'nope.safetensors' not found", "soft-vae.safetensors",
                                                                 "VAE/ (A1111)"]),
    ],
)
def test_bad_loras_are_named_and_change_nothing(lora_engine, prompt, fields, error, words):
    plain = generate(lora_engine).images[0]
    with pytest.raises(error) as caught:
        generate(lora_engine, prompt, **fields)
    for word in words:
        assert word in str(caught.value)
    assert max_diff(generate(lora_engine).images[0], plain) == 0


def test_textual_inversion_equals_diffusers_loader(pack, extras, lora_engine):
    result = generate(lora_engine, "a shiny cat")
    pipe = pipeline(pack)
    pipe.load_textual_inversion(load_file(extras / "embeddings" / "shiny.safetensors")["emb_params"], token="shiny")
    assert max_diff(result.images[0], reference(pipe, "a shiny cat")) <= 1
    assert [i["name"] for i in result.info["textual_inversions"]] == ["shiny"]
    assert "TI hashes: " in result.parameters
    # the name changes no other prompt: "shinyness" holds "shiny" but is other tokens (A1111 matches an embedding's
    # name token by token), so it is read as text, as by a pipeline without the embedding; so is the plain prompt
    plain = pipeline(pack)
    for prompt in ("a shinyness cat", "a cat"):
        other = generate(lora_engine, prompt)
        assert other.info["textual_inversions"] == [] and "TI hashes" not in other.parameters, prompt
        assert max_diff(other.images[0], reference(plain, prompt)) <= 1, prompt


def test_vae_from_the_tree_equals_diffusers_with_it(pack, extras, lora_engine):
    result = generate(lora_engine, vae="soft-vae.safetensors")
    pipe = pipeline(pack)
    pipe.vae = altered_vae(pipe, seed=5)
    assert max_diff(result.images[0], reference(pipe)) <= 1
    assert "VAE: soft-vae.safetensors" in result.parameters and "VAE hash: " in result.parameters
    assert max_diff(generate(lora_engine).images[0], reference(pipeline(pack))) <= 1  # the model's own again


def test_vae_in_original_names_is_converted(pack, tmp_path):
    """A1111's VAE files use the original (LDM) names: diffusers' converter reads them."""
    pipe = pipeline(pack)
    pipe.vae = altered_vae(pipe, seed=6)
    ldm = {k.removeprefix("first_stage_model."): v for k, v in single_file_tensors(pipe).items()
           if k.startswith("first_stage_model.")}  # fmt: skip
    write(tmp_path / "VAE" / "ldm-vae.safetensors", ldm)
    engine = Engine([pack, tmp_path])
    result = generate(engine, vae="ldm-vae")
    assert max_diff(result.images[0], reference(pipe)) <= 1


def test_clip_skip_is_the_earlier_layer_through_the_final_norm(pack, lora_engine):
    """A1111's CLIP_stop_at_last_layers = 2: the penultimate layer's states through the final layer norm."""
    result = generate(lora_engine, clip_skip=2)
    pipe = pipeline(pack)
    with torch.no_grad():
        def states(text):
            ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
            return pipe.text_encoder.final_layer_norm(pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2])

        expected = pipe(prompt_embeds=states("a cat"), negative_prompt_embeds=states(""), num_inference_steps=STEPS,
                        guidance_scale=7.0, width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    assert max_diff(result.images[0], expected) <= 1
    assert max_diff(result.images[0], generate(lora_engine).images[0]) > 0
    assert "Clip skip: 2" in result.parameters


def test_lora_of_unknown_width_is_tried_and_a_misfit_is_a_checkpoint_error(pack, tmp_path):
    """A LoRA whose tensors do not say its family is handed to diffusers; if it does not fit, the error names the
    file, and the model is left as it was."""
    pipe = pipeline(pack)
    tensors = {k: v for k, v in kohya_lora(pipe, seed=9).items() if "attn2_to_k" not in k and "lora_te" not in k}
    tensors = {k: (v[:, :-1] if k.endswith("lora_down.weight") else v) for k, v in tensors.items()}  # wrong widths
    write(tmp_path / "misfit.safetensors", tensors)
    write(tmp_path / "fits.safetensors", kohya_lora(pipe, seed=10))
    engine = Engine([pack, tmp_path])
    plain = generate(engine).images[0]
    with pytest.raises(CheckpointError, match="misfit.safetensors"):
        generate(engine, "a cat <lora:misfit:1>")
    assert max_diff(generate(engine).images[0], plain) == 0
    with pytest.raises(CheckpointError, match="misfit.safetensors"):  # one LoRA loads, the next fails
        generate(engine, "a cat <lora:fits:1> <lora:misfit:1>")
    assert max_diff(generate(engine).images[0], plain) == 0  # the one that loaded does not act


def test_locon_loads_and_loha_is_refused_before_compute(pack, tmp_path):
    """LyCORIS LoCon (kohya names on conv layers too) loads through diffusers, equal to diffusers' own; LoHa, which
    diffusers does not read for SD 1.5 / SDXL, is refused in the plan naming the format."""
    pipe = pipeline(pack)
    generator = torch.Generator().manual_seed(0)
    locon, loha = {}, {}
    for name, module in pipe.unet.named_modules():
        key = "lora_unet_" + name.replace(".", "_")
        if name.endswith("resnets.0.conv1") and isinstance(module, torch.nn.Conv2d):
            locon |= {f"{key}.lora_down.weight": torch.randn(4, module.in_channels, 3, 3, generator=generator) * 0.1,
                      f"{key}.lora_up.weight": torch.randn(module.out_channels, 4, 1, 1, generator=generator) * 0.1,
                      f"{key}.alpha": torch.tensor(4.0)}  # fmt: skip
        if name.endswith("attn2.to_k") and isinstance(module, torch.nn.Linear):
            loha |= {f"{key}.hada_w1_a": torch.randn(module.out_features, 4), f"{key}.hada_w1_b": torch.randn(4, module.in_features),
                     f"{key}.hada_w2_a": torch.randn(module.out_features, 4), f"{key}.hada_w2_b": torch.randn(4, module.in_features),
                     f"{key}.alpha": torch.tensor(4.0)}  # fmt: skip
    write(tmp_path / "Lora" / "locon.safetensors", locon)
    write(tmp_path / "Lora" / "loha.safetensors", loha)
    engine = Engine([pack, tmp_path])
    result = generate(engine, "a cat <lora:locon:0.9>")
    pipe.load_lora_weights(str(tmp_path / "Lora"), weight_name="locon.safetensors", adapter_name="locon")
    pipe.set_adapters(["locon"], [0.9])
    assert max_diff(result.images[0], reference(pipe)) <= 1
    assert max_diff(result.images[0], generate(engine).images[0]) > 0
    with pytest.raises(UnsupportedError, match="loha.safetensors.*LyCORIS LoHa"):
        generate(engine, "a cat <lora:loha:1>")


def test_the_lora_budget_is_one_budget_for_every_resident_model(pack, extras):
    """LoRAs loaded into several resident models share one budget (it was one budget per model, so ten resident
    models could hold ten budgets' worth): a LoRA loaded into SDXL pushes out one another model holds."""
    engine = Engine([pack, extras], lora_cache_budget=1)  # room for one LoRA in all
    first = generate(engine, "a cat <lora:detail-sd15:1>")
    second = generate(engine, "a cat <lora:style-sdxl:1>", model="tiny-sdxl")
    assert [e["lora"] for e in second.info["events"] if e["event"] == "lora_evicted"] == ["detail-sd15"]
    assert [len(p.loras.names) for p in engine.state.pipelines.all()] == [0, 1]
    assert [e["label"] for e in engine.cache_info()["loras"]["entries"]] == ["style-sdxl"]
    again = generate(engine, "a cat <lora:detail-sd15:1>")  # loaded again, in its model, and the same picture
    assert [e["event"] for e in again.info["events"] if e["event"].startswith("lora_")] == ["lora_loaded", "lora_evicted"]
    assert max_diff(again.images[0], first.images[0]) == 0
