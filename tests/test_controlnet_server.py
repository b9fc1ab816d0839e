"""ControlNet units over HTTP (the A1111 ControlNet extension's units with webuiapi and raw payloads, SD.Next's
control API, imprompt's own `controlnets`) and the CLI's --control: the same pixels as the engine given the same
request, the extension's endpoints and detected maps, and typed refusals naming the unit."""

from __future__ import annotations

import json
import logging

from pathlib import Path

import pytest
import webuiapi
from conftest import max_diff, request, unit
from PIL import Image
from server_fixtures import b64, client, decode, running_server
from test_cli import imprompt

from imprompt import Engine
from imprompt.models.store import legacy_hash
from imprompt.preprocess import PREPROCESSORS, detect, locate_weights
from imprompt.server.controlnet import module_list

SD15 = "control_tiny_sd15_canny"  # the LDM single file in A1111's ControlNet/ folder


@pytest.fixture(scope="module")
def annotators(tmp_path_factory) -> Path:
    """Tiny preprocessor weights in an A1111 tree (extensions/sd-webui-controlnet/annotator/downloads/)."""
    from tools.annotator_pack import write_annotator_pack

    return write_annotator_pack(tmp_path_factory.mktemp("annotators"))["roots"]["a1111"]


@pytest.fixture(scope="module")
def cn_engine(pack, nets, annotators) -> Engine:
    return Engine([pack, nets["sd15"].parent.parent, annotators], allow_paths=False)


@pytest.fixture(scope="module")
def server(cn_engine):
    with running_server(cn_engine) as url:
        yield url


@pytest.fixture(scope="module")
def pose(pack) -> Image.Image:
    """A finished control image (module none), as API clients send a pose map."""
    return Image.open(pack / "images" / "white-triangle.png").convert("RGB").resize((64, 64))


def txt(**fields) -> dict:
    return {"prompt": "a cat", "seed": 1, "steps": 4, "width": 64, "height": 64, "cfg_scale": 7.0,
            "sampler_name": "Euler a", "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, **fields}  # fmt: skip


def ext_unit(image, module="none", model=SD15, **fields) -> dict:
    return {"enabled": True, "module": module, "model": model, "image": image, "weight": 1.0, **fields}


def post(url, payload, status=200, path="/sdapi/v1/txt2img"):
    with client(url) as http:
        response = http.post(path, json=payload)
    assert response.status_code == status, response.text[:2000]
    return response.json()


def scripts(*units) -> dict:
    return {"controlnet": {"args": list(units)}}


def test_webuiapi_ip_adapter_and_pose_units_equal_imprompts_form(server, cn_engine, nets, red_circle, pose):
    """webuiapi's own ControlNetUnit, unchanged: an IP-Adapter unit and an OpenPose-style unit (module none, a
    finished map), the model as the extension lists it ("name [hash]"). The pixels are the engine's for imprompt's
    form of the same request, and the maps follow the image, as the extension appends them."""
    host, port = server.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=4)
    title = f"{SD15} [{legacy_hash(nets['sd15-ldm'])}]"
    assert title in api.controlnet_model_list()
    units = [webuiapi.ControlNetUnit(image=red_circle, module="ip-adapter_clip_sd15", model="ip-adapter_sd15", weight=0.6),
             webuiapi.ControlNetUnit(image=pose, module="none", model=title, weight=0.8, guidance_end=0.75)]  # fmt: skip
    result = api.txt2img(prompt="a cat", seed=1, width=64, height=64, cfg_scale=7.0, controlnet_units=units,
                         alwayson_scripts={})  # fmt: skip
    expected = cn_engine.generate(request(unit("Base", red_circle, 0.6), sampler="Euler a", controlnets=[
        {"model": SD15, "image": pose, "weight": 0.8, "end": 0.75, "resize_mode": "Resize and Fill"}]))  # fmt: skip
    plain = cn_engine.generate(request(unit("Base", red_circle, 0.6), sampler="Euler a"))
    assert max_diff(result.images[0].convert("RGB"), expected.images[0]) == 0
    assert max_diff(expected.images[0], plain.images[0]) > 8  # the ControlNet acts
    assert len(result.images) == 3  # the image, then each unit's map
    assert max_diff(result.images[2].convert("RGB"), pose) == 0
    assert result.info["imprompt"][0]["controlnets"][0]["model"].startswith(SD15)
    assert "ControlNet 0: " in result.info["infotexts"][0]


