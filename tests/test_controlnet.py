"""The A1111 ControlNet extension's IP-Adapter units, from webuiapi (its own ControlNetUnit) and raw payloads, and
the A1111 fields imprompt honours, ignores, refuses or reports: nothing a client sends is dropped silently. (Its
ControlNet units: test_controlnet_server.py.)"""

from __future__ import annotations

import pytest
import webuiapi
from conftest import max_diff
from PIL import Image
from server_fixtures import b64, new_engine, post_txt2img, running_server

from imprompt.models.store import legacy_hash


@pytest.fixture(scope="module")
def server(pack):
    with running_server(new_engine(pack)) as url:
        yield url


def txt(**fields) -> dict:
    return {"prompt": "a cat", "seed": 1, "steps": 4, "width": 64, "height": 64, "cfg_scale": 7.0,
            "sampler_name": "Euler a", "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, **fields}  # fmt: skip


def cn_unit(image: str, module="ip-adapter_clip_sd15", model="ip-adapter_sd15", **fields) -> dict:
    return {"enabled": True, "module": module, "model": model, "image": image, "weight": 0.6, "guidance_start": 0.0,
            "guidance_end": 1.0, "control_mode": "Balanced", "resize_mode": "Crop and Resize",
            "pixel_perfect": False, "processor_res": 512, "threshold_a": 64, "threshold_b": 64, **fields}  # fmt: skip


post = post_txt2img


def sdnext(url, *units, **fields):
    return post(url, txt(ip_adapter=list(units), **fields))


def test_webuiapi_controlnet_units_equal_sdnext_units(server, pack, red_circle, yellow_square):
    """webuiapi's own ControlNetUnit, model named as the extension names it (`stem [hash]`), two units with both
    encoders: the same pixels as the same request written as SD.Next units."""
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)
    base_vit_g = pack / "IP-Adapter" / "models" / "ip-adapter_sd15_vit-G.safetensors"
    units = [
        webuiapi.ControlNetUnit(image=red_circle, module="ip-adapter_clip_sd15", model="ip-adapter_sd15", weight=0.6),
        webuiapi.ControlNetUnit(image=yellow_square, module="ip-adapter_clip_sdxl", weight=0.4, guidance_end=0.5,
                                model=f"ip-adapter_sd15_vit-G [{legacy_hash(base_vit_g)}]"),
    ]  # fmt: skip
    result = api.txt2img(prompt="a cat", seed=1, width=64, height=64, cfg_scale=7.0, controlnet_units=units,
                         alwayson_scripts={})  # webuiapi adds the units to its shared default dict otherwise
    expected, _ = sdnext(server, {"adapter": "Base", "images": [b64(red_circle)], "scale": 0.6},
                         {"adapter": "Base ViT-G", "images": [b64(yellow_square)], "scale": 0.4, "end": 0.5})  # fmt: skip
    assert max_diff(result.images[0].convert("RGB"), expected) == 0
    used = [u["encoder"] for u in result.info["imprompt"][0]["ip_adapters"]]
    assert used == ["IP-Adapter/models/image_encoder", "IP-Adapter/sdxl_models/image_encoder"]
    assert result.info["warnings"] == []


def test_a_module_for_another_encoder_is_corrected_and_said(server, red_circle):
    """A1111's classic failure: ip-adapter_clip_sd15 (ViT-H) with ip-adapter_sd15_vit-G ends in `mat1 and mat2
    shapes cannot be multiplied` there. Here the weights choose the encoder, and info says what happened."""
    image, info = post(server, txt(alwayson_scripts={"ControlNet": {"args": [cn_unit(b64(red_circle), model="ip-adapter_sd15_vit-G")]}}))
    [warning] = info["warnings"]
    assert "module ip-adapter_clip_sd15 runs CLIP ViT-H-14" in warning and "image_embeds[1280]" in warning
    assert "IP-Adapter/sdxl_models/image_encoder" in warning
    expected, _ = sdnext(server, {"adapter": "Base ViT-G", "images": [b64(red_circle)], "scale": 0.6})
    assert max_diff(image, expected) == 0


@pytest.mark.parametrize("module", ["ip-adapter_clip_h", "ip-adapter-auto", "none", "CLIP-ViT-H (IPAdapter)"])
def test_module_labels_and_image_forms(server, red_circle, module):
    """Labels (the extension's aliases, Forge's names), an IP-Adapter model with module none, and the older
    `input_image` field: all the same unit."""
    unit = cn_unit(None, module=module)
    unit["input_image"] = b64(red_circle)
    image, info = post(server, txt(alwayson_scripts={"controlnet": {"args": [unit]}}))
    expected, _ = sdnext(server, {"adapter": "Base", "images": [b64(red_circle)], "scale": 0.6})
    assert max_diff(image, expected) == 0 and info["warnings"] == []


def test_several_images_and_a_region(server, red_circle, yellow_square):
    """A list of {"image", "mask"} inputs is several images for one unit; `effective_region_mask` is where the
    unit acts (SD.Next's masks). An input image's own mask is not used by IP-Adapter preprocessors: said."""
    left = Image.new("RGB", (64, 64), "black")
    left.paste((255, 255, 255), (0, 0, 32, 64))
    unit = cn_unit([{"image": b64(red_circle), "mask": b64(left)}, {"image": b64(yellow_square)}], model="ip-adapter-plus_sd15",
                   effective_region_mask=b64(left))  # fmt: skip
    image, info = post(server, txt(alwayson_scripts={"controlnet": {"args": [unit]}}))
    expected, _ = sdnext(server, {"adapter": "Plus", "images": [b64(red_circle), b64(yellow_square)], "scale": 0.6,
                                  "masks": [b64(left), b64(left)]})  # fmt: skip
    assert max_diff(image, expected) == 0
    unused, not_shown = info["warnings"]  # the mask is also too small to be drawn on the unit's input map
    assert "the input image's mask is not used" in unused and "64x64 is not the image's size (96x96)" in not_shown


