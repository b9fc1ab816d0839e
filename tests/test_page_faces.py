"""The web page with the image prompts that bring their own encoder or face pack, in a real headless Chromium: an
InstantID unit on SDXL (a face uploaded; the face crop and the keypoints its IdentityNet read shown beside the
result, which is the engine's image), a PuLID unit on FLUX (the aligned face crop it read shown, the engine's
image and crop), and FLUX Redux listed on FLUX with what it needs."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from conftest import max_diff
from PIL import Image
from server_fixtures import new_engine, running_server
from test_page import ARTIFACTS, CHROMIUM, browser  # noqa: F401 - the page tests' headless Chromium, as a fixture
from test_sdnext_pulid import write_pulid_files

from imprompt import Engine

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
)


@pytest.fixture(scope="module")
def faces_root(pack, tmp_path_factory) -> Path:
    """InstantX's layout (checkpoints/ip-adapter.bin + ControlNetModel/), a tiny antelopev2 pack, a FLUX Redux with
    its SigLIP beside it, PuLID FLUX's pieces (`write_pulid_files`), and a face picture to upload."""
    pytest.importorskip("insightface", reason="InsightFace is the optional `faceid` extra")
    from tools.extra_models import write_redux_model
    from tools.insightface_pack import face_image, write_insightface_pack
    from tools.instantid_models import write_instantid

    root = tmp_path_factory.mktemp("page-faces")
    write_instantid(root, pack)
    write_insightface_pack(root / "insightface", "antelopev2")
    write_redux_model(root, pack)
    write_pulid_files(root)
    face_image(5).save(root / "face.png")
    return root


