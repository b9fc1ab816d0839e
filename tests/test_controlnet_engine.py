"""ControlNet units through the engine, held to diffusers' own ControlNet pipelines (max difference 1/255), and the
A1111 ControlNet extension's weights, windows and control modes held to references written here from its rules."""

from __future__ import annotations

import pytest
import torch
from conftest import locked, max_diff, request, shared_folder, unit
from diffusers import (
    ControlNetModel,
    ControlNetUnionModel,
    FluxControlNetModel,
    FluxControlNetPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
)
from diffusers.models.controlnets import FluxMultiControlNetModel, MultiControlNetModel, MultiControlNetUnionModel
from diffusers_reference import load_adapters, run
from PIL import Image

from imprompt import Engine
from imprompt.controlnets.guidance import reported_fraction
from imprompt.errors import ImpromptError, IncompatibleError, LimitError, UnsupportedError
from imprompt.models.store import legacy_hash

SOFT = 0.825  # the extension's soft-injection base (its scripts/hook.py), written here from its rules


@pytest.fixture(scope="module")
def cn_engine(pack, nets) -> Engine:
    return Engine([pack, nets["sd15"].parent.parent])


@pytest.fixture(scope="module")
def pose(pack) -> Image.Image:
    """A finished control image (module none), as API clients send a pose or depth map."""
    return Image.open(pack / "images" / "white-triangle.png").convert("RGB").resize((64, 64))


def cn(model, image, **fields) -> dict:
    return {"model": str(model), "image": image, **fields}


def reference_pipe(cls, pack, model, controlnet, **extra):
    pipe = cls.from_pretrained(pack / "diffusers" / model, controlnet=controlnet, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_pipe(pack, controlnet):
    return reference_pipe(StableDiffusionControlNetPipeline, pack, "tiny-sd15", controlnet, safety_checker=None,
                          requires_safety_checker=False)  # fmt: skip


def test_one_controlnet_equals_diffusers_and_changes_the_picture(cn_engine, pack, nets, pose):
    got = cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose)])).images[0]
    expected = run(sd15_pipe(pack, ControlNetModel.from_pretrained(nets["sd15"])), image=pose)
    plain = cn_engine.generate(request()).images[0]
    assert max_diff(got, expected) <= 1
    assert max_diff(got, plain) > 8  # the control acts
    assert max_diff(cn_engine.generate(request()).images[0], plain) == 0  # and leaves nothing behind


def test_an_ldm_single_file_with_an_image_prompt_equals_diffusers(cn_engine, pack, nets, pose, red_circle):
    got = cn_engine.generate(request(unit("Base", red_circle, 0.6), controlnets=[cn(nets["sd15-ldm"], pose, weight=0.8)]))
    pipe = load_adapters(sd15_pipe(pack, ControlNetModel.from_pretrained(nets["sd15"])), pack,
                         "IP-Adapter/models/ip-adapter_sd15.safetensors", "IP-Adapter/models/image_encoder")  # fmt: skip
    pipe.set_ip_adapter_scale(0.6)
    expected = run(pipe, image=pose, ip_adapter_image=red_circle, controlnet_conditioning_scale=0.8)
    assert max_diff(got.images[0], expected) <= 1
    # named as /controlnet/model_list lists it (A1111's legacy hash), so a client can send it back
    assert got.info["controlnets"][0]["model"] == cn_engine.store.controlnet_title(cn_engine.store.controlnet(str(nets["sd15-ldm"])))
    assert got.info["controlnets"][0]["model"] == f"control_tiny_sd15_canny [{legacy_hash(nets['sd15-ldm'])}]"
    assert "ControlNet 0" in got.parameters


def extension_window(start: float, end: float, steps: int) -> tuple[float, float]:
    """The extension's window (a unit acts at step j when start <= max(j - 1, 0) / steps <= end: A1111 reports the
    previous step's number while step j runs) as diffusers' control_guidance_start/end (which keeps step i when
    i / n >= start' and (i + 1) / n <= end')."""
    active = [j for j in range(steps) if start <= max(j - 1, 0) / steps <= end]
    return active[0] / steps, (active[-1] + 1) / steps


