"""Hostile input through the HTTP API: each bad request gets the right 4xx and a clear message, and the server
then answers a good request with exactly the right image."""

from __future__ import annotations

import base64
import json

import pytest
from conftest import max_diff, request, unit
from PIL import Image
from server_fixtures import b64, client, decode, new_engine, running_server

from imprompt import Engine

KEY = "k3y"


@pytest.fixture(scope="module")
def server(pack):
    with running_server(new_engine(pack), api_key=KEY, max_body_bytes=2_000_000) as url:
        yield url


@pytest.fixture(scope="module")
def images(pack):
    red = Image.open(pack / "images" / "red-circle.png").convert("RGB")
    return {"red": b64(red), "red_image": red}


def txt(**fields) -> dict:
    return {"prompt": "a cat", "seed": 1, "steps": 4, "width": 64, "height": 64, "cfg_scale": 7.0,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, **fields}  # fmt: skip


def ip(pictures: dict, **fields) -> dict:
    return {"adapter": "Base", "images": [pictures["red"]], "scale": 0.6, **fields}


def raw(body: dict) -> dict:
    """Request kwargs for a JSON body httpx would not encode itself (NaN, lone surrogates): Python's json does."""
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


AUTH = {"Authorization": f"Bearer {KEY}"}
# (name, method, path, request kwargs builder, status, fragment of the message)
CASES = [
    ("malformed json", "post", "/sdapi/v1/txt2img", lambda i: {"content": b'{"prompt": ', "headers": {"content-type": "application/json"}}, 422, "JSON"),
    ("json array body", "post", "/sdapi/v1/txt2img", lambda i: {"json": [1, 2]}, 422, "invalid request"),
    ("empty body", "post", "/sdapi/v1/txt2img", lambda i: {"content": b"", "headers": {"content-type": "application/json"}}, 422, "invalid request"),
    ("prompt of wrong type", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(prompt=["a", "list"])}, 422, "prompt"),
    ("steps not a number", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(steps="many")}, 422, "steps"),
    ("steps 0", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(steps=0)}, 422, "steps"),
    ("steps huge", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(steps=100000)}, 422, "steps"),
    ("negative width", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(width=-64)}, 422, "width"),
    ("width not a multiple of 8", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(width=65)}, 422, "multiple of 8"),
    ("height too large", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(height=8192)}, 422, "height"),
    ("seed below -1", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(seed=-5)}, 422, "seed"),
    ("seed too large", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(seed=2**40)}, 422, "seed"),
    ("cfg out of range", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(cfg_scale=1000)}, 422, "cfg_scale"),
    ("batch too large", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(batch_size=64)}, 422, "batch_size"),
    ("n_iter too large", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(n_iter=1000)}, 422, "n_iter"),
    ("unknown sampler", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(sampler_name="Warp Drive")}, 422, "unknown sampler"),
    ("ip_adapter not a list", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter={"adapter": "Base"})}, 422, "ip_adapter"),
    ("adapter not a string", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, adapter=5)])}, 422, "adapter"),
    ("unit with unknown field", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, strength=3)])}, 422, "strength"),
    ("unit with images and embeddings", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, embeddings="saved")])}, 422, "give one of images, embeddings"),
    ("scale out of range", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, scale=50)])}, 422, "scale"),
    ("start after end", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, start=0.9, end=0.2)])}, 422, "start"),
    ("base64 garbage", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, images=["%%%not base64%%%"])])}, 422, "base64"),
    ("non-image bytes", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, images=[base64.b64encode(b"GIF89a...no").decode()])])}, 422, "not an image"),
    ("decompression bomb", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, images=[b64(Image.new("1", (30000, 30000)))])])}, 413, "pixels"),
    ("mask count mismatch", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, masks=[i["red"], i["red"]])])}, 422, "2 masks for 1 images"),
    ("invalid layer block", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, layers={"up": {"block_7": 1}})])}, 422, "block_7"),
    ("face crop requested", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, crop=True)])}, 422, "crop=true"),
    ("unknown adapter", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, adapter="Base XL Turbo")])}, 404, "Base XL Turbo"),
    ("path traversal in adapter", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, adapter="../../../etc/passwd")])}, 404, "not found"),
    ("absolute path as adapter", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, adapter="/etc/passwd")])}, 404, "not found"),
    ("path traversal in model", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(override_settings={"sd_model_checkpoint": "../../diffusers/tiny-sd15"})}, 404, "not found"),
    ("server path as image", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, images=["/etc/hostname"])])}, 422, "base64"),
    ("unknown saved embeddings", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[{"adapter": "Base", "embeddings": "../secret"}])}, 404, "not found"),
    ("incompatible adapter", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, adapter="Base SDXL")])}, 422, "2048"),
    ("img2img without init image", "post", "/sdapi/v1/img2img", lambda i: {"json": txt(init_images=[])}, 422, "init_images"),
    ("denoising strength 2", "post", "/sdapi/v1/img2img", lambda i: {"json": txt(init_images=[i["red"]], denoising_strength=2)}, 422, "denoising_strength"),
    ("unknown model in options", "post", "/sdapi/v1/options", lambda i: {"json": {"sd_model_checkpoint": "../../etc"}}, 404, "not found"),
    ("oversize body", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(prompt="x" * 3_000_000)}, 413, "byte limit"),
    ("wrong method", "get", "/sdapi/v1/txt2img", lambda i: {}, 405, "does not take GET"),
    ("unknown route", "post", "/sdapi/v2/txt2img", lambda i: {"json": txt()}, 404, "no such endpoint"),
    ("too many units", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i)] * 9)}, 413, "9 units"),
    ("too many images", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, images=[i["red"]] * 17)])}, 413, "17 is more than the 16"),
    ("line-wrapped base64 garbage", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[ip(i, images=["%%%%\n%%%%"])])}, 422, "base64"),
    ("lone surrogate in prompt", "post", "/sdapi/v1/txt2img", lambda i: raw(txt(prompt="a \ud800 cat")), 422, "prompt: not valid Unicode text"),
    ("lone surrogate in negative prompt", "post", "/sdapi/v1/txt2img", lambda i: raw(txt(negative_prompt="\udfff")), 422, "negative_prompt: not valid Unicode text"),
    ("lone surrogate in adapter name", "post", "/sdapi/v1/txt2img", lambda i: raw(txt(ip_adapter=[ip(i, adapter="Base\ud800")])), 422, "ip_adapters.0.adapter: not valid Unicode text"),
    ("script args a number", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(alwayson_scripts={"X": {"args": 5}})}, 422, "alwayson_scripts.X.args"),
    ("script args an object", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(alwayson_scripts={"X": {"args": {"a": 1}}})}, 422, "alwayson_scripts.X.args"),
    ("script not an object", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(alwayson_scripts={"X": [1, 2]})}, 422, "alwayson_scripts.X"),
    ("NaN layer weight", "post", "/sdapi/v1/txt2img", lambda i: raw(txt(ip_adapter=[ip(i, layers={"mid": float("nan")})])), 422, "layers.mid"),
    ("huge layer weight", "post", "/sdapi/v1/txt2img", lambda i: raw(txt(ip_adapter=[ip(i, layers={"up": {"block_1": [0, 1e300, 0]}})])), 422, "layers.up.block_1[1]"),
    ("infinite layer weight", "post", "/sdapi/v1/txt2img", lambda i: raw(txt(ip_adapter=[ip(i, layers={"down": float("inf")})])), 422, "layers.down"),
    ("clip skip deeper than the text encoder", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(clip_skip=12)}, 422, "clip_skip: 12 is more than the"),
    ("model name not a string", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(override_settings={"sd_model_checkpoint": 5}, distilled_cfg_scale=3.5)}, 422, "sd_model_checkpoint: expected a model name"),
    ("a thousand BREAKs", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(prompt=" BREAK ".join(["a cat"] * 1000))}, 413, "1000 chunks of 75 tokens"),
    ("over the units ceiling", "post", "/sdapi/v1/txt2img", lambda i: {"json": txt(ip_adapter=[{"adapter": "Base"}] * 65)}, 413, "ip_adapter"),
]  # fmt: skip
AUTH_CASES = [
    ("missing API key", {}, 401),
    ("wrong API key", {"Authorization": "Bearer nope"}, 401),
    ("wrong Basic password", {"Authorization": "Basic " + base64.b64encode(b"user:nope").decode()}, 401),
    ("malformed Authorization", {"Authorization": "Bearer"}, 401),
    ("non-ASCII key", {"Authorization": "Bearer k3ý".encode()}, 401),
]


