"""FaceID adapters from given face embeddings: each request equals diffusers' own FaceID path (load_ip_adapter,
which also loads the LoRA the file embeds) on the same inputs; the embedded LoRA acts exactly while its unit does,
beside the user's own LoRAs, and leaves nothing behind."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import max_diff
from diffusers_reference import VIT_H, pipeline
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from imprompt import Engine
from imprompt.errors import IncompatibleError, MissingFaceAnalysisError, NoFaceError, RequestError, UnsupportedError
from tools.extra_models import faceid_adapter, faceid_plus_adapter, kohya_lora, write
from tools.insightface_pack import face_image, no_face_image, write_insightface_pack

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def faceid_root(pack, tmp_path_factory):
    """h94 FaceID files for the tiny models (Base with its LoRA, Portrait with 16 tokens and no LoRA, an SDXL
    Base), a user LoRA, and face embeddings as files."""
    root = tmp_path_factory.mktemp("faceid")
    sd15, sdxl = pipeline(pack), pipeline(pack, "tiny-sdxl")
    write(root / "ipadapter" / "ip-adapter-faceid_sd15.safetensors", faceid_adapter(sd15, seed=1))
    write(root / "ipadapter" / "ip-adapter-faceid-portrait_sd15.safetensors",
          faceid_adapter(sd15, seed=2, tokens=16, lora_rank=None))  # fmt: skip
    write(root / "ipadapter" / "ip-adapter-faceid_sdxl.safetensors", faceid_adapter(sdxl, seed=3))
    write(root / "Lora" / "detail-sd15.safetensors", kohya_lora(sd15, seed=4))
    return root


@pytest.fixture(scope="module")
def faceid_engine(pack, faceid_root):
    return Engine([pack, faceid_root])


@pytest.fixture(scope="module")
def insightface_root(tmp_path_factory):
    """A tiny stand-in for InsightFace's buffalo_l pack (real SCRFD / ArcFace signatures), in its own layout."""
    pytest.importorskip("insightface", reason="InsightFace is the optional `faceid` extra")
    root = tmp_path_factory.mktemp("insightface")
    write_insightface_pack(root)
    return root


@pytest.fixture(scope="module")
def plus_root(pack, insightface_root, tmp_path_factory):
    """FaceID Plus v1 and v2 files (same tensors, told apart by name, as upstream) for both families; InsightFace's
    pack where ComfyUI keeps it (`models/insightface`)."""
    root = tmp_path_factory.mktemp("faceid-plus")
    sd15, sdxl = pipeline(pack), pipeline(pack, "tiny-sdxl")
    width = CLIPVisionModelWithProjection.from_pretrained(pack / VIT_H).config.hidden_size  # the tiny ViT-H's
    plus = faceid_plus_adapter(sd15, seed=11, clip_width=width)
    write(root / "ipadapter" / "ip-adapter-faceid-plus_sd15.safetensors", plus)
    write(root / "ipadapter" / "ip-adapter-faceid-plusv2_sd15.safetensors", plus)
    write(root / "ipadapter" / "ip-adapter-faceid-plusv2_sdxl.safetensors", faceid_plus_adapter(sdxl, 12, width))
    write(root / "ipadapter" / "ip-adapter-faceid-portrait_sdxl_unnorm.safetensors",
          faceid_adapter(sdxl, seed=13, tokens=16, lora_rank=None))  # fmt: skip
    shutil.copytree(insightface_root / "models", root / "insightface" / "models")
    return root


@pytest.fixture(scope="module")
def plus_engine(pack, faceid_root, plus_root):
    return Engine([pack, faceid_root, plus_root])


def insightface(root, image, raw=False):
    """What h94's examples, diffusers' FaceID docs and SD.Next do: BGR in, the first face, its normed embedding and
    the aligned 224 crop (BGR, handed to the CLIP processor as it is)."""
    import cv2
    from insightface.app import FaceAnalysis
    from insightface.utils import face_align

    app = FaceAnalysis(name="buffalo_l", root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    bgr = cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR)
    face = app.get(bgr)[0]
    embedding = face.embedding if raw else face.normed_embedding
    return torch.from_numpy(embedding)[None], face_align.norm_crop(bgr, landmark=face.kps, image_size=224)