def test_two_controlnets_with_weights_and_windows_equal_diffusers(cn_engine, pack, nets, pose, yellow_square):
    square = yellow_square.resize((64, 64))
    got = cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose, weight=0.7, start=0.0, end=0.5),
                                                  cn(nets["sd15-ldm"], square, weight=1.3, start=0.5, end=1.0)],
                                     steps=6))  # fmt: skip
    net = ControlNetModel.from_pretrained(nets["sd15"])
    windows = [extension_window(0.0, 0.5, 6), extension_window(0.5, 1.0, 6)]
    expected = run(sd15_pipe(pack, MultiControlNetModel([net, net])), steps=6, image=[pose, square],
                   controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[w[0] for w in windows],
                   control_guidance_end=[w[1] for w in windows])  # fmt: skip
    assert windows == [(0.0, 5 / 6), (4 / 6, 1.0)]  # the two overlap at step 4: both units act there
    assert max_diff(got.images[0], expected) <= 1


def mode_reference(net, weight: float, mode: str):
    """The extension's control modes, written from its rules: residual k of n scaled by weight * 0.825 ** (12 - k)
    (SDXL: the first 10 of the 13) unless Balanced; "ControlNet is more important" also zeroes the unconditional
    row (diffusers' batch: [unconditional, conditional])."""
    forward = net.forward

    def patched(*args, **kwargs):
        kwargs["conditioning_scale"] = 1.0
        down, mid = forward(*args, **kwargs)
        residuals = [*down, mid]
        scales = [weight * SOFT ** (12 - k) for k in range(13)][: len(residuals)]
        residuals = [r * s for r, s in zip(residuals, scales)]
        if mode == "ControlNet is more important":
            residuals = [torch.cat([torch.zeros_like(r[:1]), r[1:]]) for r in residuals]
        return residuals[:-1], residuals[-1]

    net.forward = patched
    return net


@pytest.mark.parametrize("mode", ["My prompt is more important", "ControlNet is more important"])
def test_control_modes_follow_the_extension(cn_engine, pack, nets, pose, mode):
    got = cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose, weight=1.5, control_mode=mode)]))
    net = mode_reference(ControlNetModel.from_pretrained(nets["sd15"]), 1.5, mode)
    expected = run(sd15_pipe(pack, net), image=pose)
    balanced = cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose, weight=1.5)]))
    assert max_diff(got.images[0], expected) <= 1
    assert max_diff(got.images[0], balanced.images[0]) > 0


def test_sdxl_and_its_union_model_equal_diffusers(cn_engine, pack, nets, pose):
    xl = {"model": "tiny-sdxl"}
    got = cn_engine.generate(request(controlnets=[cn(nets["sdxl"], pose, weight=0.9)], **xl)).images[0]
    pipe = reference_pipe(StableDiffusionXLControlNetPipeline, pack, "tiny-sdxl", ControlNetModel.from_pretrained(nets["sdxl"]))
    assert max_diff(got, run(pipe, image=pose, controlnet_conditioning_scale=0.9)) <= 1
    got = cn_engine.generate(request(controlnets=[cn(nets["sdxl-union"], pose, module="none", union_type="depth")], **xl))
    union = ControlNetUnionModel.from_pretrained(nets["sdxl-union"])
    pipe = reference_pipe(StableDiffusionXLControlNetUnionPipeline, pack, "tiny-sdxl", union)
    assert max_diff(got.images[0], run(pipe, control_image=[pose], control_mode=[1])) <= 1
    assert got.info["controlnets"][0]["union_type"] == 1


