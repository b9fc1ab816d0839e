"""The web page in a real headless Chromium (Debian's, driven by Playwright): what a person does with it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Error as PlaywrightError
from server_fixtures import new_engine, running_server

from imprompt.models.store import controlnet_hash

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("IMPROMPT_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],  # fmt: skip
        )
        yield browser
        browser.close()


def generate_with(page, adapter: str, image: Path, steps: int) -> str:
    """What a person does in the first unit: pick the adapter, upload the image, set a small size, Generate.
    Returns the caption of the first image in the gallery."""
    page.select_option(".unit .adapter", adapter)
    page.set_input_files(".unit .images", str(image))
    page.wait_for_selector(".unit .previews img")
    for field, value in (("#steps", str(steps)), ("#width", "64"), ("#height", "64"), ("#seed", "1")):
        page.fill(field, value)
    page.click("#generate")
    page.wait_for_selector("#gallery figure img", timeout=120_000)
    return page.text_content("#gallery figcaption")


def test_pick_adapter_upload_generate_and_see_the_encoder(pack, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_server(new_engine(pack)) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)

        # the adapter list shows only adapters fitting the model, with the encoder each needs
        page.wait_for_selector(".unit .adapter option", state="attached")
        options = page.locator(".unit .adapter option").all_text_contents()
        assert any(o.startswith("Base ViT-G — needs image_embeds[1280]") for o in options)
        assert not any("SDXL" in o for o in options)

        caption = generate_with(page, "Base ViT-G", pack / "images" / "red-circle.png", steps=4)
        assert "Base ViT-G ← IP-Adapter/sdxl_models/image_encoder (loaded)" in caption
        page.wait_for_selector("#events li.encoder_loaded")
        event = page.text_content("#events li.encoder_loaded")
        assert "IP-Adapter/sdxl_models/image_encoder for Base ViT-G" in event and "image_embeds[1280]" in event

        # switching the model filters the adapter list
        page.select_option("#model", "tiny-sdxl")
        page.wait_for_function("[...document.querySelectorAll('.unit .adapter option')].some(o => o.value === 'Base SDXL')")
        assert "Base ViT-G" not in page.locator(".unit .adapter option").all_text_contents()

        page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
        assert errors == []


def test_flux_and_sd35_adapters_are_listed_with_their_encoders_and_true_cfg_reaches_flux(pack, browser, engine):
    """Picking FLUX lists XLabs' adapters with CLIP ViT-L and shows the true-CFG field; a FLUX image made on the
    page (with a negative prompt and true CFG) equals the engine's for the same request. SD 3.5 lists InstantX's
    adapter with SigLIP, and hides the field."""
    from conftest import max_diff
    from PIL import Image

    with running_server(new_engine(pack)) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector(".unit .adapter option", state="attached")
        assert page.is_hidden("#true-cfg-field")
        page.select_option("#model", "tiny-flux")
        page.wait_for_function("[...document.querySelectorAll('.unit .adapter option')].some(o => o.value === 'FLUX XLabs')")
        options = page.locator(".unit .adapter option").all_text_contents()
        assert sorted(options) == ["FLUX XLabs v2 — needs image_embeds[768] (ViT-L-14) → clip_vision_l",
                                   "FLUX XLabs — needs image_embeds[768] (ViT-L-14) → clip_vision_l"]  # fmt: skip
        assert page.is_visible("#true-cfg-field")
        page.fill("#negative-prompt", "blue")
        page.fill("#cfg", "3.5")
        page.fill("#true-cfg", "2")
        page.fill("#prompt", "a cat")
        page.fill(".unit .scale", "0.6")
        caption = generate_with(page, "FLUX XLabs", pack / "images" / "red-circle.png", steps=3)
        assert "FLUX XLabs ← clip_vision_l" in caption
        src = page.get_attribute("#gallery figure img", "src")
        import base64
        import io

        shown = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
        expected = engine.generate(model="tiny-flux", prompt="a cat", negative_prompt="blue", seed=1, steps=3,
                                   width=64, height=64, cfg_scale=3.5, true_cfg_scale=2.0,
                                   ip_adapters=[{"adapter": "FLUX XLabs", "scale": 0.6,
                                                 "images": [str(pack / "images" / "red-circle.png")]}])  # fmt: skip
        assert max_diff(shown, expected.images[0]) == 0
        page.select_option("#model", "tiny-sd35")
        page.wait_for_function("[...document.querySelectorAll('.unit .adapter option')].some(o => o.value === 'SD3.5 Large')")
        assert page.locator(".unit .adapter option").all_text_contents() == [
            "SD3.5 Large — needs siglip hidden_states[1152] (SigLIP-so400m-14-384) → siglip-so400m-patch14-384"]
        assert page.is_hidden("#true-cfg-field")
        assert errors == []


def test_an_error_is_shown_and_the_page_keeps_working(pack, browser):
    with running_server(new_engine(pack)) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".unit .adapter option", state="attached")
        page.set_input_files(".unit .images", str(pack / "images" / "red-circle.png"))
        page.fill("#width", "65")  # not a multiple of 8
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#error').textContent.length > 0")
        assert "422" in page.text_content("#error") and "multiple of 8" in page.text_content("#error")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.click("#generate")
        page.wait_for_selector("#gallery figure img", timeout=120_000)
        assert page.text_content("#error") == ""


def test_page_behind_an_api_key(pack, browser):
    """With --api-key the browser is challenged (Basic), and once the key is given as password the page's own
    API calls carry it: the adapter list loads and a generation completes."""
    with running_server(new_engine(pack), api_key="s3cret") as url:
        anonymous = browser.new_context()
        try:  # headless Chromium, which cannot show the password dialog, fails the navigation instead
            assert anonymous.new_page().goto(url).status == 401
        except PlaywrightError as exc:
            assert "ERR_INVALID_AUTH_CREDENTIALS" in str(exc)
        anonymous.close()

        context = browser.new_context(http_credentials={"username": "me", "password": "s3cret"})
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        assert page.goto(url).status == 200
        page.wait_for_selector(".unit .adapter option", state="attached")
        page.fill("#prompt", "a [red:blue:0.5] cat")
        caption = generate_with(page, "Base", pack / "images" / "red-circle.png", steps=4)
        assert "Base ← IP-Adapter/models/image_encoder" in caption
        # the schedule the prompt made: until step 2 (0.5 x 4) red, counted as A1111 counts its calls
        assert "prompt steps 1-3: a red cat\nprompt steps 4-4: a blue cat" in caption
        assert errors == []
        context.close()


def test_a_models_own_defaults_are_where_the_page_starts(pack, browser, tmp_path):
    """A model may carry the settings its maker suggests (imprompt.json beside it, as the trained demo model
    does): selecting it puts them in the form, so a newcomer's first click shows the reference steering."""
    import json

    models = tmp_path / "models"
    shutil.copytree(pack / "diffusers" / "tiny-sd15", models / "suggests")
    defaults = {"prompt": "", "cfg_scale": 1.5, "steps": 12, "ip_scale": 1.0}
    (models / "suggests" / "imprompt.json").write_text(json.dumps({"defaults": defaults}))
    with running_server(new_engine([models, pack / "diffusers", pack / "IP-Adapter"])) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".unit .adapter option", state="attached")
        assert page.input_value("#model") == "suggests"  # the server's current model: the first one
        assert (page.input_value("#prompt"), page.input_value("#cfg"), page.input_value("#steps")) == ("", "1.5", "12")
        assert page.input_value(".unit .scale") == "1"
        page.click("#add-unit")
        assert page.locator(".unit .scale").nth(1).input_value() == "1"
        page.select_option("#model", "tiny-sd15")  # suggests nothing: the page's own starting values again
        page.wait_for_function("document.getElementById('cfg').value === '7'", timeout=10_000)
        assert (page.input_value("#prompt"), page.input_value("#cfg"), page.input_value("#steps")) == ("a shape", "7", "20")
        assert page.locator(".unit .scale").nth(0).input_value() == "0.7"


