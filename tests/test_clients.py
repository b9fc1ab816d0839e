"""Payloads as SD.Next, A1111 and the ControlNet extension's clients send them (fields left out where they leave
them out, null where their models allow null), and the answers those clients expect, through real HTTP."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import webuiapi
from conftest import max_diff, request, unit
from PIL import Image
from server_fixtures import b64, client, decode, new_engine, post_txt2img, running_server

from imprompt import Engine
from imprompt.util.samplers import SAMPLERS


@pytest.fixture(scope="module")
def server(pack):
    with running_server(new_engine(pack)) as url:
        yield url


def sdnext(*units, **fields) -> dict:
    """An SD.Next txt2img payload with only the fields a client sets (64 px, 4 steps, tiny-sd15)."""
    return {"prompt": "a cat", "seed": 1, "steps": 4, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, "ip_adapter": list(units), **fields}  # fmt: skip


# ----------------------------------------------------------------------------------- SD.Next's payload model


def test_an_sdnext_unit_gets_sdnext_defaults(server, reference, red_circle):
    """SD.Next's ItemIPAdapter: adapter "Base", scale 0.5, start 0, end 1, no crop, masks [] (none)."""
    image, info = post_txt2img(server, sdnext({"images": [b64(red_circle)]}))
    [used] = info["ip_adapters"]
    assert used["adapter"] == "Base" and used["scale"] == 0.5
    assert max_diff(image, reference(request(unit("Base", red_circle, 0.5)))) == 0
    # the unit as SD.Next's own client fills it in (its defaults written out) is the same unit
    full = {"adapter": "Base", "images": [b64(red_circle)], "masks": [], "scale": 0.5, "start": 0.0, "end": 1.0,
            "crop": False}  # fmt: skip
    same, _ = post_txt2img(server, sdnext(full))
    assert max_diff(same, image) == 0


def test_an_sdnext_unit_without_images_is_skipped_and_said(server):
    """SD.Next leaves a unit without images out; here it is left out too, and named in info.warnings."""
    plain, _ = post_txt2img(server, sdnext())
    image, info = post_txt2img(server, sdnext({"adapter": "Plus", "images": []}))
    assert max_diff(image, plain) == 0 and info["ip_adapters"] == []
    assert any(w.startswith("ip_adapter.0: unit skipped") for w in info["warnings"]), info["warnings"]


def test_empty_masks_mean_no_masks(server, reference, red_circle):
    image, _ = post_txt2img(server, sdnext({"adapter": "Base", "images": [b64(red_circle)], "scale": 0.6, "masks": []}))
    assert max_diff(image, reference(request(unit("Base", red_circle)))) == 0
    image, _ = post_txt2img(server, sdnext({"adapter": "Base", "images": [b64(red_circle)], "scale": 0.6, "masks": None}))
    assert max_diff(image, reference(request(unit("Base", red_circle)))) == 0


def test_nulls_the_sdnext_model_accepts_mean_its_defaults(server):
    """Every field of SD.Next's and A1111's request models is Optional: null is the field left out."""
    plain, _ = post_txt2img(server, sdnext(override_settings={"sd_model_checkpoint": "tiny-sd15"}))
    nulls = dict(negative_prompt=None, ip_adapter=None, alwayson_scripts=None, sampler_name=None, sampler_index=0,
                 scheduler=None, batch_size=None, n_iter=None, cfg_scale=None, face=None, styles=None)  # fmt: skip
    image, info = post_txt2img(server, sdnext(**nulls))
    assert max_diff(image, plain) == 0 and info["warnings"] == []
    image, _ = post_txt2img(server, {**sdnext(), "override_settings": None})  # the server's current model
    assert max_diff(image, plain) == 0