def test_sd35_and_flux_controlnets_equal_diffusers(cn_engine, pack, nets, pose):
    got = cn_engine.generate(request(controlnets=[cn(nets["sd35"], pose, weight=0.8)], model="tiny-sd35", cfg_scale=5.0))
    pipe = reference_pipe(StableDiffusion3ControlNetPipeline, pack, "tiny-sd35", SD3ControlNetModel.from_pretrained(nets["sd35"]),
                          text_encoder_3=None, tokenizer_3=None, image_encoder=None, feature_extractor=None)  # fmt: skip
    torch.manual_seed(1)  # diffusers' SD 3 ControlNet pipeline samples the control latents from the global generator
    expected = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, width=64, height=64, control_image=pose,
                    controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    assert max_diff(got.images[0], expected) <= 1
    torch.manual_seed(7)  # imprompt seeds it by the request, whatever the process's generator holds
    assert max_diff(cn_engine.generate(request(controlnets=[cn(nets["sd35"], pose, weight=0.8)], model="tiny-sd35",
                                               cfg_scale=5.0)).images[0], got.images[0]) == 0  # fmt: skip
    got = cn_engine.generate(request(controlnets=[cn(nets["flux"], pose, weight=0.8)], model="tiny-flux", cfg_scale=3.5))
    pipe = reference_pipe(FluxControlNetPipeline, pack, "tiny-flux", FluxControlNetModel.from_pretrained(nets["flux"]))
    expected = pipe("a cat", num_inference_steps=4, guidance_scale=3.5, width=64, height=64, control_image=pose,
                    controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    assert max_diff(got.images[0], expected) <= 1


def test_wrong_units_are_refused_naming_the_unit_and_the_next_request_is_unaffected(cn_engine, nets, pose):
    plain = cn_engine.generate(request()).images[0]
    with pytest.raises(IncompatibleError, match=r"controlnets\.0: .*SDXL.*2048.*SD 1\.5.*768"):
        cn_engine.generate(request(controlnets=[cn(nets["sdxl"], pose)]))
    with pytest.raises(UnsupportedError, match=r"controlnets\.0: .*Control-LoRA"):
        cn_engine.generate(request(controlnets=[cn(nets["control-lora"], pose)], model="tiny-sdxl"))
    with pytest.raises(ImpromptError, match=r"controlnets\.1: .*no-such-net"):
        cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose), cn("no-such-net", pose)]))
    with pytest.raises(ImpromptError, match=r"controlnets\.0: .*no-such-module"):
        cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose, module="no-such-module")]))
    with pytest.raises(ImpromptError, match=r"controlnets\.0\.image"):
        cn_engine.generate(request(controlnets=[cn(nets["sd15"], "bm90IGFuIGltYWdl")]))
    assert max_diff(cn_engine.generate(request()).images[0], plain) == 0


def test_a_controlnet_reads_each_rows_own_text_when_the_prompt_is_composable(cn_engine, nets, pose):
    """Two equal parts at half weight combine to the one prompt's prediction: with a ControlNet, only if it ran on each
    row's own text (the pipeline's own negative is a stand-in of zeros there), as the extension's hook runs it."""
    control = [cn(nets["sd15"], pose, weight=1.2)]
    one = cn_engine.generate(request(controlnets=control, negative_prompt="blurry")).images[0]
    halves = cn_engine.generate(request(controlnets=control, negative_prompt="blurry",
                                        prompt="a cat :0.5 AND a cat :0.5")).images[0]  # fmt: skip
    assert max_diff(one, halves) <= 1
    scheduled = cn_engine.generate(request(controlnets=control, negative_prompt="blurry", prompt="a [cat:dog:0.5]"))
    assert max_diff(scheduled.images[0], one) > 0


def test_a_half_precision_model_stays_in_its_precision_after_a_controlnet_request(pack, nets, pose):
    """diffusers' from_pipe casts the modules it is given to float32 unless told the dtype: the resident model's
    own modules would change for every later request."""
    engine = Engine([pack, nets["sd15"].parent.parent], dtype="bfloat16")
    fresh = Engine([pack, nets["sd15"].parent.parent], dtype="bfloat16").generate(request()).images[0]
    engine.generate(request(controlnets=[cn(nets["sd15"], pose)]))
    unet = engine.state.pipelines.current.pipeline.unet
    assert unet.dtype == torch.bfloat16
    assert max_diff(engine.generate(request()).images[0], fresh) == 0