def test_pick_a_lora_for_the_model_and_see_it_used(pack, browser, tmp_path):
    from tools.extra_models import write_extra_models

    extras = write_extra_models(tmp_path / "a1111", pack)
    with running_server(new_engine([pack, extras])) as url:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector("#lora-picker option[value='detail-sd15']", state="attached")
        names = page.eval_on_selector_all("#lora-picker option", "options => options.map(o => o.value)")
        assert "style-sdxl" not in names and {"detail-sd15", "style-sd15"} <= set(names)  # only what fits SD 1.5
        page.fill("#prompt", "a cat")
        page.select_option("#lora-picker", "detail-sd15")
        assert page.input_value("#prompt") == "a cat <lora:detail-sd15:1>"
        for field, value in (("#steps", "2"), ("#width", "64"), ("#height", "64"), ("#seed", "1")):
            page.fill(field, value)
        page.click("#generate")
        page.wait_for_selector("#gallery figure img", timeout=120_000)
        caption = page.text_content("#gallery figcaption")
        assert "LoRAs: detail-sd15 (1)" in caption and 'Lora hashes: "detail-sd15: ' in caption
        page.wait_for_selector("#events li.lora_loaded")
        page.select_option("#model", "tiny-sdxl")
        page.wait_for_selector("#lora-picker option[value='style-sdxl']", state="attached")
        assert "detail-sd15" not in page.eval_on_selector_all("#lora-picker option", "os => os.map(o => o.value)")
        assert errors == []


