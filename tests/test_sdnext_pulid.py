"""SD.Next's PuLID script over HTTP (`script_name` "pulid" + `script_args` on /sdapi/v1/txt2img), against a real
server on 127.0.0.1 with a real client (httpx): the payload SD.Next's own `cli/api-pulid.js` sends gives exactly the
image of the equivalent imprompt PuLID unit with pulid_flux_v0.9.1 (the file nunchaku 0.3.1 and later, SD.Next's FLUX
PuLID, loads), the script's defaults are SD.Next's (`scripts/pulid_ext.py` `ui()`: strength 0.8), arguments SD.Next
reads on SDXL only are said to have no effect on FLUX whatever their value, a null is passed on as SD.Next's API
passes it, and an argument SD.Next would fail on is a 4xx in imprompt's JSON error shape naming it.

`write_pulid_files` writes the PuLID pieces into a models root; the history and web page tests use it too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import max_diff
from server_fixtures import b64, client, decode, new_engine, post_txt2img, running_server

from imprompt import Engine
from imprompt.demo.tiny_dits import write_eva_clip, write_pulid_flux
from imprompt.demo.tiny_faces import write_facexlib_files
from tools.insightface_pack import face_image

PULID_FILE = "pulid/pulid_flux_v0.9.0.safetensors"  # the name the history and web page tests ask for
SDNEXT_FILE = "pulid/pulid_flux_v0.9.1.safetensors"  # the file SD.Next's FLUX PuLID loads, where ComfyUI keeps it
EVA_FILE = "clip/EVA02_CLIP_L_336_psz14_s6B.pt"
FLUX_WIDTH, FLUX_CAS = 32, 2  # the demo pack's tiny FLUX: width 32; 2 double + 1 single blocks take 2 CAs


def write_pulid_files(root: Path) -> Path:
    """Into models root `root`, what a PuLID FLUX request on the demo pack's tiny FLUX reads: a PuLID FLUX file
    (v0.9.0's name, other weights than `SDNEXT_FILE`'s), its EVA02-CLIP tower, a tiny antelopev2 pack (InsightFace's
    layout, unless one is there), and facexlib's RetinaFace and BiSeNet. Needs InsightFace (the `faceid` extra)."""
    from tools.insightface_pack import write_insightface_pack

    root = Path(root)
    write_eva_clip(root / EVA_FILE)
    write_pulid_flux(root / PULID_FILE, FLUX_WIDTH, FLUX_CAS, gain=4.0)
    if not (root / "insightface" / "models" / "antelopev2").is_dir():
        write_insightface_pack(root / "insightface", "antelopev2")
    write_facexlib_files(root)  # facexlib's RetinaFace (finding the face) and BiSeNet, in root/facexlib/
    return root


@pytest.fixture(scope="module")
def pulid_root(tmp_path_factory) -> Path:
    """Both PuLID FLUX files, v0.9.0's and v0.9.1's (other weights): SD.Next's script must pick v0.9.1."""
    pytest.importorskip("insightface", reason="InsightFace is the optional `faceid` extra")
    root = write_pulid_files(tmp_path_factory.mktemp("sdnext-pulid"))
    write_pulid_flux(root / SDNEXT_FILE, FLUX_WIDTH, FLUX_CAS, seed=82, gain=4.0)
    return root


@pytest.fixture(scope="module")
def url(pack, pulid_root):
    with running_server(new_engine([pack, pulid_root])) as url:
        yield url


@pytest.fixture(scope="module")
def engine(pack, pulid_root) -> Engine:
    return Engine([pack, pulid_root])


@pytest.fixture(scope="module")
def face():
    return face_image(4)


def payload(**fields) -> dict:
    return {"prompt": "a portrait", "negative_prompt": "", "seed": 7, "steps": 3, "width": 64, "height": 64,
            "cfg_scale": 3.5, "override_settings": {"sd_model_checkpoint": "tiny-flux"}, **fields}  # fmt: skip


def unit_image(engine: Engine, face, scale: float, adapter: str = "PuLID FLUX v0.9.1", **fields):
    """The same request as imprompt's own: a PuLID unit on the same face at `scale`."""
    return engine.generate(model="tiny-flux", prompt="a portrait", negative_prompt="", seed=7, steps=3, width=64,
                           height=64, cfg_scale=3.5,
                           ip_adapters=[{"adapter": adapter, "images": [face], "scale": scale}], **fields)  # fmt: skip