def test_advanced_weighting_from_an_a1111_unit_equals_imprompts_form(server, cn_engine, pose):
    scales = [0.75] * 13  # the extension's own web API test sends this for SD 1.5
    body = post(server, txt(alwayson_scripts=scripts(ext_unit(b64(pose), advanced_weighting=scales))))
    expected = cn_engine.generate(request(sampler="Euler a", controlnets=[
        {"model": SD15, "image": pose, "advanced_weighting": scales}]))  # fmt: skip
    assert max_diff(decode(body["images"][0]).convert("RGB"), expected.images[0]) == 0


def test_detected_maps_follow_the_switches(server, pose):
    """save_detected_map false, or the control_net_no_detectmap setting, leave the maps out; a canny unit's map is
    its edges at the generation size."""
    body = post(server, txt(alwayson_scripts=scripts(ext_unit(b64(pose), save_detected_map=False))))
    assert len(body["images"]) == 1
    settings = {"sd_model_checkpoint": "tiny-sd15", "control_net_no_detectmap": True}
    body = post(server, txt(override_settings=settings, alwayson_scripts=scripts(ext_unit(b64(pose)))))
    assert len(body["images"]) == 1
    body = post(server, txt(alwayson_scripts=scripts(ext_unit(b64(pose), module="canny", threshold_a=50))))
    edges = decode(body["images"][1]).convert("RGB")
    assert edges.size == (64, 64) and set(edges.getdata()) <= {(0, 0, 0), (255, 255, 255)}
    assert json.loads(body["info"])["imprompt"][0]["controlnets"][0]["threshold_a"] == 50


def test_imprompts_own_form_returns_the_control_images(server, cn_engine, pose):
    body = post(server, txt(controlnets=[{"model": SD15, "image": b64(pose), "module": "canny", "weight": 0.7}]))
    expected = cn_engine.generate(request(sampler="Euler a", controlnets=[
        {"model": SD15, "image": pose, "module": "canny", "weight": 0.7}]))  # fmt: skip
    assert max_diff(decode(body["images"][0]).convert("RGB"), expected.images[0]) == 0
    assert len(body["images"]) == 1 and len(body["control_images"]) == 1
    assert max_diff(decode(body["control_images"][0]).convert("RGB"), expected.control_images[0]) == 0


def test_sdnext_control_equals_the_engine(server, cn_engine, red_circle, pose):
    payload = {"prompt": "a cat", "seed": 1, "steps": 4, "cfg_scale": 7.0, "sampler_name": "Euler a",
               "inputs": [b64(pose)], "unit_type": "controlnet", "send_images": True, "save_images": False,
               "control": [{"process": "None", "model": "tiny-sd15-controlnet", "strength": 0.8, "start": 0.0, "end": 1.0}],
               "ip_adapter": [{"adapter": "Base", "images": [b64(red_circle)], "scale": 0.6}]}  # fmt: skip
    body = post(server, payload, path="/sdapi/v1/control")
    expected = cn_engine.generate(request(unit("Base", red_circle, 0.6), sampler="Euler a", controlnets=[
        {"model": "tiny-sd15-controlnet", "image": pose, "weight": 0.8}]))  # fmt: skip
    assert max_diff(decode(body["images"][0]).convert("RGB"), expected.images[0]) == 0
    assert len(body["images"]) == 1 and len(body["processed"]) == 1
    assert max_diff(decode(body["processed"][0]).convert("RGB"), pose) == 0
    assert body["params"]["inputs"] == [b64(pose)] or body["params"]["inputs"][0].startswith("<str")
    assert body["info"].startswith("a cat") and body["warnings"] == []
    with client(server) as http:
        assert "tiny-sd15-controlnet" in http.get("/sdapi/v1/controlnets").json()
        names = {p["name"]: p["params"] for p in http.get("/sdapi/v1/preprocessors").json()}
    assert names["Canny"] == {"low_threshold": 100, "high_threshold": 200} and "None" in names