def test_an_integer_sampler_index_is_a_place_in_the_sampler_list(server):
    """SD.Next's `sampler_index: int | str` (default 0): an integer is a place in the list /sdapi/v1/samplers
    gives (0: Default), used when sampler_name is not; a string is a name; sampler_name wins over both."""
    with client(server) as http:
        names = [s["name"] for s in http.get("/sdapi/v1/samplers").json()]
    assert names == list(SAMPLERS) and names[0] == "Default"
    ddim = names.index("DDIM")
    by_name = {name: post_txt2img(server, sdnext(sampler_name=name))[0] for name in ("DDIM", "Euler a", "Default")}
    assert max_diff(by_name["DDIM"], by_name["Default"]) > 0 and max_diff(by_name["DDIM"], by_name["Euler a"]) > 0
    by_index, _ = post_txt2img(server, sdnext(sampler_name=None, sampler_index=ddim))
    assert max_diff(by_index, by_name["DDIM"]) == 0
    by_index, _ = post_txt2img(server, sdnext(sampler_index=0))
    assert max_diff(by_index, by_name["Default"]) == 0
    named_too, _ = post_txt2img(server, sdnext(sampler_name="Euler a", sampler_index=ddim))
    assert max_diff(named_too, by_name["Euler a"]) == 0
    legacy, _ = post_txt2img(server, sdnext(sampler_index="DDIM"))  # A1111's older field: a name
    assert max_diff(legacy, by_name["DDIM"]) == 0
    body = post_txt2img(server, sdnext(sampler_index=len(names)), 422)
    assert "sampler_index" in body["detail"] and str(len(names) - 1) in body["detail"]


# ---------------------------------------------------------------------------- the ControlNet extension's maps


def cn(image, **fields) -> dict:
    """A ControlNet-extension IP-Adapter unit as a raw payload sends it."""
    return {"enabled": True, "module": "ip-adapter_clip_h", "model": "ip-adapter_sd15", "image": image, "weight": 0.6,
            **fields}  # fmt: skip


def shown(image: Image.Image, mask: Image.Image | None = None) -> np.ndarray:
    """The extension's picture of a CLIP unit's input: the image, with alpha 255 - mask // 2 (255 with no mask)."""
    alpha = np.full(image.size[::-1], 255, np.uint8) if mask is None else 255 - np.asarray(mask.convert("RGB"))[..., 0] // 2
    return np.dstack([np.asarray(image.convert("RGB")), alpha])


def test_the_extensions_input_maps_follow_the_generated_images(server, pack, red_circle):
    """webuiapi's ControlNetUnit (save_detected_map left out: the extension's default, true): the unit's input
    image comes back after the picture, as the extension returns it; a client that drops the last len(units)
    images keeps the picture."""
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)
    units = [webuiapi.ControlNetUnit(image=red_circle, module="ip-adapter_clip_sd15", model="ip-adapter_sd15", weight=0.6)]
    result = api.txt2img(prompt="a cat", seed=1, width=64, height=64, cfg_scale=7.0, controlnet_units=units,
                         alwayson_scripts={})  # webuiapi adds the units to its shared default dict otherwise
    assert len(result.images) == 2 and len(result.info["infotexts"]) == 1
    picture, detected = result.images
    assert detected.mode == "RGBA" and np.array_equal(np.asarray(detected), shown(red_circle))
    expected, _ = post_txt2img(server, sdnext({"adapter": "Base", "images": [b64(red_circle)], "scale": 0.6},
                                              sampler_name="Euler a", cfg_scale=7.0))  # fmt: skip
    assert max_diff(result.images[: -len(units)][0].convert("RGB"), expected) == 0