def test_sdnext_api_pulid_payload_gives_the_units_image(url, engine, face):
    """`cli/api-pulid.js`'s script_args (a data: URI, strength 0.9, zero 20, dpmpp_sde, v2, restore, offload, v1.1):
    with v0.9.0 and v0.9.1 both present, v0.9.1 draws it (nunchaku's PuLIDPipeline default), and v0.9.0 would not."""
    args = ["data:image/png;base64," + b64(face), 0.9, 20, "dpmpp_sde", "v2", True, True, "v1.1"]
    image, info = post_txt2img(url, payload(script_name="pulid", script_args=args))
    expected = unit_image(engine, face, 0.9)
    assert max_diff(image, expected.images[0]) == 0
    assert max_diff(image, unit_image(engine, face, 0.9, adapter="PuLID FLUX v0.9.0").images[0]) > 2
    plain = engine.generate(model="tiny-flux", prompt="a portrait", seed=7, steps=3, width=64, height=64, cfg_scale=3.5)
    assert max_diff(image, plain.images[0]) > 10, "the ID acts"
    assert not [w for w in info.get("warnings", []) if "script_args" in w or "script_name" in w], info.get("warnings")
    unit = info["ip_adapters"][0]
    assert (unit["adapter"], unit["scale"]) == ("PuLID FLUX v0.9.1", 0.9) and unit["faces"][0]["crop"]


def test_sdnext_title_and_defaults_and_what_flux_does_not_read(url, engine, face):
    """The whole title in another case, the face alone (Strength's default 0.8), a list of images (the first read);
    Zero / Sampler / Ortho / Version off their defaults, whatever they are (null, out of SD.Next's choices: its
    FLUX path never reads them), are said to do nothing on FLUX; Restore / Offload that are not true/false (SD.Next
    tests them for truth after the run) are said to change nothing drawn; a batch of 2 runs as SD.Next's script runs
    it, one image."""
    image, info = post_txt2img(url, payload(script_name="PULID: id customization", script_args=[b64(face)]))
    assert max_diff(image, unit_image(engine, face, 0.8).images[0]) == 0
    assert not info.get("warnings"), info.get("warnings")
    other = face_image(9)
    args = [[b64(face), b64(other)], 0.8, None, "ddim", "v3", "yes", None, "v2.0"]
    with client(url) as http:
        response = http.post("/sdapi/v1/txt2img", json=payload(script_name="PuLID", script_args=args, batch_size=2))
    assert response.status_code == 200, response.text[:2000]
    body = response.json()
    assert len(body["images"]) == 1
    warnings = json.loads(body["info"])["warnings"]
    for i, name in ((2, "zero"), (3, "sampler"), (4, "ortho"), (7, "version")):
        assert any(w.startswith(f"script_args.{i} ({name})=") and "no effect on FLUX" in w for w in warnings), warnings
    for i, name in ((5, "restore"), (6, "offload")):
        assert any(w.startswith(f"script_args.{i} ({name})=") and "no effect on the picture" in w for w in warnings)
    assert any("first of 2" in w for w in warnings) and any(w.startswith("batch_size=2") for w in warnings)
    assert max_diff(decode(body["images"][0]).convert("RGB"), unit_image(engine, face, 0.8).images[0]) == 0
    # a client that shifted its values (the version where restore goes) is drawn, as SD.Next draws it, and told
    image, info = post_txt2img(url, payload(script_name="pulid", script_args=[b64(face), 0.8, 20, "dpmpp_sde", "v2",
                                                                              "v1.1"]))  # fmt: skip
    assert max_diff(image, unit_image(engine, face, 0.8).images[0]) == 0
    assert [w for w in info["warnings"] if w.startswith("script_args.5 (restore)='v1.1' is not true or false")]