def test_union_models_two_units_and_composable_prompts(cn_engine, pack, nets, pose, yellow_square):
    xl, square = {"model": "tiny-sdxl"}, yellow_square.resize((64, 64))
    union = ControlNetUnionModel.from_pretrained(nets["sdxl-union"])
    got = cn_engine.generate(request(controlnets=[cn(nets["sdxl-union"], pose, union_type="depth"),
                                                  cn(nets["sdxl-union"], square, union_type=6, weight=0.5)], **xl))  # fmt: skip
    pipe = reference_pipe(StableDiffusionXLControlNetUnionPipeline, pack, "tiny-sdxl",
                          MultiControlNetUnionModel([union, union]))  # fmt: skip
    expected = run(pipe, control_image=[pose, square], control_mode=[1, 6], controlnet_conditioning_scale=[1.0, 0.5])
    assert max_diff(got.images[0], expected) <= 1
    control = [cn(nets["sdxl-union"], pose, union_type="depth")]
    one = cn_engine.generate(request(controlnets=control, negative_prompt="blurry", **xl)).images[0]
    halves = cn_engine.generate(request(controlnets=control, negative_prompt="blurry", prompt="a cat :0.5 AND a cat :0.5",
                                        **xl)).images[0]  # fmt: skip
    assert max_diff(one, halves) <= 1