def test_a_faceid_unit_shows_the_face_crop_it_used(pack, browser, tmp_path):
    """FaceID Plus v2: the Structure field appears for it, the face is found by InsightFace (its pack where ComfyUI
    keeps it), and the result shows the aligned crop the unit used."""
    pytest.importorskip("insightface", reason="InsightFace is the optional `faceid` extra")
    from diffusers_reference import VIT_H, pipeline
    from transformers import CLIPVisionConfig

    from tools.extra_models import faceid_plus_adapter, write
    from tools.insightface_pack import face_image, write_insightface_pack

    tree = tmp_path / "models"
    width = CLIPVisionConfig.from_pretrained(pack / VIT_H).hidden_size
    write(tree / "ipadapter" / "ip-adapter-faceid-plusv2_sd15.safetensors",
          faceid_plus_adapter(pipeline(pack), seed=11, clip_width=width))  # fmt: skip
    write_insightface_pack(tree / "insightface")
    face_image(seed=4).save(tmp_path / "face.png")
    with running_server(new_engine([pack, tree])) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector(".unit .adapter option[value='FaceID Plus v2']", state="attached")
        assert not page.is_visible(".unit .structure")
        page.select_option(".unit .adapter", "FaceID Plus v2")
        assert page.is_visible(".unit .structure")
        page.fill(".unit .structure", "0.5")
        caption = generate_with(page, "FaceID Plus v2", tmp_path / "face.png", steps=2)
        assert "FaceID Plus v2 ← IP-Adapter/models/image_encoder" in caption
        crop = page.locator("#gallery figure img.face-crop")
        assert crop.count() == 1 and "face used by unit 1, image 1" in crop.get_attribute("alt")
        assert page.evaluate("document.querySelector('img.face-crop').naturalWidth") == 112
        page.wait_for_selector("#events li.face_analysis_loaded")
        page.screenshot(path=str(ARTIFACTS / "web-page-faceid.png"), full_page=True)
        assert errors == []


