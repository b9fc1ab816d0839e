"""SDXL and composition adapters, and the per-unit controls (windows, several images, masks, layer weights,
negative images, img2img, saved embeddings), each held to diffusers' own pipelines where diffusers has it."""

from __future__ import annotations

import diffusers_reference as reference
import pytest
import torch
from conftest import max_diff, request, unit
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image

from imprompt import Engine
from imprompt.errors import IncompatibleError, RequestError

SDXL = "tiny-sdxl"

# friendly name -> (file in the pack, encoder folder it was trained with)
SDXL_VARIANTS = {
    "Base SDXL": ("IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors", reference.VIT_G),
    "Base ViT-H SDXL": ("IP-Adapter/sdxl_models/ip-adapter_sdxl_vit-h.safetensors", reference.VIT_H),
    "Plus ViT-H SDXL": ("IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", reference.VIT_H),
    "Plus Face ViT-H SDXL": ("IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.safetensors", reference.VIT_H),
    "Ostris Composition ViT-H SDXL": ("ipadapter/ip_plus_composition_sdxl.safetensors", reference.VIT_H),
}


def half_mask(side: str, size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size) if side == "left" else (size // 2, 0, size, size))
    return mask.convert("RGB")


@pytest.fixture(scope="module")
def sdxl_plain(engine):
    return engine.generate(request(model=SDXL)).images[0]


# ----------------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("name", list(SDXL_VARIANTS))
def test_each_sdxl_variant_equals_diffusers(pack, engine, red_circle, sdxl_plain, name):
    file, encoder = SDXL_VARIANTS[name]
    pipe = reference.load_adapters(reference.pipeline(pack, SDXL), pack, file, encoder)
    pipe.set_ip_adapter_scale(0.6)
    expected = reference.run(pipe, ip_adapter_image=red_circle)

    result = engine.generate(request(unit(name, red_circle, 0.6), model=SDXL))

    assert max_diff(result.images[0], expected) <= 1
    assert max_diff(result.images[0], sdxl_plain) > 20
    assert result.info["ip_adapters"][0]["encoder"] == encoder


def test_sd15_composition_adapter_equals_diffusers(pack, engine, red_circle):
    pipe = reference.load_adapters(reference.pipeline(pack), pack, "ipadapter/ip_plus_composition_sd15.safetensors")
    pipe.set_ip_adapter_scale(0.6)
    expected = reference.run(pipe, ip_adapter_image=red_circle)
    result = engine.generate(request(unit("Ostris Composition ViT-H", red_circle, 0.6)))
    assert max_diff(result.images[0], expected) <= 1
    assert max_diff(result.images[0], engine.generate(request()).images[0]) > 20  # the adapter acts


def test_switching_families_in_one_engine(pack, red_circle, yellow_square):
    """SD 1.5 and SDXL models, each with its adapters, alternately in one engine: each result equals a fresh engine's."""
    sequence = [
        request(unit("Base", red_circle)),
        request(unit("Base SDXL", yellow_square), model=SDXL),
        request(unit("Base ViT-G", red_circle), unit("Plus", yellow_square)),
        request(unit("Plus ViT-H SDXL", red_circle), unit("Base SDXL", red_circle), model=SDXL),
        request(unit("Base", red_circle)),
    ]
    engine = Engine(pack)
    results = [engine.generate(r) for r in sequence]
    assert [r.info["model"] for r in results] == ["tiny-sd15", SDXL, "tiny-sd15", SDXL, "tiny-sd15"]
    for r, req in zip(results, sequence):
        assert max_diff(r.images[0], Engine(pack).generate(req).images[0]) == 0
    # both stay resident (the pipeline budget holds both tiny models): switching back is no reload
    assert [e["event"] for e in results[2].info["events"] if e["event"].startswith("model_")] == ["model_reused"]


@pytest.mark.parametrize(
    "model, adapter, widths",
    [("tiny-sd15", "Base SDXL", ("2048", "768")), (SDXL, "Base", ("768", "2048")), (SDXL, "Plus", ("768", "2048"))],
)
def test_family_mismatch_is_refused_before_compute(pack, red_circle, model, adapter, widths):
    """Refused in the plan: in a fresh engine, no model, encoder, adapter or embedding was loaded or computed."""
    engine = Engine(pack)
    with pytest.raises(IncompatibleError) as caught:
        engine.generate(request(unit(adapter, red_circle), model=model))
    message = str(caught.value)
    assert all(w in message for w in widths) and "SD 1.5" in message and "SDXL" in message
    cache = engine.cache_info()
    assert cache["model"] is None
    assert [cache[kind]["entries"] for kind in ("encoders", "adapters", "embeddings")] == [[], [], []]


# ------------------------------------------------------------------------------------------------------ windows


@pytest.mark.parametrize("start, end, active", [(0.0, 0.5, [0, 1]), (0.25, 0.75, [1, 2]), (0.5, 1.0, [2, 3]), (0.0, 1.0, [0, 1, 2, 3])])
def test_window_is_honoured_step_by_step(pack, engine, red_circle, start, end, active):
    """The unit acts at step i of n exactly when start <= i/n < end. diffusers has no start/end of its own, so
    the reference is diffusers with the scale switched per step by a callback that follows that same documented
    rule: this checks that imprompt applies its rule exactly (and reports the steps), not where the rule comes from."""
    pipe = reference.load_adapters(reference.pipeline(pack), pack, "IP-Adapter/models/ip-adapter_sd15.safetensors")
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    on = lambda i, n: start <= i / n < end  # noqa: E731
    pipe.set_ip_adapter_scale(0.8 if on(0, 4) else 0.0)

    def step_end(p, i, t, tensors):
        p.set_ip_adapter_scale(0.8 if on(i + 1, p.num_timesteps) else 0.0)
        return tensors

    expected = reference.run(pipe, ip_adapter_image=red_circle, callback_on_step_end=step_end)
    result = engine.generate(request(unit("Base", red_circle, 0.8, start=start, end=end), sampler="Euler"))
    assert max_diff(result.images[0], expected) <= 1
    assert result.info["ip_adapters"][0]["active_steps"] == active


# ------------------------------------------------------------------------------------------ images and masks


def test_several_images_in_one_unit_equal_diffusers(pack, engine, red_circle, yellow_square):
    pipe = reference.load_adapters(reference.pipeline(pack), pack, "IP-Adapter/models/ip-adapter-plus_sd15.safetensors")
    pipe.set_ip_adapter_scale(0.7)
    expected = reference.run(pipe, ip_adapter_image=[[red_circle, yellow_square]])
    result = engine.generate(request({"adapter": "Plus", "images": [red_circle, yellow_square], "scale": 0.7}))
    assert max_diff(result.images[0], expected) <= 1
    assert result.info["ip_adapters"][0]["images"] == 2
    first_only = engine.generate(request({"adapter": "Plus", "images": [red_circle], "scale": 0.7}))
    assert max_diff(result.images[0], first_only.images[0]) > 10  # the second image acts too


def test_averaging_folds_images_into_one_token_set(engine, red_circle, yellow_square):
    same_twice = engine.generate(request({"adapter": "Base", "images": [red_circle, red_circle], "average": True}))
    once = engine.generate(request({"adapter": "Base", "images": [red_circle]}))
    assert max_diff(same_twice.images[0], once.images[0]) == 0  # the mean of one embedding twice is that embedding
    mixed = engine.generate(request({"adapter": "Base", "images": [red_circle, yellow_square], "average": True}))
    apart = engine.generate(request({"adapter": "Base", "images": [red_circle, yellow_square]}))
    assert max_diff(mixed.images[0], apart.images[0]) > 0


def test_masks_equal_diffusers(pack, engine, red_circle, yellow_square):
    """Two units, each confined to one half of the picture (diffusers' IP-Adapter masking example)."""
    left, right = half_mask("left"), half_mask("right")
    pipe = reference.load_adapters(
        reference.pipeline(pack), pack,
        ["IP-Adapter/models/ip-adapter_sd15.safetensors", "IP-Adapter/models/ip-adapter-plus_sd15.safetensors"],
    )  # fmt: skip
    pipe.set_ip_adapter_scale([0.7, 0.7])
    processed = IPAdapterMaskProcessor().preprocess([left, right], height=64, width=64)
    masks = [processed[i : i + 1].reshape(1, 1, 64, 64) for i in range(2)]
    expected = reference.run(
        pipe, ip_adapter_image=[red_circle, yellow_square], cross_attention_kwargs={"ip_adapter_masks": masks}
    )
    result = engine.generate(
        request(unit("Base", red_circle, 0.7, masks=[left]), unit("Plus", yellow_square, 0.7, masks=[right]))
    )
    assert max_diff(result.images[0], expected) <= 1
    unmasked = engine.generate(request(unit("Base", red_circle, 0.7), unit("Plus", yellow_square, 0.7)))
    assert max_diff(result.images[0], unmasked.images[0]) > 0


def test_mask_count_must_match_images(engine, red_circle):
    with pytest.raises(RequestError, match="2 masks for 1 images"):
        engine.generate(request(unit("Base", red_circle, masks=[half_mask("left"), half_mask("right")])))


# -------------------------------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    "model, adapter, file, layers, diffusers_scale",
    [
        (SDXL, "Base SDXL", SDXL_VARIANTS["Base SDXL"][0], "style", {"up": {"block_0": [0.0, 1.0, 0.0]}}),
        (SDXL, "Plus ViT-H SDXL", SDXL_VARIANTS["Plus ViT-H SDXL"][0], "style+composition",
         {"up": {"block_0": [0.0, 1.0, 0.0]}, "down": {"block_2": [0.0, 1.0]}}),
        ("tiny-sd15", "Base", "IP-Adapter/models/ip-adapter_sd15.safetensors", {"down": {"block_2": [0.25, 1.0]}},
         {"down": {"block_2": [0.25, 1.0]}}),
        ("tiny-sd15", "Plus", "IP-Adapter/models/ip-adapter-plus_sd15.safetensors", "style",
         {"down": {"block_0": 1.0, "block_1": 1.0}, "mid": 1.0, "up": {"block_2": 1.0, "block_3": 1.0}}),
    ],
)  # fmt: skip
def test_layer_weights_equal_diffusers_set_ip_adapter_scale(pack, engine, red_circle, model, adapter, file, layers,
                                                           diffusers_scale):  # fmt: skip
    encoder = reference.VIT_G if adapter == "Base SDXL" else reference.VIT_H
    pipe = reference.load_adapters(reference.pipeline(pack, model), pack, file, encoder)
    pipe.set_ip_adapter_scale(diffusers_scale)
    expected = reference.run(pipe, ip_adapter_image=red_circle)
    result = engine.generate(request(unit(adapter, red_circle, 1.0, layers=layers), model=model))
    assert max_diff(result.images[0], expected) <= 1
    everywhere = engine.generate(request(unit(adapter, red_circle, 1.0), model=model))
    assert max_diff(result.images[0], everywhere.images[0]) > 0