def good_request_is_served(url, images, reference):
    with client(url, headers=AUTH) as http:
        response = http.post("/sdapi/v1/txt2img", json=txt(ip_adapter=[ip(images, adapter="Base ViT-G")]))
    assert response.status_code == 200, response.text
    assert max_diff(decode(response.json()["images"][0]).convert("RGB"), reference) == 0


@pytest.fixture(scope="module")
def reference(pack, images):
    return Engine(pack).generate(request(unit("Base ViT-G", images["red_image"]))).images[0]


@pytest.mark.parametrize("name, method, path, build, status, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, images, reference, name, method, path, build, status, fragment):
    with client(server, headers=AUTH) as http:
        response = getattr(http, method)(path, **build(images))
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["error"].endswith("Error") and fragment in body["detail"], body
    good_request_is_served(server, images, reference)


@pytest.mark.parametrize("name, headers, status", AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_auth(server, images, reference, name, headers, status):
    with client(server) as http:
        response = http.post("/sdapi/v1/txt2img", json=txt(), headers=headers)
    assert response.status_code == status and "API key" in response.json()["detail"]
    good_request_is_served(server, images, reference)


# Caller input that used to reach a raw exception: a 500, after which uvicorn closes the connection, so a client
# that keeps its connection alive (most do) had its next request fail too.
KEPT_ALIVE_CASES = [
    ("lone surrogate in prompt", lambda i: raw(txt(prompt="\ud800"))),
    ("script args a number", lambda i: raw(txt(alwayson_scripts={"X": {"args": 5}}))),
    ("script not an object", lambda i: raw(txt(alwayson_scripts={"controlnet": "yes"}))),
    ("NaN layer weight", lambda i: raw(txt(ip_adapter=[ip(i, layers={"mid": float("nan")})]))),
]


def test_refused_requests_keep_the_connection_for_the_next(server, images, reference):
    """One client, one connection: every bad request gets its 4xx, and the good request after it is answered on
    the same connection with exactly its image."""
    with client(server, headers=AUTH) as http:
        for name, build in KEPT_ALIVE_CASES:
            response = http.post("/sdapi/v1/txt2img", **build(images))
            assert 400 <= response.status_code < 500, (name, response.text[:500])
            response = http.post("/sdapi/v1/txt2img", json=txt(ip_adapter=[ip(images, adapter="Base ViT-G")]))
            assert response.status_code == 200, (name, response.text[:500])
            assert max_diff(decode(response.json()["images"][0]).convert("RGB"), reference) == 0


# Values a client sent come back cut short in error messages: (name, request kwargs builder, status, fragment).
MEGABYTE = "A" * 1_000_000
ECHO_CASES = [
    ("1 MB mask that is not an image", lambda i: {"json": txt(ip_adapter=[ip(i, masks=["%" + MEGABYTE])])}, 422, "masks.0"),
    ("1 MB img2img mask (inpainting)", lambda i: {"json": txt(init_images=[i["red"]], mask=MEGABYTE)}, 422, "mask"),
    ("1 MB adapter name", lambda i: {"json": txt(ip_adapter=[ip(i, adapter=MEGABYTE)])}, 422, "adapter: 1000000 characters"),
    ("1 MB ControlNet model name", lambda i: {"json": txt(alwayson_scripts={"controlnet": {"args": [
        {"enabled": True, "module": "ip-adapter_clip_sd15", "model": MEGABYTE, "image": i["red"]}]}})}, 404, "not found"),
    ("1 MB script name", lambda i: {"json": txt(alwayson_scripts={MEGABYTE: {"args": [1]}})}, 422, "alwayson_scripts"),
    ("1 MB sampler", lambda i: {"json": txt(sampler_name=MEGABYTE)}, 422, "sampler"),
    ("1 MB LoRA in the prompt", lambda i: {"json": txt(prompt=f"<lora:{MEGABYTE[:30_000]}:1>")}, 404, "LoRA"),
    ("1 MB prompt", lambda i: {"json": txt(prompt=MEGABYTE)}, 422, "prompt: 1000000 characters, more than the 32768"),
    ("1 MB list of styles", lambda i: {"json": txt(styles=["a"] * 200_000)}, 422, "styles"),
]  # fmt: skip


@pytest.mark.parametrize("name, build, status, fragment", ECHO_CASES, ids=[c[0] for c in ECHO_CASES])
def test_error_messages_do_not_echo_big_values(server, images, name, build, status, fragment):
    """A 1 MB value in a request gives an answer of a few hundred bytes that still names the field."""
    with client(server, headers=AUTH) as http:
        path = "/sdapi/v1/img2img" if "img2img" in name else "/sdapi/v1/txt2img"
        response = http.post(path, **build(images))
    assert response.status_code == status and len(response.content) < 5000, (response.status_code, response.text[:300])
    assert fragment in response.json()["detail"], response.text[:300]