def decoded(src: str):
    """The picture an <img> shows from a data: URL."""
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def test_a_controlnet_unit_beside_an_image_prompt_equals_the_engine_and_shows_its_map(pack, browser, nets):
    """A ControlNet unit (preprocessor canny, a SD 1.5 ControlNet, weight, window, control mode) beside an image
    prompt: the picture equals the engine's own for the same request, and the control map canny made is shown.
    The model list offers only the ControlNets that fit the selected model; removing the unit removes it."""
    from conftest import max_diff

    from imprompt import Engine

    models = nets["sd15"].parent.parent
    triangle = pack / "images" / "white-triangle.png"
    with running_server(new_engine([pack, models])) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector(".unit .adapter option", state="attached")
        assert page.locator(".control-unit").count() == 0  # a request without ControlNet runs as before
        page.click("#add-control")
        page.wait_for_selector(".control-unit .module option[value='canny']", state="attached")
        values = "os => os.map(o => o.value)"
        modules = page.eval_on_selector_all(".control-unit .module option", values)
        assert modules[0] == "none"
        offered = page.eval_on_selector_all(".control-unit .cn-model option", values)
        assert sorted(offered) == ["control_tiny_sd15_canny", "controlnet/tiny-sd15-controlnet"]  # SD 1.5's, not SDXL's
        page.select_option(".control-unit .cn-model", "controlnet/tiny-sd15-controlnet")
        page.select_option(".control-unit .module", "canny")
        page.set_input_files(".control-unit .control-image", str(triangle))
        page.wait_for_selector(".control-unit .previews img")
        page.fill(".control-unit .cn-weight", "0.8")
        page.fill(".control-unit .cn-end", "0.8")
        page.select_option(".control-unit .control-mode", "My prompt is more important")
        caption = generate_with(page, "Base", pack / "images" / "red-circle.png", steps=3)
        title = f"tiny-sd15-controlnet [{controlnet_hash(nets['sd15'])}]"  # as /controlnet/model_list names it
        assert (f"ControlNet 1: {title} ← canny (weight 0.8, window 0-0.8, My prompt is more "
                "important)") in caption

        expected = Engine([pack, models]).generate(
            model="tiny-sd15", prompt="a shape", seed=1, steps=3, width=64, height=64,
            ip_adapters=[{"adapter": "Base", "scale": 0.7, "images": [str(pack / "images" / "red-circle.png")]}],
            controlnets=[{"model": "controlnet/tiny-sd15-controlnet", "image": str(triangle), "module": "canny",
                          "weight": 0.8, "end": 0.8, "control_mode": "My prompt is more important"}],
        )  # fmt: skip
        assert max_diff(decoded(page.get_attribute("#gallery figure img", "src")), expected.images[0]) == 0
        shown = page.locator("#gallery figure img.control-map")
        assert shown.count() == 1 and "control map of ControlNet 1 (canny)" in shown.get_attribute("alt")
        assert max_diff(decoded(shown.get_attribute("src")), expected.control_images[0]) == 0
        page.wait_for_selector("#events li.controlnet_loaded")
        assert "tiny-sd15-controlnet" in page.text_content("#events li.controlnet_loaded")

        # switching the model filters the ControlNet list (the refused Control-LoRA is never offered)
        page.select_option("#model", "tiny-sdxl")
        page.wait_for_function("[...document.querySelectorAll('.control-unit .cn-model option')]"
                               ".some(o => o.value === 'controlnet/tiny-sdxl-controlnet')")  # fmt: skip
        offered = page.eval_on_selector_all(".control-unit .cn-model option", values)
        assert sorted(offered) == ["controlnet/tiny-sdxl-controlnet", "controlnet/tiny-sdxl-union-promax"]
        # a Union model is told the control type: by default the preprocessor's, or the one picked
        assert page.is_hidden(".control-unit .union-type")
        page.select_option(".control-unit .cn-model", "controlnet/tiny-sdxl-union-promax")
        assert page.is_visible(".control-unit .union-type")
        types = page.locator(".control-unit .union-type option").all_text_contents()
        assert types[0] == "from the preprocessor" and types[1:3] == ["openpose", "depth"]
        page.screenshot(path=str(ARTIFACTS / "web-page-controlnet.png"), full_page=True)
        page.click(".control-unit .remove")
        assert page.locator(".control-unit").count() == 0
        assert errors == []


def test_a_controlnet_unit_without_an_image_is_refused_on_the_page(pack, browser, nets):
    """A ControlNet unit the person added but gave no image is not dropped silently: the page says which unit."""
    with running_server(new_engine([pack, nets["sd15"].parent.parent])) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector(".unit .adapter option", state="attached")
        page.click("#add-control")
        page.wait_for_selector(".control-unit .cn-model option", state="attached")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#error').textContent.length > 0")
        assert "ControlNet 1: no control image" in page.text_content("#error")
        assert page.locator("#gallery figure").count() == 0