@pytest.mark.parametrize(
    "layers, message",
    [
        ({"down": {"block_9": 1.0}}, "down.block_9: no such down block"),
        ({"down": {"block_0": 1.0}}, "valid: block_1, block_2"),  # SDXL's down_blocks.0 has no attention
        ({"middle": 1.0}, "unknown level 'middle'"),
        ({"up": {"block_0": [1.0, 0.0]}}, "has 3 attention blocks, got 2 weights"),
        ({"up": {"block_0": "high"}}, "is not a number"),
        ("painterly", "unknown layers preset 'painterly'"),
    ],
)
def test_invalid_layers_are_errors_not_silent_zeros(engine, red_circle, layers, message):
    with pytest.raises(RequestError, match=message):
        engine.generate(request(unit("Base SDXL", red_circle, layers=layers), model=SDXL))


# ------------------------------------------------------------------------------------------- negative images


def test_negative_image_replaces_the_zero_negative(pack, engine, red_circle, yellow_square):
    """diffusers takes the negative branch from `ip_adapter_image_embeds`: [negative, positive] per adapter."""
    pipe = reference.load_adapters(reference.pipeline(pack), pack, "IP-Adapter/models/ip-adapter_sd15.safetensors", None)
    pipe.set_ip_adapter_scale(0.8)
    positive = reference.encode(pack, reference.VIT_H, red_circle)[None]
    negative = reference.encode(pack, reference.VIT_H, yellow_square)[None]
    expected = reference.run(pipe, ip_adapter_image_embeds=[torch.cat([negative, positive])])
    result = engine.generate(request(unit("Base", red_circle, 0.8, negative_images=[yellow_square])))
    assert max_diff(result.images[0], expected) <= 1
    noise = engine.generate(request(unit("Base", red_circle, 0.8, negative_images=["noise"])))
    zeros = engine.generate(request(unit("Base", red_circle, 0.8)))
    assert max_diff(noise.images[0], zeros.images[0]) > 0
    again = engine.generate(request(unit("Base", red_circle, 0.8, negative_images=["noise"])))
    assert max_diff(noise.images[0], again.images[0]) == 0