def test_disabled_units_are_skipped_and_said(server, red_circle):
    plain, _ = sdnext(server)
    for unit, why in ((cn_unit(b64(red_circle), enabled=False), "enabled is false"),
                      ({k: v for k, v in cn_unit(b64(red_circle)).items() if k != "enabled"}, "enabled is not given")):  # fmt: skip
        image, info = post(server, txt(alwayson_scripts={"controlnet": {"args": [unit]}}))
        assert max_diff(image, plain) == 0
        [warning] = info["warnings"]
        assert warning.startswith("alwayson_scripts.controlnet.args.0: unit skipped") and why in warning


CONTROLNET_REFUSALS = [
    ("a ControlNet the folders lack", dict(module="canny", model="control_v11p_sd15_canny [d14c016b]"), 404, "alwayson_scripts.controlnet.args.0.model: ControlNet 'control_v11p_sd15_canny [d14c016b]' not found"),
    ("an IP-Adapter module without a model", dict(model="None"), 422, "needs an IP-Adapter model"),
    ("an unknown adapter", dict(model="ip-adapter_turbo [12345678]"), 404, "ip-adapter_turbo"),
    ("per-block weights", dict(advanced_weighting=[1.0] * 16), 422, "advanced_weighting: not supported"),
    ("pickled embeddings", dict(ipadapter_input=["gASV"]), 422, "ipadapter_input: not supported"),
    ("no image", dict(input_image=""), 422, "needs an image"),
]  # fmt: skip


@pytest.mark.parametrize("name, fields, status, fragment", CONTROLNET_REFUSALS, ids=[c[0] for c in CONTROLNET_REFUSALS])
def test_what_a_controlnet_unit_cannot_be(server, red_circle, name, fields, status, fragment):
    image = "" if "input_image" in fields else b64(red_circle)  # webuiapi sends image "" when it has none
    body = post(server, txt(alwayson_scripts={"controlnet": {"args": [cn_unit(image, **fields)]}}), status)
    assert fragment in body["detail"], body


def test_the_extensions_helper_endpoints(server, pack):
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    assert api.controlnet_version() == 3
    names = api.controlnet_model_list()
    base = pack / "IP-Adapter" / "models" / "ip-adapter_sd15.safetensors"
    assert f"ip-adapter_sd15 [{legacy_hash(base)}]" in names and len(names) == 15  # SD 1.5, SDXL, SD 3.5, FLUX adapters
    modules = api.controlnet_module_list()
    assert {"ip-adapter_clip_sd15", "ip-adapter_clip_sdxl", "ip-adapter-auto"} <= set(modules)


# --------------------------------------------------------------------------------------------- A1111 fields


FIELD_REFUSALS = [
    ("enable_hr", True, "hires fix"), ("restore_faces", True, "face restoration"), ("tiling", True, "tiling"),
    ("subseed_strength", 0.5, "variation seeds"), ("styles", ["cinematic"], "A1111 styles"),
    ("script_name", "x/y/z plot", "A1111 scripts"), ("refiner_checkpoint", "sdxl-refiner", "a refiner"),
    ("override_settings", {"sd_model_checkpoint": "tiny-sd15", "eta_noise_seed_delta": 31337}, "eta_noise_seed_delta"),
    ("alwayson_scripts", {"ADetailer": {"args": [True, {"ad_model": "face_yolov8n.pt"}]}}, "alwayson_scripts.ADetailer"),
]  # fmt: skip


@pytest.mark.parametrize("field, value, fragment", FIELD_REFUSALS, ids=[f"{f[0]}={f[1]}" for f in FIELD_REFUSALS])
def test_fields_that_would_change_the_picture_are_refused_naming_them(server, field, value, fragment):
    body = post(server, txt(**{field: value}), 422)
    assert fragment in body["detail"] and body["error"] == "RequestError"


def test_fields_without_effect_are_accepted_and_others_reported(server):
    plain, info = sdnext(server)
    assert info["warnings"] == []
    quiet = dict(send_images=True, save_images=False, do_not_save_samples=True, styles=[], restore_faces=False,
                 enable_hr=False, hr_scale=2, denoising_strength=0.7, subseed=-1, subseed_strength=0, eta=1.0,
                 s_churn=0, s_tmin=0, s_tmax=0, s_noise=1, alwayson_scripts={"ADetailer": {"args": [False]}})  # fmt: skip
    image, info = post(server, txt(**quiet))
    assert max_diff(image, plain) == 0 and info["warnings"] == []
    image, info = post(server, txt(eta=0.3, s_churn=0.5, magic_field=1,
                                   override_settings={"sd_model_checkpoint": "tiny-sd15", "samples_format": "jpg"}))  # fmt: skip
    reported = " | ".join(info["warnings"])
    for fragment in ("eta=0.3 is not applied: Euler a uses eta 1.0", "s_churn=0.5", "magic_field: not an A1111 field",
                     "override_settings.samples_format"):  # fmt: skip
        assert fragment in reported, reported