def decoded(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def test_instantid_unit_shows_its_face_crop_and_keypoints_and_gives_the_engines_pixels(pack, faces_root, browser):  # noqa: F811
    with running_server(new_engine([pack, faces_root])) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector(".unit .adapter option", state="attached")

        # FLUX lists Redux with the SigLIP beside it; a Redux unit reads no window and no mask, a downsample factor
        page.select_option("#model", "tiny-flux")
        page.wait_for_function("[...document.querySelectorAll('.unit .adapter option')].some(o => o.value === 'FLUX Redux')")
        options = page.locator(".unit .adapter option").all_text_contents()
        assert "FLUX Redux — needs siglip last_hidden_state[1152] (SigLIP-so400m-14-384) → style_models/image_encoder" in options
        page.select_option(".unit .adapter", "FLUX Redux")
        assert page.is_visible(".unit .downsample-field") and page.is_hidden(".unit .window-field")
        assert page.is_hidden(".unit .mask-field") and page.is_hidden(".unit .identitynet-field")
        assert "appended to the prompt's T5 tokens" in page.text_content(".unit .needs")

        # SDXL lists InstantID (InstantX names the file ip-adapter.bin: its tensors name it) with its pack and IdentityNet
        page.select_option("#model", "tiny-sdxl")
        page.wait_for_function("[...document.querySelectorAll('.unit .adapter option')].some(o => o.value === 'InstantID')")
        options = page.locator(".unit .adapter option").all_text_contents()
        assert ("InstantID — needs InsightFace antelopev2 face_embeds[512] → InsightFace antelopev2 "
                "+ IdentityNet checkpoints/ControlNetModel") in options
        page.select_option(".unit .adapter", "InstantID")
        needs = page.text_content(".unit .needs")
        assert "face: InsightFace antelopev2" in needs and "IdentityNet: checkpoints/ControlNetModel" in needs
        assert page.is_visible(".unit .identitynet-field") and page.is_visible(".unit .pose-field")
        assert page.is_hidden(".unit .mask-field") and page.is_hidden(".unit .downsample-field")

        page.fill("#prompt", "a cat")
        page.fill(".unit .scale", "0.8")
        page.fill(".unit .controlnet-scale", "0.6")
        page.set_input_files(".unit .images", str(faces_root / "face.png"))
        page.wait_for_selector(".unit .previews img")
        for field, value in (("#steps", "3"), ("#width", "64"), ("#height", "64"), ("#seed", "1"), ("#cfg", "7")):
            page.fill(field, value)
        page.click("#generate")
        page.wait_for_selector("#gallery figure img.face-keypoints", timeout=120_000)
        caption = page.text_content("#gallery figcaption")
        assert "+ IdentityNet checkpoints/ControlNetModel (weight 0.6)" in caption, caption
        crop = page.locator("#gallery figure img.face-crop")
        assert crop.count() == 1 and "face used by unit 1, image 1" in crop.get_attribute("alt")
        keypoints = page.locator("#gallery figure img.face-keypoints")
        assert "keypoints read by unit 1's IdentityNet checkpoints/ControlNetModel" in keypoints.get_attribute("alt")

        expected = Engine([pack, faces_root]).generate(
            model="tiny-sdxl", prompt="a cat", negative_prompt="", seed=1, steps=3, width=64, height=64, cfg_scale=7.0,
            ip_adapters=[{"adapter": "InstantID", "images": [str(faces_root / "face.png")], "scale": 0.8,
                          "controlnet_scale": 0.6}])  # fmt: skip
        assert max_diff(decoded(page.get_attribute("#gallery figure img", "src")), expected.images[0]) == 0
        unit = expected.info["ip_adapters"][0]
        shown_kps = decoded(keypoints.get_attribute("src"))
        assert max_diff(shown_kps, decoded("," + unit["keypoints"])) == 0 and shown_kps.getextrema() != ((0, 0),) * 3
        assert max_diff(decoded(crop.get_attribute("src")), decoded("," + unit["faces"][0]["crop"])) == 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page-instantid.png"), full_page=True)
        assert errors == []


def test_pulid_unit_shows_the_face_crop_it_read_and_gives_the_engines_pixels(pack, faces_root, browser):  # noqa: F811
    with running_server(new_engine([pack, faces_root])) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        page.wait_for_selector(".unit .adapter option", state="attached")

        # FLUX lists PuLID with its face pack and EVA tower
        page.select_option("#model", "tiny-flux")
        page.wait_for_function("[...document.querySelectorAll('.unit .adapter option')].some(o => o.value === 'PuLID FLUX v0.9.0')")
        options = page.locator(".unit .adapter option").all_text_contents()
        assert any(o.startswith("PuLID FLUX v0.9.0 — needs InsightFace antelopev2 face_embeds[512] + eva-clip") and
                   o.endswith("→ EVA02_CLIP_L_336_psz14_s6B") for o in options), options  # fmt: skip
        page.select_option(".unit .adapter", "PuLID FLUX v0.9.0")
        assert "encoder: EVA02_CLIP_L_336_psz14_s6B" in page.text_content(".unit .needs")
        assert page.is_hidden(".unit .mask-field")  # PuLID reads no mask: the engine refuses one

        page.fill("#prompt", "a cat")
        page.fill(".unit .scale", "0.8")
        page.set_input_files(".unit .images", str(faces_root / "face.png"))
        page.wait_for_selector(".unit .previews img")
        for field, value in (("#steps", "3"), ("#width", "64"), ("#height", "64"), ("#seed", "1"), ("#cfg", "3.5")):
            page.fill(field, value)
        page.click("#generate")
        page.wait_for_selector("#gallery figure img.face-crop", timeout=120_000)
        caption = page.text_content("#gallery figcaption")
        assert "PuLID FLUX v0.9.0 ← EVA02_CLIP_L_336_psz14_s6B (ID tokens: computed)" in caption, caption
        assert "undefined" not in caption, caption
        crop = page.locator("#gallery figure img.face-crop")
        assert crop.count() == 1 and "face used by unit 1, image 1" in crop.get_attribute("alt")
        assert page.locator("#gallery figure img.face-keypoints").count() == 0  # InstantID's, not PuLID's

        expected = Engine([pack, faces_root]).generate(
            model="tiny-flux", prompt="a cat", negative_prompt="", seed=1, steps=3, width=64, height=64, cfg_scale=3.5,
            ip_adapters=[{"adapter": "PuLID FLUX v0.9.0", "images": [str(faces_root / "face.png")], "scale": 0.8}])
        assert max_diff(decoded(page.get_attribute("#gallery figure img", "src")), expected.images[0]) == 0
        unit = expected.info["ip_adapters"][0]
        shown = decoded(crop.get_attribute("src"))
        assert max_diff(shown, decoded("," + unit["faces"][0]["crop"])) == 0 and shown.getextrema() != ((0, 0),) * 3
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-page-pulid.png"), full_page=True)
        assert errors == []