# ---------------------------------------------------------------------------------------------------- img2img


@pytest.mark.parametrize("model, adapter", [("tiny-sd15", "Plus"), (SDXL, "Base ViT-H SDXL")])
def test_img2img_with_a_unit_equals_diffusers(pack, engine, red_circle, yellow_square, model, adapter):
    file = {"Plus": "IP-Adapter/models/ip-adapter-plus_sd15.safetensors", **{k: v[0] for k, v in SDXL_VARIANTS.items()}}
    pipe = reference.load_adapters(reference.pipeline(pack, model, img2img=True), pack, file[adapter])
    pipe.set_ip_adapter_scale(0.6)
    init = yellow_square.resize((64, 64))
    expected = reference.run(pipe, ip_adapter_image=red_circle, image=init, strength=0.6, steps=5)
    result = engine.generate(
        request(unit(adapter, red_circle, 0.6), model=model, steps=5, init_images=[init], denoising_strength=0.6)
    )
    assert max_diff(result.images[0], expected) <= 1
    assert result.info["mode"] == "img2img"
    txt2img = engine.generate(request(unit(adapter, red_circle, 0.6), model=model, steps=5))
    assert txt2img.info["mode"] == "txt2img" and max_diff(txt2img.images[0], result.images[0]) > 0


# ------------------------------------------------------------------------------------------ saved embeddings