def test_maps_in_unit_and_image_order_after_every_batch(server, red_circle, yellow_square):
    left = Image.new("L", red_circle.size, 0)
    left.paste(255, (0, 0, red_circle.size[0] // 2, red_circle.size[1]))
    units = [cn([{"image": b64(red_circle), "mask": b64(left)}, {"image": b64(yellow_square)}], model="ip-adapter-plus_sd15"),
             cn(b64(yellow_square), module="ip-adapter_clip_g", model="ip-adapter_sd15_vit-G")]  # fmt: skip
    with client(server) as http:
        response = http.post("/sdapi/v1/txt2img", json=sdnext(n_iter=2, alwayson_scripts={"controlnet": {"args": units}}))
    assert response.status_code == 200, response.text[:2000]
    images = [decode(i) for i in response.json()["images"]]
    assert len(images) == 2 + 3 and len(json.loads(response.json()["info"])["all_seeds"]) == 2
    assert [i.mode for i in images] == ["RGB", "RGB", "RGBA", "RGBA", "RGBA"]
    assert np.array_equal(np.asarray(images[2]), shown(red_circle, left))
    assert np.array_equal(np.asarray(images[3]), shown(yellow_square))
    assert np.array_equal(np.asarray(images[4]), shown(yellow_square))


def test_the_unit_and_request_switches_turn_the_maps_off(server, red_circle):
    face_module = cn(b64(red_circle), module="ip-adapter-auto")
    for payload, count in (
        (sdnext(alwayson_scripts={"controlnet": {"args": [cn(b64(red_circle), save_detected_map=False)]}}), 1),
        (sdnext(alwayson_scripts={"controlnet": {"args": [cn(b64(red_circle)), face_module]}}), 3),
        (sdnext(alwayson_scripts={"controlnet": {"args": [cn(b64(red_circle), enabled=False)]}}), 1),
        (sdnext(alwayson_scripts={"controlnet": {"args": [cn(b64(red_circle))]}},
                override_settings={"sd_model_checkpoint": "tiny-sd15", "control_net_no_detectmap": True}), 1),
    ):  # fmt: skip
        with client(server) as http:
            response = http.post("/sdapi/v1/txt2img", json=payload)
        assert response.status_code == 200, response.text[:2000]
        body = response.json()
        assert len(body["images"]) == count, payload
        assert not any("control_net_no_detectmap" in w for w in json.loads(body["info"])["warnings"])
    # SD.Next's own units come back alone, as SD.Next returns them
    with client(server) as http:
        body = http.post("/sdapi/v1/txt2img", json=sdnext({"adapter": "Base", "images": [b64(red_circle)]})).json()
    assert len(body["images"]) == 1


def test_module_list_as_the_extension_answers(server):
    """Internal names, or with alias_names=true the labels (ip-adapter_clip_h, ip-adapter_clip_g), in the
    extension's order (none first, then by priority and label, descending), each with its module_detail: the
    IP-Adapter modules in their order among the ControlNet preprocessors that run here."""
    with client(server) as http:
        names = http.get("/controlnet/module_list").json()
        labels = http.get("/controlnet/module_list", params={"alias_names": "true"}).json()
    ip_names = [n for n in names["module_list"] if n.startswith("ip-adapter")]
    ip_labels = [n for n in labels["module_list"] if n.startswith("ip-adapter")]
    assert names["module_list"][0] == labels["module_list"][0] == "none"
    assert ip_names == ["ip-adapter-auto", "ip-adapter_clip_sd15", "ip-adapter_face_id_plus", "ip-adapter_face_id",
                        "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl"]  # fmt: skip
    assert ip_labels == ["ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_face_id_plus", "ip-adapter_face_id",
                         "ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_g"]  # fmt: skip
    assert {"canny", "tile_resample", "scribble_xdog", "invert"} <= set(names["module_list"])
    resolution = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
    for listing in (names, labels):
        assert list(listing["module_detail"]) == listing["module_list"]
        assert all(listing["module_detail"][n] == {"model_free": False, "sliders": [resolution]}
                   for n in listing["module_list"] if n.startswith("ip-adapter"))  # fmt: skip


# ------------------------------------------------------------------------------------------------- options


def test_options_set_hold_for_the_requests_that_follow(pack, tmp_path, reference):
    """POST /sdapi/v1/options: the settings that change pictures hold for later requests (a request's own
    override_settings still win); a setting imprompt cannot honour is refused naming it, and nothing is set; one
    without effect is named in the answer. GET says what is set."""
    from tools.extra_models import altered_vae, write

    from diffusers import StableDiffusionPipeline

    sd15 = StableDiffusionPipeline.from_pretrained(pack / "diffusers" / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)  # fmt: skip
    write(tmp_path / "VAE" / "soft-vae.safetensors", altered_vae(sd15, seed=5).state_dict())
    plain = {"prompt": "a cat", "seed": 1, "steps": 4, "width": 64, "height": 64}
    with running_server(Engine([pack, tmp_path], allow_paths=False)) as url, client(url) as http:
        assert http.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
        answer = http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "samples_format": "jpg"})
        assert answer.status_code == 200, answer.text
        assert "samples_format" in " ".join(answer.json()["warnings"])
        _, info = post_txt2img(url, plain)
        assert info["clip_skip"] == 2
        _, info = post_txt2img(url, {**plain, "override_settings": {"CLIP_stop_at_last_layers": 1}})
        assert info["clip_skip"] == 1
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl", "sd_vae": "soft-vae.safetensors",
                                             "CLIP_stop_at_last_layers": 1})  # fmt: skip
        assert {k: http.get("/sdapi/v1/options").json()[k] for k in ("sd_model_checkpoint", "sd_vae")} == {
            "sd_model_checkpoint": "tiny-sdxl", "sd_vae": "soft-vae.safetensors"}  # fmt: skip
        http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15"})
        image, info = post_txt2img(url, plain)
        assert info["vae"] and info["vae"]["name"] == "soft-vae.safetensors", info["vae"]
        assert max_diff(image, Engine([pack, tmp_path]).generate(model="tiny-sd15", vae="soft-vae.safetensors",
                                                                  **plain).images[0]) == 0  # fmt: skip
        _, info = post_txt2img(url, {**plain, "override_settings": {"sd_vae": "Automatic"}})
        assert not info["vae"]
        for refused, fragment in (({"eta_noise_seed_delta": 31337, "CLIP_stop_at_last_layers": 3}, "eta_noise_seed_delta"),
                                  ({"CLIP_stop_at_last_layers": 40}, "CLIP_stop_at_last_layers"),
                                  ({"sd_vae": "nope.safetensors"}, "nope.safetensors")):  # fmt: skip
            answer = http.post("/sdapi/v1/options", json=refused)
            assert answer.status_code in (404, 422) and fragment in answer.json()["detail"], answer.text
        assert http.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1  # nothing set by a refusal
        http.post("/sdapi/v1/options", json={"sd_vae": "None"})
        image, info = post_txt2img(url, plain)
        assert not info["vae"] and max_diff(image, reference({**plain, "model": "tiny-sd15"})) == 0