WRONG = [
    ("strength", {"script_args": ["FACE", "high"]}, 422, "RequestError", "script_args.1 (strength)"),
    ("strength-range", {"script_args": ["FACE", 7.5]}, 422, "RequestError", "script_args.1 (strength)"),
    ("strength-null", {"script_args": ["FACE", None]}, 422, "RequestError", "script_args.1 (strength): null"),
    ("too-many", {"script_args": ["FACE", 0.8, 20, "dpmpp_sde", "v2", False, True, "v1.1", 1]}, 422, "RequestError",
     "9 values"),
    ("no-image", {"script_args": []}, 422, "RequestError", "script_args.0 (images)"),
    ("null-image", {"script_args": [None]}, 422, "RequestError", "given null over its API, draws nothing"),
    ("not-a-list", {"script_args": "FACE"}, 422, "RequestError", "script_args: expected a list"),
    ("sdxl", {"script_args": ["FACE"], "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}, 422,
     "UnsupportedError", "script_args.3 (sampler)"),
    ("sdxl-odd", {"script_args": ["FACE", 0.8, "x", None, "v9"],
                  "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}}, 422, "UnsupportedError",
     "script_args.3 (sampler)"),
    ("sd15", {"script_args": ["FACE"], "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}, 422,
     "UnsupportedError", "SD 1.5"),
    ("face-too", {"script_args": ["FACE"], "face": {"mode": "FaceID", "source_images": ["FACE"]}}, 422,
     "RequestError", "Face script"),
    ("another-script", {"script_name": "x/y/z plot", "script_args": []}, 422, "RequestError", "script_name"),
]  # fmt: skip


@pytest.mark.parametrize("case, fields, status, error, named", WRONG, ids=[c[0] for c in WRONG])
def test_a_wrong_argument_is_refused_naming_it(url, face, case, fields, status, error, named):
    face64 = b64(face)

    def filled(value):
        if value == "FACE":
            return face64
        if isinstance(value, list):
            return [filled(v) for v in value]
        if isinstance(value, dict):
            return {k: filled(v) for k, v in value.items()}
        return value

    body = post_txt2img(url, payload(**{"script_name": "pulid", **filled(fields)}), status=status)
    assert set(body) == {"error", "detail"} and body["error"] == error, body
    assert named in body["detail"], body["detail"]


def test_sdxl_refusal_says_what_to_send_instead(url, face):
    body = post_txt2img(url, payload(script_name="pulid", script_args=[b64(face)],
                                     override_settings={"sd_model_checkpoint": "tiny-sdxl"}), status=422)  # fmt: skip
    assert "PuLID SDXL v1.1" in body["detail"] and "k-diffusion" in body["detail"] and "sampler_name" in body["detail"]


def test_control_endpoint_points_the_script_to_txt2img(url, face):
    with client(url) as http:
        response = http.post("/sdapi/v1/control", json={"prompt": "a", "script_name": "pulid", "script_args": [b64(face)],
                                                        "override_settings": {"sd_model_checkpoint": "tiny-flux"}})  # fmt: skip
    assert response.status_code == 422 and response.json()["error"] == "UnsupportedError"
    assert "/sdapi/v1/txt2img" in response.json()["detail"]


def test_without_v091_another_pulid_flux_file_is_used_and_said(pack, pulid_root, tmp_path, face):
    """Only v0.9.0 in the models folder: it is used (its tensors are v0.9.1's, its weights others), with a warning
    that SD.Next's FLUX PuLID loads v0.9.1."""
    root = tmp_path / "v090"
    shutil.copytree(pulid_root, root)
    (root / SDNEXT_FILE).unlink()
    with running_server(new_engine([pack, root])) as url:
        image, info = post_txt2img(url, payload(script_name="pulid", script_args=[b64(face), 0.7]))
    expected = Engine([pack, root]).generate(
        model="tiny-flux", prompt="a portrait", negative_prompt="", seed=7, steps=3, width=64, height=64, cfg_scale=3.5,
        ip_adapters=[{"adapter": "PuLID FLUX v0.9.0", "images": [face], "scale": 0.7}])  # fmt: skip
    assert max_diff(image, expected.images[0]) == 0
    assert info["ip_adapters"][0]["adapter"] == "PuLID FLUX v0.9.0"
    warned = [w for w in info["warnings"] if "loads pulid_flux_v0.9.1" in w and "used PuLID FLUX v0.9.0" in w]
    assert warned, info["warnings"]