def faces(count: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randn(count, 512, generator=torch.Generator().manual_seed(seed))


def generate(engine, units, prompt="a cat", model="tiny-sd15"):
    return engine.generate(model=model, prompt=prompt, seed=1, steps=STEPS, width=SIZE, height=SIZE, ip_adapters=units)


def diffusers_faceid(pack, root, file, scale, face_embeddings, model="tiny-sd15", loras=None, crops=None,
                     shortcut=None):  # fmt: skip
    """diffusers' documented FaceID path: load_ip_adapter (no image encoder), ip_adapter_image_embeds of
    cat([zeros, faces]) [2, faces, 512]; `loras`: user LoRAs loaded beside and set by hand with faceid_0 at 1.
    FaceID Plus (`crops`): the crops' hidden states from prepare_ip_adapter_image_embeds with the ViT-H encoder set
    as the projection's `clip_embeds`, and `shortcut` (v2: the shortcut's scale) set on it, as the docs show."""
    pipe = pipeline(pack, model)
    pipe.load_ip_adapter(str(root / "ipadapter"), subfolder="", weight_name=file, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    if crops is not None:
        pipe.image_encoder = CLIPVisionModelWithProjection.from_pretrained(pack / VIT_H, dtype=torch.float32).eval()
        pipe.feature_extractor = CLIPImageProcessor(size=224, crop_size=224)
        clip_embeds = pipe.prepare_ip_adapter_image_embeds([crops], None, torch.device("cpu"), 1, True)[0]
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds, layer.shortcut = clip_embeds, shortcut is not None
        layer.shortcut_scale = 1.0 if shortcut is None else shortcut
    if loras:
        for name in loras:
            pipe.load_lora_weights(str(root / "Lora"), weight_name=f"{name}.safetensors", adapter_name=name.replace("-", "_"))
        pipe.set_adapters(["faceid_0", *(n.replace("-", "_") for n in loras)], [1.0, *loras.values()])
    embeds = torch.cat([torch.zeros_like(face_embeddings), face_embeddings]).unsqueeze(0)
    embeds = embeds.reshape(2, -1, 512)
    return pipe("a cat", ip_adapter_image_embeds=[embeds], num_inference_steps=STEPS, width=SIZE, height=SIZE,
                guidance_scale=7.0, generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip


def test_faceid_base_equals_diffusers_and_its_lora_acts_only_with_it(pack, faceid_root, faceid_engine):
    plain = generate(faceid_engine, []).images[0]
    result = generate(faceid_engine, [{"adapter": "FaceID Base", "face_embeddings": faces().tolist(), "scale": 0.7}])
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid_sd15.safetensors", 0.7, faces())
    assert max_diff(result.images[0], expected) <= 1
    unit = result.info["ip_adapters"][0]
    assert unit["encoder"] == "face embeddings given" and unit["variant"] == "faceid"
    assert [e["lora"] for e in result.info["events"] if e["event"] == "lora_loaded"] == ["FaceID Base (its LoRA)"]
    assert max_diff(generate(faceid_engine, []).images[0], plain) == 0  # the FaceID LoRA is off again


def test_faceid_lora_coexists_with_the_users_lora(pack, faceid_root, faceid_engine):
    """diffusers' FaceID loading switches the user's LoRAs off (set_adapters([faceid_0])); imprompt keeps both,
    as the reference sets them by hand."""
    unit = {"adapter": "FaceID Base", "face_embeddings": faces(seed=5).tolist(), "scale": 0.6}
    result = generate(faceid_engine, [unit], prompt="a cat <lora:detail-sd15:0.7>")
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid_sd15.safetensors", 0.6, faces(seed=5),
                                loras={"detail-sd15": 0.7})  # fmt: skip
    assert max_diff(result.images[0], expected) <= 1
    alone = generate(Engine([pack, faceid_root]), [], prompt="a cat <lora:detail-sd15:0.7>").images[0]
    assert max_diff(generate(faceid_engine, [], prompt="a cat <lora:detail-sd15:0.7>").images[0], alone) == 0


def test_portrait_with_several_faces_from_a_file(pack, faceid_root, faceid_engine, tmp_path):
    several = faces(3, seed=7)
    np.save(tmp_path / "faces.npy", several.numpy())
    result = generate(faceid_engine, [{"adapter": "FaceID Portrait", "face_embeddings": str(tmp_path / "faces.npy"),
                                       "scale": 0.8}])  # fmt: skip
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid-portrait_sd15.safetensors", 0.8, several)
    assert max_diff(result.images[0], expected) <= 1
    assert result.info["ip_adapters"][0]["tokens"] == 16 and result.info["ip_adapters"][0]["images"] == 3
    save_file({"faces": several}, tmp_path / "faces.safetensors")
    again = generate(faceid_engine, [{"adapter": "FaceID Portrait", "face_embeddings": str(tmp_path / "faces.safetensors"),
                                      "scale": 0.8}])  # fmt: skip
    assert max_diff(again.images[0], result.images[0]) == 0


def test_sdxl_faceid_equals_diffusers(pack, faceid_root, faceid_engine):
    result = generate(faceid_engine, [{"adapter": "FaceID Base SDXL", "face_embeddings": faces().tolist(), "scale": 0.7}],
                      model="tiny-sdxl")  # fmt: skip
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid_sdxl.safetensors", 0.7, faces(), "tiny-sdxl")
    assert max_diff(result.images[0], expected) <= 1


@pytest.mark.parametrize(
    ("unit", "error", "words"),
    [
        ({"adapter": "FaceID Base", "face_embeddings": [[0.1] * 256]}, IncompatibleError, ["[1, 256]", "512-d"]),
        ({"adapter": "Base", "face_embeddings": [[0.1] * 512]}, IncompatibleError, ["face_embeddings", "image_embeds[1024]"]),
        ({"adapter": "FaceID Base", "face_embeddings": "/nope/faces.npy"}, Exception, ["/nope/faces.npy"]),
    ],
)
def test_bad_faceid_units_are_named_and_change_nothing(pack, faceid_engine, red_circle, unit, error, words):
    plain = generate(faceid_engine, []).images[0]
    unit = {**unit, "images": [red_circle]} if unit.get("images") else unit
    with pytest.raises(error) as caught:
        generate(faceid_engine, [unit])
    for word in words:
        assert word in str(caught.value)
    assert max_diff(generate(faceid_engine, []).images[0], plain) == 0


def test_faceid_base_from_an_image_runs_insightface_and_equals_diffusers(pack, faceid_root, insightface_root):
    """Path 1: InsightFace's own detection, alignment and recognition on the image, then diffusers' FaceID path."""
    engine = Engine([pack, faceid_root], insightface_root=insightface_root)
    image = face_image(seed=2)
    result = generate(engine, [{"adapter": "FaceID Base", "images": [image], "scale": 0.7}])
    embedding, _ = insightface(insightface_root, image)
    expected = diffusers_faceid(pack, faceid_root, "ip-adapter-faceid_sd15.safetensors", 0.7, embedding)
    assert max_diff(result.images[0], expected) <= 1
    unit = result.info["ip_adapters"][0]
    assert unit["encoder"] == "InsightFace buffalo_l" and unit["face_source"] == "InsightFace"
    assert unit["faces"][0]["faces_found"] == 1 and unit["faces"][0]["crop"]  # the crop the page shows
    assert [e["event"] for e in result.info["events"]].count("face_analysis_loaded") == 1
    again = generate(engine, [{"adapter": "FaceID Base", "images": [image], "scale": 0.7}])
    assert "face_analysis_loaded" not in [e["event"] for e in again.info["events"]]  # loaded once, face cached
    assert max_diff(again.images[0], result.images[0]) == 0


@pytest.mark.parametrize(("file", "name", "structure", "model"), [
    ("ip-adapter-faceid-plus_sd15.safetensors", "FaceID Plus", None, "tiny-sd15"),
    ("ip-adapter-faceid-plusv2_sd15.safetensors", "FaceID Plus v2", 0.6, "tiny-sd15"),
    ("ip-adapter-faceid-plusv2_sdxl.safetensors", "FaceID Plus v2 SDXL", 1.0, "tiny-sdxl"),
])  # fmt: skip
def test_faceid_plus_equals_diffusers(pack, plus_root, plus_engine, file, name, structure, model):
    """Plus reads the face embedding and CLIP hidden states of the aligned crop (encoder picked from the weights:
    the tiny ViT-H's width); v2 adds the face-structure shortcut at `structure`."""
    image = face_image(seed=4)
    unit = {"adapter": name, "images": [image], "scale": 0.8, **({"structure": structure} if structure else {})}
    result = generate(plus_engine, [unit], model=model)
    embedding, crop = insightface(plus_root / "insightface", image)
    expected = diffusers_faceid(pack, plus_root, file, 0.8, embedding, model, crops=[crop], shortcut=structure)
    assert max_diff(result.images[0], expected) <= 1
    info = result.info["ip_adapters"][0]
    assert info["encoder_file"] == str(pack / VIT_H) and info["variant"] == "faceid-plus"
    assert info["faceid_version"] == ("v2" if structure else "v1") and "file name" in info["faceid_version_from"]


def test_portrait_unnorm_reads_the_raw_face_embedding(pack, plus_root, plus_engine):
    """Portrait SDXL "unnorm" was trained on InsightFace's raw embedding (its file name says so, as upstream)."""
    image = face_image(seed=3)
    result = generate(plus_engine, [{"adapter": "FaceID Portrait SDXL unnorm", "images": [image], "scale": 0.9}],
                      model="tiny-sdxl")  # fmt: skip
    raw, _ = insightface(plus_root / "insightface", image, raw=True)
    expected = diffusers_faceid(pack, plus_root, "ip-adapter-faceid-portrait_sdxl_unnorm.safetensors", 0.9, raw,
                                "tiny-sdxl")  # fmt: skip
    assert max_diff(result.images[0], expected) <= 1
    assert result.info["ip_adapters"][0]["faceid_version"] == "unnorm"
    normed, _ = insightface(plus_root / "insightface", image)
    assert max_diff(result.images[0], diffusers_faceid(pack, plus_root, "ip-adapter-faceid-portrait_sdxl_unnorm.safetensors",
                                                       0.9, normed, "tiny-sdxl")) > 1  # fmt: skip


def test_plus_version_override_and_two_faces_on_one_file(pack, plus_root, plus_engine):
    """`faceid_version` overrides the file name (said in info); the same Plus file serves two units with two
    faces in one request, each with its own crop (diffusers keeps one crop per file)."""
    image = face_image(seed=4)
    v1_as_v2 = generate(plus_engine, [{"adapter": "FaceID Plus", "images": [image], "faceid_version": "v2"}])
    v2 = generate(plus_engine, [{"adapter": "FaceID Plus v2", "images": [image]}])
    assert max_diff(v1_as_v2.images[0], v2.images[0]) == 0  # same tensors, so v2 in both
    assert v1_as_v2.info["ip_adapters"][0]["faceid_version_from"] == "the request's faceid_version"
    a, b = face_image(seed=5), face_image(seed=6)
    both = generate(plus_engine, [{"adapter": "FaceID Plus v2", "images": [a], "scale": 0.5},
                                  {"adapter": "FaceID Plus v2", "images": [b], "scale": 0.5}])  # fmt: skip
    swapped = generate(plus_engine, [{"adapter": "FaceID Plus v2", "images": [b], "scale": 0.5},
                                     {"adapter": "FaceID Plus v2", "images": [a], "scale": 0.5}])  # fmt: skip
    same_twice = generate(plus_engine, [{"adapter": "FaceID Plus v2", "images": [a], "scale": 0.5},
                                        {"adapter": "FaceID Plus v2", "images": [a], "scale": 0.5}])  # fmt: skip
    assert max_diff(both.images[0], swapped.images[0]) <= 1  # order of units does not matter
    assert max_diff(both.images[0], same_twice.images[0]) > 0  # the second unit used its own face


def test_saved_face_embeddings_reproduce_the_images(pack, plus_root, plus_engine, tmp_path):
    """`imprompt embed` for FaceID Plus saves the face embedding and the crop's hidden states; they give the same
    picture as the image, pair with FaceID Base too, and a Base file's embeddings are refused by Plus."""
    image = face_image(seed=4)
    plus_file = plus_engine.save_embeddings({"adapter": "FaceID Plus v2", "images": [image]}, tmp_path / "face.safetensors")
    base_file = plus_engine.save_embeddings({"adapter": "FaceID Base", "images": [image]}, tmp_path / "base-face.safetensors")
    from_image = generate(plus_engine, [{"adapter": "FaceID Plus v2", "images": [image]}])
    from_file = generate(plus_engine, [{"adapter": "FaceID Plus v2", "embeddings": str(plus_file)}])
    assert max_diff(from_file.images[0], from_image.images[0]) == 0
    base_from_image = generate(plus_engine, [{"adapter": "FaceID Base", "images": [image]}])
    assert max_diff(generate(plus_engine, [{"adapter": "FaceID Base", "embeddings": str(plus_file)}]).images[0],
                    base_from_image.images[0]) == 0  # fmt: skip
    with pytest.raises(IncompatibleError, match=r"base-face.*faceid_embeds\[512\] \(normed\).*FaceID Plus v2.*of the face crop"):
        generate(plus_engine, [{"adapter": "FaceID Plus v2", "embeddings": str(base_file)}])


@pytest.mark.parametrize(
    ("unit", "error", "words"),
    [
        ({"adapter": "FaceID Base", "images": ["no-face"]}, NoFaceError, ["ip_adapters.0.images.0", "no face found"]),
        ({"adapter": "FaceID Plus v2", "face_embeddings": [[0.1] * 512]}, IncompatibleError, ["face crop", "imprompt embed"]),
        ({"adapter": "FaceID Base", "images": ["face"], "structure": 0.5}, RequestError, ["Plus v2", "faceid"]),
        ({"adapter": "FaceID Base", "images": ["face"], "faceid_version": "v2"}, RequestError, ["FaceID Plus"]),
        ({"adapter": "FaceID Plus", "images": ["face"], "encoder": "IP-Adapter/sdxl_models/image_encoder"}, IncompatibleError,
         ["hidden_states[96]", "hidden_states[64]"]),
    ],
)  # fmt: skip
def test_bad_faceid_image_units_are_named_and_change_nothing(pack, plus_engine, unit, error, words):
    plain = generate(plus_engine, []).images[0]
    pictures = {"no-face": no_face_image(), "face": face_image(seed=1)}
    unit = {**unit, "images": [pictures[i] for i in unit["images"]]} if unit.get("images") else unit
    with pytest.raises(error) as caught:
        generate(plus_engine, [unit])
    for word in words:
        assert word in str(caught.value)
    assert max_diff(generate(plus_engine, []).images[0], plain) == 0


def test_without_insightface_the_error_says_how_to_install_it(pack, faceid_root, tmp_path):
    """InsightFace missing (as without the `faceid` extra) or its model pack missing: typed errors that say what
    to do; face_embeddings keep working."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["insightface"] = None  # as if not installed
from imprompt import Engine
from imprompt.errors import MissingFaceAnalysisError
from tools.insightface_pack import face_image
engine = Engine([{str(pack)!r}, {str(faceid_root)!r}])
try:
    engine.generate(model="tiny-sd15", steps=1, width=64, height=64,
                    ip_adapters=[{{"adapter": "FaceID Base", "images": [face_image(1)]}}])
except MissingFaceAnalysisError as exc:
    print("ERROR", exc)
engine.generate(model="tiny-sd15", steps=1, width=64, height=64,
                ip_adapters=[{{"adapter": "FaceID Base", "face_embeddings": [[0.1] * 512]}}])
print("FACE EMBEDDINGS OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "ERROR" in done.stdout and "pip install 'imprompt[faceid]'" in done.stdout, done.stderr[-2000:]
    assert "FACE EMBEDDINGS OK" in done.stdout
    pytest.importorskip("insightface")
    engine = Engine([pack, faceid_root], insightface_root=tmp_path / "empty")
    with pytest.raises(MissingFaceAnalysisError, match=r"buffalo_l model pack, found in none of: .*empty/models/buffalo_l"):
        generate(engine, [{"adapter": "FaceID Base", "images": [face_image(1)]}])


# ------------------------------------------------------------------------------------------------ over HTTP


def post(url, payload, status=200):
    from server_fixtures import post_txt2img

    return post_txt2img(url, payload, status)


def txt(**fields) -> dict:
    return {"prompt": "a cat", "seed": 1, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, **fields}  # fmt: skip


def test_sdnext_face_payload_sdnext_unit_and_controlnet_unit_agree(pack, faceid_root, plus_root):
    """SD.Next's `face` payload (FaceID mode: Override sampler means DDIM), an SD.Next `ip_adapter` unit naming the
    FaceID adapter, and an A1111 ControlNet unit with the ip-adapter_face_id_plus module: one path, same pixels."""
    from server_fixtures import b64, new_engine, running_server

    face = b64(face_image(seed=4))
    with running_server(new_engine([pack, faceid_root, plus_root])) as url:
        from_face, info = post(url, txt(face={"mode": "FaceID", "source_images": [face], "ip_model": "FaceID Plus v2",
                                              "ip_strength": 0.8, "ip_structure": 0.6}))  # fmt: skip
        from_unit, _ = post(url, txt(sampler_name="DDIM", ip_adapter=[
            {"adapter": "FaceID Plus v2", "images": [face], "scale": 0.8, "structure": 0.6}]))  # fmt: skip
        assert max_diff(from_face, from_unit) == 0
        unit = info["ip_adapters"][0]
        assert info["sampler"] == "DDIM" and unit["structure"] == 0.6 and unit["faces"][0]["crop"]
        cn = {"enabled": True, "module": "ip-adapter_face_id_plus", "model": "ip-adapter-faceid-plusv2_sd15",
              "image": face, "weight": 0.8}  # fmt: skip
        from_controlnet, cn_info = post(url, txt(sampler_name="DDIM", alwayson_scripts={"controlnet": {"args": [cn]}}))
        plain_unit, _ = post(url, txt(sampler_name="DDIM", ip_adapter=[
            {"adapter": "FaceID Plus v2", "images": [face], "scale": 0.8}]))  # fmt: skip
        assert max_diff(from_controlnet, plain_unit) == 0 and cn_info["warnings"] == []

        # a CLIP module naming a FaceID adapter: the weights decide, and the response says so
        _, warned = post(url, txt(alwayson_scripts={"controlnet": {"args": [{**cn, "module": "ip-adapter_clip_sd15"}]}}))
        assert "runs ViT-H-14" in warned["warnings"][0] and "faceid_embeds[512]" in warned["warnings"][0]
        # structure on FaceID Base means nothing in SD.Next either: carried on, and said
        _, base = post(url, txt(face={"source_images": [face], "ip_model": "FaceID Base", "ip_structure": 0.5}))
        assert "no effect on FaceID Base" in base["warnings"][0]
        refused = post(url, txt(face={"mode": "PhotoMaker", "source_images": [face]}), status=422)
        assert "face.mode" in refused["detail"] and "PhotoMaker" in refused["detail"]
        no_face = post(url, txt(face={"source_images": [b64(no_face_image())], "ip_model": "FaceID Base"}), status=422)
        assert "no face found" in no_face["detail"]


def test_cli_embed_a_face_then_generate_from_it(pack, faceid_root, plus_root, plus_engine, tmp_path):
    """`imprompt embed --adapter "FaceID Plus v2" face.png --out face.safetensors` (InsightFace found through
    --insightface-root), then `imprompt generate --ip "FaceID Plus v2:face.safetensors"`: the image the face gives."""
    import subprocess
    import sys

    face_image(seed=4).save(tmp_path / "face.png")
    models = [arg for root in (pack, faceid_root, plus_root) for arg in ("--models", str(root))]

    def imprompt(*args):
        done = subprocess.run([sys.executable, "-m", "imprompt.cli", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    imprompt("embed", *models, "--insightface-root", str(plus_root / "insightface"), "--adapter", "FaceID Plus v2",
             str(tmp_path / "face.png"), "--out", str(tmp_path / "face.safetensors"))  # fmt: skip
    imprompt("generate", *models, "--model", "tiny-sd15", "--prompt", "a cat", "--seed", "1", "--steps", str(STEPS),
             "--width", str(SIZE), "--height", str(SIZE), "--ip", f"FaceID Plus v2:{tmp_path / 'face.safetensors'}:0.8",
             "--out", str(tmp_path / "out.png"))  # fmt: skip
    expected = generate(plus_engine, [{"adapter": "FaceID Plus v2", "images": [face_image(seed=4)], "scale": 0.8}])
    from PIL import Image

    assert max_diff(Image.open(tmp_path / "out.png").convert("RGB"), expected.images[0]) == 0


def test_and_with_a_faceid_plus_unit_is_refused_before_anything_runs(plus_engine, red_circle):
    """A composable prompt's parts are rows of one UNet batch, and FaceID Plus's face crops are batched for one
    prompt row: refused, naming the unit, before InsightFace or anything else runs."""
    with pytest.raises(UnsupportedError, match=r"AND .* FaceID Plus units \(ip_adapters\.0, FaceID Plus v2\)"):
        plus_engine.plan({"model": "tiny-sd15", "prompt": "a cat AND a dog",
                          "ip_adapters": [{"adapter": "FaceID Plus v2", "images": [red_circle]}]})  # fmt: skip