def test_a_flux_union_beside_a_plain_flux_controlnet_equals_diffusers(cn_engine, pack, nets, pose, yellow_square):
    square = yellow_square.resize((64, 64))
    got = cn_engine.generate(request(controlnets=[cn(nets["flux-union"], pose, union_type="depth"),
                                                  cn(nets["flux"], square, weight=0.6)], model="tiny-flux", cfg_scale=3.5))  # fmt: skip
    nets_ = FluxMultiControlNetModel([FluxControlNetModel.from_pretrained(nets["flux-union"]),
                                      FluxControlNetModel.from_pretrained(nets["flux"])])  # fmt: skip
    pipe = reference_pipe(FluxControlNetPipeline, pack, "tiny-flux", nets_)
    expected = pipe("a cat", num_inference_steps=4, guidance_scale=3.5, width=64, height=64, control_image=[pose, square],
                    control_mode=[2, None], controlnet_conditioning_scale=[1.0, 0.6],
                    generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    assert max_diff(got.images[0], expected) <= 1


def test_image_to_image_with_a_controlnet_keeps_the_requests_vae(pack, nets, pose, red_circle, tmp_path_factory):
    """The ControlNet pipeline is built over the call's pipeline as the VAE kind left it (the image-to-image twin,
    carrying the request's VAE)."""
    from tools.extra_models import write_extra_models

    extra = shared_folder(tmp_path_factory, "extra-vae")
    with locked(extra):
        if not (extra / "VAE" / "soft-vae.safetensors").is_file():
            write_extra_models(extra, pack)
    engine = Engine([pack, nets["sd15"].parent.parent, extra])
    start = {"init_images": [red_circle], "denoising_strength": 0.6, "controlnets": [cn(nets["sd15"], pose)]}
    own = engine.generate(request(**start)).images[0]
    soft = engine.generate(request(**start, vae="soft-vae.safetensors"))
    assert soft.info["vae"]["name"] == "soft-vae.safetensors"
    assert max_diff(own, soft.images[0]) > 0


def test_a_picture_of_an_extreme_shape_is_refused_before_any_work(cn_engine, nets):
    thin = Image.new("RGB", (4000, 2), "white")
    with pytest.raises(LimitError, match=r"controlnets\.0: a 4000x2 picture at the preprocessor's resolution 512"):
        cn_engine.generate(request(controlnets=[cn(nets["sd15"], thin, module="canny")]))
    thinner = Image.new("RGB", (16000, 2), "white")  # scaled by 32 to cover 64x64: 512000x64
    with pytest.raises(LimitError, match=r"controlnets\.0: its control image \(16000x2\) scaled to cover 64x64"):
        cn_engine.generate(request(controlnets=[cn(nets["sd15"], thinner)]))


def test_the_window_counts_the_steps_as_a1111_reports_them_to_the_extension():
    """k-diffusion sets the step number after each step; a second-order sampler calls the model twice per step and
    its callback runs between the two calls. Written out for 10 steps, end 0.5 (the extension's `frac <= end`)."""
    euler = [call for call in range(10) if reported_fraction(call, 10, 10, second_order=False) <= 0.5]
    assert euler == [0, 1, 2, 3, 4, 5, 6]  # call 6 is step 6, which sees step 5: 0.5
    seen = [0, 0, 0] + [i for i in range(1, 9) for _ in (0, 1)]  # call 0: step 0; calls 2i-1 and 2i see i - 1
    assert [max((c - 1) // 2, 0) for c in range(19)] == seen[:19]
    heun = [call for call in range(19) if reported_fraction(call, 19, 10, second_order=True) <= 0.5]
    assert heun == list(range(13))
    # PNDM's 2 steps are 3 calls (2 * 2 - 1, as a second-order sampler's), each seeing the step before it
    assert [reported_fraction(call, 3, 2, second_order=False) for call in range(3)] == [0.0, 0.0, 1 / 3]


def test_a_pixel_perfect_resolution_is_used_as_computed(nets):
    from imprompt import preprocess

    pre = preprocess.find("canny")
    picture = Image.new("RGB", (100, 1000), "white")
    resolution = preprocess.resize.pixel_perfect_resolution(picture, 64, 64, "Resize and Fill")
    assert resolution == 6
    made = preprocess.detect(pre, picture, resolution, exact_resolution=True)
    assert min(made.size) == 6  # not the slider's default (512): the extension takes the computed value as it is


def test_each_family_with_a_controlnet_and_an_image_prompt_equals_diffusers(cn_engine, pack, nets, pose, red_circle):
    """SDXL (plain and Union), SD 3.5 and FLUX: a ControlNet unit beside an IP-Adapter unit, against diffusers' own
    ControlNet pipeline with `load_ip_adapter`."""
    from diffusers_reference import VIT_G
    from test_transformers import FLUX_V1, SD35_ADAPTER, SIGLIP_FILE, VIT_L_FILE
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from imprompt.loading.encoders import load_encoder
    from imprompt.models.probe import probe

    xl_unit = unit("Base SDXL", red_circle, 0.6)
    got = cn_engine.generate(request(xl_unit, controlnets=[cn(nets["sdxl"], pose, weight=0.9)], model="tiny-sdxl"))
    pipe = reference_pipe(StableDiffusionXLControlNetPipeline, pack, "tiny-sdxl", ControlNetModel.from_pretrained(nets["sdxl"]))
    load_adapters(pipe, pack, "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors", VIT_G).set_ip_adapter_scale(0.6)
    expected = run(pipe, image=pose, controlnet_conditioning_scale=0.9, ip_adapter_image=red_circle)
    assert max_diff(got.images[0], expected) <= 1
    got = cn_engine.generate(request(xl_unit, controlnets=[cn(nets["sdxl-union"], pose, union_type=1)], model="tiny-sdxl"))
    pipe = reference_pipe(StableDiffusionXLControlNetUnionPipeline, pack, "tiny-sdxl",
                          ControlNetUnionModel.from_pretrained(nets["sdxl-union"]))  # fmt: skip
    load_adapters(pipe, pack, "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors", VIT_G).set_ip_adapter_scale(0.6)
    assert max_diff(got.images[0], run(pipe, control_image=[pose], control_mode=[1], ip_adapter_image=red_circle)) <= 1

    got = cn_engine.generate(request(unit("SD3.5 Large", red_circle, 0.6), controlnets=[cn(nets["sd35"], pose, weight=0.8)],
                                     model="tiny-sd35", cfg_scale=5.0))  # fmt: skip
    spec = probe(pack / SIGLIP_FILE)
    pipe = reference_pipe(StableDiffusion3ControlNetPipeline, pack, "tiny-sd35", SD3ControlNetModel.from_pretrained(nets["sd35"]),
                          text_encoder_3=None, tokenizer_3=None, image_encoder=load_encoder(spec, torch.device("cpu"), torch.float32),
                          feature_extractor=SiglipImageProcessor(size={"height": spec.image_size, "width": spec.image_size}))  # fmt: skip
    folder, name = SD35_ADAPTER.rsplit("/", 1)
    pipe.load_ip_adapter(str(pack / folder), weight_name=name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.6)
    torch.manual_seed(1)
    expected = pipe("a cat", num_inference_steps=4, guidance_scale=5.0, width=64, height=64, control_image=pose,
                    controlnet_conditioning_scale=0.8, ip_adapter_image=red_circle,
                    generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    assert max_diff(got.images[0], expected) <= 1

    got = cn_engine.generate(request(unit("FLUX XLabs", red_circle, 0.7), controlnets=[cn(nets["flux"], pose, weight=0.8)],
                                     model="tiny-flux", cfg_scale=3.5))  # fmt: skip
    spec = probe(pack / VIT_L_FILE)
    pipe = reference_pipe(FluxControlNetPipeline, pack, "tiny-flux", FluxControlNetModel.from_pretrained(nets["flux"]),
                          image_encoder=load_encoder(spec, torch.device("cpu"), torch.float32),
                          feature_extractor=CLIPImageProcessor(size=224, crop_size=224))  # fmt: skip
    pipe.load_ip_adapter(str(pack), weight_name=[FLUX_V1], subfolder=[""], image_encoder_pretrained_model_name_or_path=None)
    pipe.set_ip_adapter_scale(0.7)
    expected = pipe("a cat", num_inference_steps=4, guidance_scale=3.5, width=64, height=64, control_image=pose,
                    controlnet_conditioning_scale=0.8, ip_adapter_image=red_circle,
                    generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip
    assert max_diff(got.images[0], expected) <= 1


def test_a_damaged_controlnet_file_is_a_typed_error_naming_the_unit(pack, nets, pose, tmp_path):
    good = nets["sd15-ldm"].read_bytes()
    (tmp_path / "ControlNet").mkdir()
    (tmp_path / "ControlNet" / "control_damaged.safetensors").write_bytes(good[: len(good) // 2])
    engine = Engine([pack, tmp_path])
    with pytest.raises(ImpromptError, match=r"controlnets\.0: .*control_damaged"):
        engine.generate(request(controlnets=[cn("control_damaged", pose)]))
    assert engine.generate(request()).images  # and the engine serves the next request


def test_a_pth_pickle_as_a1111_users_have_them_runs_as_its_safetensors(pack, nets, pose, tmp_path):
    """lllyasviel's ControlNet 1.1 files are `.pth` pickles of the original names (read with weights_only)."""
    from safetensors.torch import load_file

    (tmp_path / "ControlNet").mkdir()
    torch.save(load_file(nets["sd15-ldm"]), tmp_path / "ControlNet" / "control_v11p_sd15_tiny.pth")
    engine = Engine([pack, tmp_path, nets["sd15"].parent.parent])
    from_pth = engine.generate(request(controlnets=[cn("control_v11p_sd15_tiny", pose)])).images[0]
    from_file = engine.generate(request(controlnets=[cn(nets["sd15-ldm"], pose)])).images[0]
    assert max_diff(from_pth, from_file) == 0


def test_advanced_weighting_replaces_the_weight_and_the_modes_scales_as_the_extension(cn_engine, pack, nets, pose):
    scales = [0.2 + 0.05 * k for k in range(13)]
    got = cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose, weight=1.7, advanced_weighting=scales,
                                                     control_mode="ControlNet is more important")]))  # fmt: skip
    net = ControlNetModel.from_pretrained(nets["sd15"])
    forward = net.forward

    def patched(*args, **kwargs):  # the extension: its scales, no weight, and still the conditional row only
        kwargs["conditioning_scale"] = 1.0
        down, mid = forward(*args, **kwargs)
        residuals = [r * s for r, s in zip([*down, mid], scales)]
        residuals = [torch.cat([torch.zeros_like(r[:1]), r[1:]]) for r in residuals]
        return residuals[:-1], residuals[-1]

    net.forward = patched
    assert max_diff(got.images[0], run(sd15_pipe(pack, net), image=pose)) <= 1
    with pytest.raises(ImpromptError, match=r"controlnets\.0\.advanced_weighting: 12 scales.*13"):
        cn_engine.generate(request(controlnets=[cn(nets["sd15"], pose, advanced_weighting=scales[:12])]))