def test_sdnext_fields_that_change_the_picture_are_refused_and_unit_errors_use_its_names(server, pose):
    unit = {"process": "None", "model": "tiny-sd15-controlnet", "strength": 0.8}
    base = {"prompt": "a cat", "seed": 1, "steps": 2, "inputs": [b64(pose)], "unit_type": "controlnet", "control": [unit]}
    with client(server) as http:
        for field, value in (("pag_scale", 1.5), ("cfg_end", 0.5), ("vae_type", "Tiny"), ("hdr_clamp", True)):
            answer = http.post("/sdapi/v1/control", json={**base, field: value})
            assert answer.status_code == 422 and field in answer.json()["detail"], (field, answer.text)
        at_defaults = {"pag_scale": 0.0, "cfg_end": 1.0, "vae_type": "Full", "hdr_clamp": False, "image_cfg_scale": 6.0,
                       "diffusers_guidance_rescale": 0.7, "refiner_steps": 5}  # fmt: skip
        answer = http.post("/sdapi/v1/control", json={**base, **at_defaults})
        assert answer.status_code == 200 and answer.json()["warnings"] == []
        answer = http.post("/sdapi/v1/control", json={**base, "control": [{**unit, "strength": 3}]})
        assert answer.status_code == 422 and "control.0.strength" in answer.json()["detail"], answer.text


def test_the_extensions_endpoints(server, nets, pack, caplog):
    with client(server) as http:
        assert http.get("/controlnet/version").json() == {"version": 3}
        listing = http.get("/controlnet/module_list").json()
        labels = http.get("/controlnet/module_list", params={"alias_names": True}).json()
        types = http.get("/controlnet/control_types").json()["control_types"]
        assert http.get("/controlnet/settings").json() == {"control_net_unit_count": 8}
        image = b64(Image.open(pack / "images" / "red-circle.png").convert("RGB"))
        with caplog.at_level(logging.INFO, logger="imprompt"):
            found = http.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [image, image],
                                                          "controlnet_processor_res": -100, "controlnet_threshold_a": -100,
                                                          "controlnet_threshold_b": -100}).json()  # fmt: skip
        refusals = [http.post("/controlnet/detect", json=body) for body in (
            {"controlnet_module": "no_such_module", "controlnet_input_images": [image]},
            {"controlnet_module": "canny", "controlnet_input_images": []},
            {"controlnet_module": "ip-adapter-auto", "controlnet_input_images": [image]})]  # fmt: skip
    assert listing["module_list"][0] == "none" and set(listing["module_list"]) == set(listing["module_detail"])
    assert {"canny", "ip-adapter_clip_sd15", "dw_openpose_full", "lineart", "hed", "tile_resample"} <= set(listing["module_list"])
    assert {"lineart_realistic", "softedge_hed", "ip-adapter_clip_h"} <= set(labels["module_list"])
    without = module_list(False, [pack])["module_list"]  # a tree without the annotators' weights: not listed
    assert "canny" in without and "dw_openpose_full" not in without and "lineart" not in without
    assert listing["module_detail"]["canny"] == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}  # fmt: skip
    assert {"All", "Canny", "Depth", "OpenPose", "Lineart", "SoftEdge", "Scribble", "Tile", "IP-Adapter"} <= set(types)
    assert any(m.startswith(SD15) for m in types["Canny"]["model_list"]) and types["Canny"]["default_option"] == "canny"
    assert found["info"] == "Success" and len(found["images"]) == 2
    canny = PREPROCESSORS["canny"]
    expected = detect(canny, decode(image).convert("RGB"), 512, 100, 200, locate_weights(canny, []), cache=None)
    assert max_diff(decode(found["images"][0]).convert("RGB"), expected) == 0
    logged = [r.getMessage() for r in caplog.records if "Invalid value" in r.getMessage()]
    assert logged == ["[canny.processor_res] Invalid value(-100), using default value 512.",
                      "[canny.threshold_a] Invalid value(-100.0), using default value 100.",
                      "[canny.threshold_b] Invalid value(-100.0), using default value 200."]  # fmt: skip
    assert [r.status_code for r in refusals] == [422, 422, 422]
    assert [r.json()["detail"].split(":")[0] for r in refusals] == ["Module not available", "No image selected",
                                                                    "Module not supported"]  # fmt: skip