def test_saved_embeddings_give_the_same_pixels_without_an_encoder(pack, tmp_path, red_circle, yellow_square):
    from imprompt.models.probe import probe

    engine = Engine([pack, tmp_path])
    path = engine.save_embeddings({"adapter": "Plus Face", "images": [red_circle, yellow_square]}, tmp_path / "face.safetensors")
    spec = probe(path)
    assert (spec.kind, spec.output, spec.width, spec.images, spec.tokens) == ("ip-embeddings", "hidden_states", 64, 2, 257)
    assert spec.encoder == "IP-Adapter/models/image_encoder" and len(spec.image_hashes) == 2

    from_images = Engine(pack).generate(request({"adapter": "Plus Face", "images": [red_circle, yellow_square]}))
    fresh = Engine([pack, tmp_path], cache_budget=1)
    from_file = fresh.generate(request({"adapter": "Plus Face", "embeddings": "face"}))
    assert max_diff(from_file.images[0], from_images.images[0]) == 0
    info = from_file.info["ip_adapters"][0]
    assert info["encoder_source"] == "saved embeddings" and info["embeddings"] == ["saved", "saved"]
    assert fresh.cache_info()["encoders"]["entries"] == []  # no encoder was loaded at all
    # any adapter consuming the same output and width may use them
    fresh.generate(request({"adapter": "Plus", "embeddings": str(path)}))


def test_saved_embeddings_of_another_width_are_refused(pack, tmp_path, red_circle):
    engine = Engine([pack, tmp_path])
    engine.save_embeddings({"adapter": "Base", "images": [red_circle]}, tmp_path / "vit-h.safetensors")
    for adapter, needs in (("Base ViT-G", "image_embeds[1280]"), ("Plus", "hidden_states[64]")):
        with pytest.raises(IncompatibleError) as caught:
            engine.generate(request({"adapter": adapter, "embeddings": "vit-h"}))
        assert "image_embeds[1024]" in str(caught.value) and needs in str(caught.value)


# ------------------------------------------------------------------------------------------- negative prompts


def test_an_empty_sdxl_negative_prompt_is_zeros_as_in_a1111(pack, engine):
    """A1111 (sd_models_xl.get_learned_conditioning: force_zero_negative_prompt) and diffusers' SDXL
    (force_zeros_for_empty_prompt with negative_prompt=None) use zero embeddings for an empty negative prompt;
    imprompt does too. Encoding the empty string instead gives another picture."""
    pipe = reference.pipeline(pack, SDXL)
    zeros = reference.run(pipe, negative_prompt=None)
    encoded = reference.run(pipe, negative_prompt="")
    result = engine.generate(request(model=SDXL, negative_prompt=""))
    assert max_diff(result.images[0], zeros) <= 1
    assert max_diff(encoded, zeros) > 10


def test_an_empty_sd15_negative_prompt_is_the_encoded_empty_string(pack, engine):
    """SD 1.5 has no zero option: A1111 and diffusers encode "" for it."""
    expected = reference.run(reference.pipeline(pack), negative_prompt="")
    assert max_diff(engine.generate(request(negative_prompt="")).images[0], expected) <= 1