# ---------------------------------------------------------------------------------------------- listings


def test_sdnext_ip_adapters_are_names_and_the_rich_listing_is_imprompts(server):
    with client(server) as http:
        names = http.get("/sdapi/v1/ip-adapters").json()
        rich = http.get("/v1/ip-adapters").json()
    assert names[0] == "None" and all(isinstance(n, str) for n in names)
    assert "Base ViT-G" in names and "Base SDXL" not in names  # the current model is tiny-sd15
    assert [a["name"] for a in rich] == names[1:]
    assert all(a["encoder"] and a["needs"] for a in rich)


# --------------------------------------------------------------------------------------------- interrupt


def test_an_interrupt_between_two_n_iter_batches_stops_the_job(pack, red_circle):
    """The interrupt lands after the first batch and before the second: the job stops there, and says so."""
    engine = new_engine(pack)
    first_done, go_on, seeds = threading.Event(), threading.Event(), []
    generate = engine.generate

    def generate_then_wait(req, *args, **kwargs):
        result = generate(req, *args, **kwargs)
        seeds.append(req.seed)
        if len(seeds) == 1:
            first_done.set()
            go_on.wait(60)  # the worker sits between batch 1 and batch 2
        return result

    engine.generate = generate_then_wait
    answers = {}
    payload = sdnext({"adapter": "Base", "images": [b64(red_circle)]}, n_iter=3, seed=5)
    with running_server(engine) as url, client(url) as http:
        thread = threading.Thread(target=lambda: answers.update(r=http.post("/sdapi/v1/txt2img", json=payload)))
        thread.start()
        assert first_done.wait(120)
        assert http.post("/sdapi/v1/interrupt").json() == {"interrupted": True}
        go_on.set()
        thread.join(120)
        body = answers["r"].json()
        info = json.loads(body["info"])
        assert seeds == [5] and len(body["images"]) == 1 and info["interrupted"] is True
        # the next job is not touched by it
        body = http.post("/sdapi/v1/txt2img", json={**payload, "n_iter": 2}).json()
        assert len(body["images"]) == 2 and json.loads(body["info"])["interrupted"] is False
