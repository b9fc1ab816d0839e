"""A ComfyUI FLUX tree as users keep it runs from the engine, the CLI, the HTTP API (imprompt's form and Forge's
A1111 form) and the web page: a GGUF transformer alone in `models/unet/`, `ae.safetensors` in `models/vae/`, CLIP-L
and an fp8 T5 (beside an fp16 one) in `models/clip/`, two FLUX LoRAs in `models/loras/`, with an XLabs IP-Adapter
unit. Every door gives the engine's pixels; the parts it ran with, and why those, are in `info.model_parts`."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from comfy_trees import FP8_T5, GGUF_MODEL, write_comfy_flux_tree
from conftest import max_diff
from PIL import Image
from server_fixtures import running_server
from test_page import CHROMIUM, browser  # noqa: F401 - the page tests' headless Chromium, as a fixture here too

from imprompt import Engine
from imprompt.errors import MissingPartError



@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Path:
    return write_comfy_flux_tree(tmp_path_factory.mktemp("ComfyUI"))


def request(pack, **fields) -> dict:
    return {"model": GGUF_MODEL, "prompt": "a red cat <lora:flux-detail:0.8>", "seed": 5, "steps": 3, "width": 64,
            "height": 64, "cfg_scale": 3.5, "loras": [{"name": "flux-style-xlabs", "weight": 0.6}],
            "text_encoders": [FP8_T5],
            "ip_adapters": [{"adapter": "FLUX XLabs", "images": [str(pack / "images" / "red-circle.png")], "scale": 0.7}],
            **fields}  # fmt: skip


@pytest.fixture(scope="module")
def engine(comfy, pack) -> Engine:
    return Engine([comfy / "models", pack])


@pytest.fixture(scope="module")
def expected(engine, pack):
    return engine.generate(request(pack))


def test_the_tree_runs_with_the_named_t5_and_says_which_parts_and_why(engine, expected, pack, comfy):
    parts = expected.info["model_parts"]
    assert {role: p["name"] for role, p in parts.items()} == {"vae": "ae", "clip_l": "clip_l", "t5xxl": FP8_T5}
    assert "text_encoders" in parts["t5xxl"]["why"] and parts["t5xxl"]["quantization"] == "fp8_e4m3fn"
    assert "only" in parts["vae"]["why"]  # the one 16-channel VAE in the tree
    assert [lo["name"] for lo in expected.info["loras"]] == ["flux-detail", "flux-style-xlabs"]
    assert expected.info["ip_adapters"][0]["adapter"] == "FLUX XLabs"
    # each piece acts: without the unit, without the LoRAs, with the fp16 T5 the picture changes
    without_unit = engine.generate(request(pack, ip_adapters=[]))
    without_loras = engine.generate(request(pack, prompt="a red cat", loras=[]))
    fp16_t5 = engine.generate(request(pack, text_encoders=[]))
    assert fp16_t5.info["model_parts"]["t5xxl"]["name"] == "t5xxl_fp16"  # two T5s: ComfyUI's usual name breaks the tie
    for other in (without_unit, without_loras, fp16_t5):
        assert max_diff(other.images[0], expected.images[0]) > 0
    # and back: the same request again gives the same pixels (nothing was left behind by the others)
    assert max_diff(engine.generate(request(pack)).images[0], expected.images[0]) == 0


def test_a_missing_part_is_refused_naming_the_candidates(comfy, pack, tmp_path):
    lonely = tmp_path / "models"
    shutil.copytree(comfy / "models" / "unet", lonely / "unet")
    shutil.copytree(comfy / "models" / "vae", lonely / "vae")
    with pytest.raises(MissingPartError) as refused:
        Engine([lonely, pack]).generate(request(pack, text_encoders=[], loras=[], prompt="a cat"))
    assert "clip_l" in str(refused.value) or "CLIP" in str(refused.value)


def test_the_cli_gives_the_engines_pixels(comfy, pack, expected, tmp_path):
    out = tmp_path / "cli.png"
    done = subprocess.run([
        sys.executable, "-m", "imprompt.cli", "generate", "--models", str(comfy / "models"), "--models", str(pack),
        "--model", GGUF_MODEL, "--prompt", "a red cat <lora:flux-detail:0.8>", "--lora", "flux-style-xlabs:0.6",
        "--text-encoder", FP8_T5, "--seed", "5", "--steps", "3", "--width", "64", "--height", "64", "--cfg-scale", "3.5",
        "--ip", f"FLUX XLabs:{pack / 'images' / 'red-circle.png'}:0.7", "--out", str(out), "--json",
    ], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["model_parts"]["t5xxl"]["name"] == FP8_T5
    assert max_diff(Image.open(out).convert("RGB"), expected.images[0]) == 0


def decoded(image: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[-1]))).convert("RGB")


def test_the_http_api_gives_the_engines_pixels_in_forges_form(engine, pack, expected):
    with running_server(engine) as url, httpx.Client(base_url=url, timeout=120) as client:
        modules = client.get("/sdapi/v1/sd-modules").json()
        assert {m["model_name"] for m in modules} >= {"ae.safetensors", "clip_l.safetensors", f"{FP8_T5}.safetensors"}
        forge = {"prompt": "a red cat <lora:flux-detail:0.8> <lora:flux-style-xlabs:0.6>", "seed": 5, "steps": 3,
                 "width": 64, "height": 64, "cfg_scale": 3.5,
                 "override_settings": {"sd_model_checkpoint": GGUF_MODEL,
                                       "forge_additional_modules": [f"/forge/models/text_encoder/{FP8_T5}.safetensors"]},
                 "ip_adapter": [{"adapter": "FLUX XLabs", "images": [str(pack / "images" / "red-circle.png")],
                                 "scale": 0.7}]}  # fmt: skip
        a1111 = client.post("/sdapi/v1/txt2img", json=forge)
        assert a1111.status_code == 200, a1111.text
        assert json.loads(a1111.json()["info"])["model_parts"]["t5xxl"]["name"] == FP8_T5
        assert max_diff(decoded(a1111.json()["images"][0]), expected.images[0]) == 0


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_picks_the_parts_and_gives_the_engines_pixels(engine, pack, browser, expected):  # noqa: F811
    with running_server(engine) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector(f"#model option[value='{GGUF_MODEL}']", state="attached")
        page.select_option("#model", GGUF_MODEL)
        page.wait_for_selector("#model-parts .model-part")  # after the page has set the server's model
        roles = page.eval_on_selector_all(".model-part", "els => els.map(e => e.dataset.role)")
        assert roles == ["vae", "clip_l", "t5xxl"]
        page.wait_for_function("[...document.querySelectorAll('#lora-picker option')].some(o => o.value === 'flux-detail')")
        assert {o for o in page.eval_on_selector_all("#lora-picker option", "els => els.map(e => e.value)") if o} == {
            "flux-detail", "flux-style-xlabs"}  # FLUX LoRAs are offered for the FLUX model, by the plan's own check
        page.select_option(".model-part[data-role='t5xxl']", f"{FP8_T5}.safetensors")
        page.wait_for_function("[...document.querySelectorAll('.unit .adapter option')].some(o => o.value === 'FLUX XLabs')")
        page.fill("#prompt", "a red cat <lora:flux-detail:0.8> <lora:flux-style-xlabs:0.6>")
        page.fill("#seed", "5")
        page.fill("#steps", "3")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.fill("#cfg", "3.5")
        page.select_option(".unit .adapter", "FLUX XLabs")
        page.set_input_files(".unit .images", str(pack / "images" / "red-circle.png"))
        page.wait_for_selector(".unit .previews img")
        page.fill(".unit .scale", "0.7")
        page.click("#generate")
        page.wait_for_selector("#gallery figure img", timeout=120_000)
        caption = page.text_content("#gallery figure figcaption")
        assert f"T5: {FP8_T5}" in caption
        shown = decoded(page.get_attribute("#gallery figure img", "src"))
        assert max_diff(shown, expected.images[0]) == 0
        assert errors == []