BAD = [
    ("unknown module", dict(module="no_such_module"), 422, "alwayson_scripts.controlnet.args.1.module"),
    ("inpaint module", dict(module="inpaint_only"), 422, "inpainting ControlNets"),
    ("unknown model", dict(model="no-such-net [12345678]"), 404, "alwayson_scripts.controlnet.args.1.model"),
    ("model None", dict(model="None"), 422, "needs a ControlNet model"),
    ("missing image", dict(image=""), 422, "alwayson_scripts.controlnet.args.1.image: a ControlNet unit needs an image"),
    ("undecodable image", dict(image="bm90IGFuIGltYWdl"), 422, "alwayson_scripts.controlnet.args.1.image"),
    ("a mask", dict(mask=b64(Image.new("RGB", (64, 64)))), 422, "alwayson_scripts.controlnet.args.1.mask"),
    ("per-block weights, too few", dict(advanced_weighting=[1.0] * 12), 422, "args.1.advanced_weighting: 12 scales"),
    ("weight over 2", dict(weight=3), 422, "args.1.weight"),
    ("control mode", dict(control_mode="Loud"), 422, "args.1.control_mode"),
    ("another family", dict(model="tiny-sdxl-controlnet"), 422, "alwayson_scripts.controlnet.args.1: "),
]  # fmt: skip


@pytest.mark.parametrize("name, fields, status, fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_units_name_the_unit_and_the_next_request_is_unaffected(server, red_circle, pose, name, fields, status, fragment):
    good = txt(alwayson_scripts=scripts(ext_unit(b64(red_circle), module="ip-adapter_clip_sd15", model="ip-adapter_sd15"),
                                        ext_unit(b64(pose))))  # fmt: skip
    before = decode(post(server, good)["images"][0])
    bad = json.loads(json.dumps(good))
    bad["alwayson_scripts"]["controlnet"]["args"][1].update(fields)
    body = post(server, bad, status)
    assert fragment in body["detail"], body
    assert max_diff(decode(post(server, good)["images"][0]), before) == 0


def test_too_many_units_and_sdnext_refusals(server, pose):
    body = post(server, txt(alwayson_scripts=scripts(*[ext_unit(b64(pose))] * 9)), 413)
    assert "9 units" in body["detail"]
    base = {"prompt": "a cat", "seed": 1, "steps": 4, "inputs": [b64(pose)]}
    for fields, fragment in ((dict(guess=True), "control.0.guess"), (dict(process="no_such"), "control.0.process"),
                             (dict(unit_type="t2i adapter"), "control.0.unit_type"),
                             (dict(model="no-such-net"), "control.0.model"),
                             (dict(process_params={"magic": 1}), "control.0.process_params: 'magic' is not a parameter")):  # fmt: skip
        unit_ = {"process": "None", "model": "tiny-sd15-controlnet", **fields}
        body = post(server, {**base, "control": [unit_]}, 404 if "no-such-net" in str(fields) else 422, "/sdapi/v1/control")
        assert fragment in body["detail"], body


def test_cli_control_writes_the_engines_image(pack, nets, cn_engine, pose, tmp_path):
    pose.save(tmp_path / "pose, 1.png")
    out = tmp_path / "out.png"
    imprompt("generate", "--models", pack, "--models", nets["sd15"].parent.parent, "--model", "tiny-sd15",
             "--prompt", "a cat", "--seed", 1, "--steps", 4, "--cfg-scale", 7, "--width", 64, "--height", 64,
             "--control", f"{SD15}={tmp_path / 'pose, 1.png'},weight=0.8,mode=2,end=0.75", "--out", out)  # fmt: skip
    expected = cn_engine.generate(request(controlnets=[{"model": SD15, "image": pose, "weight": 0.8, "end": 0.75,
                                                        "control_mode": "ControlNet is more important"}]))  # fmt: skip
    assert max_diff(Image.open(out).convert("RGB"), expected.images[0]) == 0
    help_text = imprompt("generate", "--help").stdout
    assert "--control UNIT" in help_text and "MODEL=IMAGE" in help_text
    done = imprompt("generate", "--models", pack, "--control", "no-image", "--out", out, check=False)
    assert done.returncode == 1 and "--control 'no-image': expected MODEL=IMAGE" in done.stderr

