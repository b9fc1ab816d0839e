"""InstantID units on the tiny SDXL, held to a reference written here from InstantX's published pipeline
(`pipeline_stable_diffusion_xl_instantid.py` and its README, read for their rules; no code of theirs is copied):

- the face: InsightFace `FaceAnalysis(name="antelopev2")` on the BGR image, the face of largest box, its raw
  `embedding` and `kps`;
- the adapter: diffusers' own `load_ip_adapter` of the same file (its Resampler and IP attention), fed
  cat([zeros, embedding]) shaped [2, 1, 1, 512] (InstantX reshapes the embedding to [1, 1, 512]; its negative is a
  zero embedding through the same Resampler), `set_ip_adapter_scale` as `ip_adapter_scale`;
- the IdentityNet: diffusers' `StableDiffusionXLControlNetPipeline` with the keypoints drawn by this test's own
  function (below, from the README's description of `draw_kps`) as `image` at the face picture's size, at
  `controlnet_conditioning_scale`, and its cross-attention given the face tokens (the Resampler's output for
  [negative, positive]) instead of the prompt, as InstantX's pipeline calls its ControlNet.
The reference knows nothing of imprompt's implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import max_diff
from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
from PIL import Image

from imprompt import Engine
from imprompt.errors import (
    IncompatibleError,
    MissingFaceAnalysisError,
    NoFaceError,
    RequestError,
    UnknownControlNetError,
)
from tools.insightface_pack import face_image, no_face_image, write_insightface_pack
from tools.instantid_models import write_instantid

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def instantid_root(pack, tmp_path_factory):
    """InstantX's layout (checkpoints/ip-adapter.bin + checkpoints/ControlNetModel/) and a tiny antelopev2 pack
    (antelopev2's file names) where ComfyUI keeps packs (models/insightface)."""
    pytest.importorskip("insightface", reason="InsightFace is the optional `faceid` extra")
    root = tmp_path_factory.mktemp("instantid")
    write_instantid(root, pack)
    write_insightface_pack(root / "insightface", "antelopev2")
    return root


@pytest.fixture(scope="module")
def engine(pack, instantid_root):
    return Engine([pack, instantid_root])


def draw_kps_reference(size, kps) -> Image.Image:
    """InstantID's keypoint picture, from its rule: limbs eye/eye/mouth-corner -> nose as OpenCV ellipses (half
    axes length / 2 and 4, at the limb's angle) filled in the first point's colour on a black float canvas, the
    canvas times 0.6 to uint8, then a filled circle of radius 10 at each point in its colour."""
    import cv2

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
    w, h = size
    kps = np.array(kps, dtype=np.float64)
    img = np.zeros([h, w, 3])
    for first in (0, 1, 3, 4):
        xs, ys = kps[[first, 2], 0], kps[[first, 2], 1]
        length = math.sqrt((xs[0] - xs[1]) ** 2 + (ys[0] - ys[1]) ** 2)
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        poly = cv2.ellipse2Poly((int(xs.mean()), int(ys.mean())), (int(length / 2), 4), int(angle), 0, 360, 1)
        img = cv2.fillConvexPoly(img.copy(), poly, colours[first])
    img = (img * 0.6).astype(np.uint8)
    for i, (x, y) in enumerate(kps):
        img = cv2.circle(img.copy(), (int(x), int(y)), 10, colours[i], -1)
    return Image.fromarray(img.astype(np.uint8))


def antelope_face(root, image):
    """What InstantID's README does: antelopev2, BGR in, the largest face; its raw embedding and keypoints."""
    import cv2
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="antelopev2", root=str(root / "insightface"), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=0, det_size=(640, 640))
    faces = app.get(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    face = sorted(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))[-1]
    return face["embedding"], face["kps"]


def reference(pack, root, face, scale, cn_scale, pose=None, prompt="a cat", other=None, second=None):
    """`other`: (ControlNet folder, control image, scale) of a plain ControlNet beside the IdentityNet, reading the
    prompt (diffusers' multi-ControlNet sums the residuals). `second`: (face, scale, cn_scale) of a second InstantID
    unit: a second IP-Adapter of the same file and a second IdentityNet, each net reading its own unit's face tokens."""
    units = [(face, scale, cn_scale, pose)] + ([(*second, None)] if second else [])
    ip_scales, all_embeds, nets, images, scales = [], [], [], [], []
    for face_i, scale_i, cn_i, pose_i in units:
        embedding, kps = antelope_face(root, face_i)
        images.append(draw_kps_reference((pose_i or face_i).size, antelope_face(root, pose_i)[1] if pose_i else kps))
        nets.append(ControlNetModel.from_pretrained(root / "checkpoints" / "ControlNetModel"))
        face_embeds = torch.from_numpy(np.asarray(embedding, dtype=np.float32)).reshape(1, 1, 1, 512)
        all_embeds.append(torch.cat([torch.zeros_like(face_embeds), face_embeds]))  # [negative, positive]
        ip_scales.append(scale_i)
        scales.append(cn_i)
    if other is not None:
        nets.append(ControlNetModel.from_pretrained(other[0]))
        images.append(other[1])
        scales.append(other[2])
    many = len(nets) > 1
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(pack / "diffusers" / "tiny-sdxl",
                                                               controlnet=nets if many else nets[0])  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    state = torch.load(root / "checkpoints" / "ip-adapter.bin", weights_only=True)
    n = len(units)
    pipe.load_ip_adapter([state] * n, subfolder=[""] * n, weight_name=[""] * n, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(ip_scales)
    with torch.no_grad():  # [2, 16, 2048] per unit: its face tokens
        tokens = [t.flatten(1, 2) for t in pipe.unet.encoder_hid_proj(all_embeds)]
    for net, own in zip(nets, tokens):
        def reads_face_tokens(sample, timestep, encoder_hidden_states=None, *args, plain=net.forward, own=own,
                              **kwargs):  # fmt: skip
            return plain(sample, timestep, own[-sample.shape[0]:], *args, **kwargs)

        net.forward = reads_face_tokens
    return pipe(prompt, image=images if many else images[0], ip_adapter_image_embeds=all_embeds,
                controlnet_conditioning_scale=scales if many else scales[0], num_inference_steps=STEPS, width=SIZE,
                height=SIZE, guidance_scale=7.0, generator=torch.Generator().manual_seed(1)).images[0]  # fmt: skip


def generate(engine, *units, model="tiny-sdxl", **fields):
    return engine.generate(model=model, prompt="a cat", seed=1, steps=STEPS, width=SIZE, height=SIZE,
                           cfg_scale=7.0, ip_adapters=list(units), **fields)  # fmt: skip


def instantid(image, **fields):
    return {"adapter": "InstantID", "images": [image], "scale": 0.8, **fields}


def test_probe_reads_instantid_from_its_tensors(engine, instantid_root):
    spec = engine.state.store.adapter(str(instantid_root / "checkpoints" / "ip-adapter.bin")).spec
    assert (spec.variant, spec.consumes, spec.embed_dim, spec.tokens) == ("instantid", "face_embeds", 512, 16)
    assert spec.needs == "InsightFace antelopev2 face_embeds[512]"


def test_instantid_equals_the_reference_and_switching_leaves_nothing(pack, instantid_root, engine):
    face = face_image(5)
    got = generate(engine, instantid(face, controlnet_scale=0.7))
    expected = reference(pack, instantid_root, face, 0.8, 0.7)
    assert max_diff(got.images[0], expected) <= 1
    unit = got.info["ip_adapters"][0]
    assert unit["encoder"] == "InsightFace antelopev2" and unit["identitynet"] == "checkpoints/ControlNetModel"
    assert unit["keypoints"] and unit["controlnet_scale"] == 0.7
    plain = generate(engine)
    assert max_diff(plain.images[0], got.images[0]) > 0  # InstantID acted
    again = generate(engine, instantid(face, controlnet_scale=0.7))
    assert max_diff(again.images[0], got.images[0]) == 0
    assert max_diff(generate(engine).images[0], plain.images[0]) == 0


def test_pose_image_gives_the_keypoints_of_another_face(pack, instantid_root, engine):
    face, pose = face_image(5), face_image(9)
    got = generate(engine, instantid(face, pose_image=pose, controlnet_scale=1.0))
    assert max_diff(got.images[0], reference(pack, instantid_root, face, 0.8, 1.0, pose=pose)) <= 1


def test_another_controlnet_beside_the_identitynet_reads_the_prompt(pack, instantid_root, nets):
    """A plain SDXL ControlNet unit beside InstantID: both nets in one pipeline, only the IdentityNet reading the
    face tokens; the IdentityNet loaded once into the ControlNet cache and reused."""
    engine = Engine([pack, instantid_root, nets["sdxl"].parent.parent])
    face, control = face_image(5), Image.open(pack / "images" / "white-triangle.png").convert("RGB").resize((64, 64))
    other = {"model": str(nets["sdxl"]), "image": control, "weight": 0.9}
    got = generate(engine, instantid(face, controlnet_scale=0.7), controlnets=[other])
    expected = reference(pack, instantid_root, face, 0.8, 0.7, other=(nets["sdxl"], control, 0.9))
    assert max_diff(got.images[0], expected) <= 1
    again = generate(engine, instantid(face, controlnet_scale=0.7), controlnets=[other])
    assert max_diff(again.images[0], got.images[0]) == 0
    assert not [e for e in again.info.get("events", []) if e["event"] in ("controlnet_loaded", "adapter_loaded")]


def test_two_instantid_units_each_read_their_own_face(pack, instantid_root, engine):
    """Two people: two InstantID units sharing one IdentityNet model; each IdentityNet pass reads its own unit's face
    tokens at its own scale, as diffusers' multi-ControlNet with one net per unit does."""
    a, b = face_image(5), face_image(9)
    got = generate(engine, instantid(a, scale=0.8, controlnet_scale=0.7), instantid(b, scale=0.5, controlnet_scale=0.4))
    expected = reference(pack, instantid_root, a, 0.8, 0.7, second=(b, 0.5, 0.4))
    assert max_diff(got.images[0], expected) <= 1
    swapped = reference(pack, instantid_root, a, 0.8, 0.7, second=(b, 0.5, 0.7))
    assert max_diff(swapped, expected) > 1  # the test sees the second net's own scale


def test_no_face_is_a_typed_error_and_the_next_request_is_fine(engine):
    with pytest.raises(NoFaceError, match=r"ip_adapters\.0\.images\.0: no face found"):
        generate(engine, instantid(no_face_image()))
    assert generate(engine, instantid(face_image(5))).images[0] is not None


def test_bad_instantid_requests_are_refused_before_anything_runs(pack, instantid_root, engine, tmp_path):
    with pytest.raises(IncompatibleError, match=r"InstantID .* is for SDXL models .* but model tiny-sd15 is SD 1\.5"):
        generate(engine, instantid(face_image(5)), model="tiny-sd15")
    with pytest.raises(RequestError, match=r"ip_adapters\.0\.controlnet_scale: acts on InstantID units only"):
        generate(engine, {"adapter": "Plus ViT-H SDXL", "images": [face_image(5)], "controlnet_scale": 0.5})
    with pytest.raises(RequestError, match=r"ip_adapters\.0\.masks: not read by InstantID"):
        generate(engine, instantid(face_image(5), masks=[face_image(5)]))
    alone = tmp_path / "alone"  # the adapter without its IdentityNet
    alone.mkdir()
    (alone / "instantid-ip-adapter.bin").write_bytes((instantid_root / "checkpoints" / "ip-adapter.bin").read_bytes())
    lonely = Engine([pack, alone], insightface_root=instantid_root / "insightface")
    with pytest.raises(UnknownControlNetError, match=r"runs with its IdentityNet .* Put InstantX/InstantID's ControlNetModel/"):
        generate(lonely, instantid(face_image(5)))
    missing = Engine([pack, instantid_root], insightface_root=tmp_path / "empty")
    missing.state.faces.roots = [tmp_path / "empty"]
    with pytest.raises(MissingFaceAnalysisError, match=r"InstantID from images needs InsightFace's antelopev2 model pack"):
        generate(missing, instantid(face_image(5)))


def test_a_missing_pack_or_insightface_is_refused_before_anything_loads(pack, instantid_root, tmp_path, monkeypatch):
    """The plan checks what the face needs before the model, the adapter or the IdentityNet load: the antelopev2 pack
    (for the image, or a pose_image beside given face_embeddings) and InsightFace itself, refused with the words the
    loader would use; given face_embeddings with no pose_image need neither."""
    import sys

    missing = Engine([pack, instantid_root], insightface_root=tmp_path / "empty")
    missing.state.faces.roots = [tmp_path / "empty"]
    embedding = [[0.5] * 512]
    cases = [(instantid(face_image(5)), r"^ip_adapters\.0: InstantID from images needs InsightFace's antelopev2 model "
                                        r"pack, found in none of: .*empty.*Unzip antelopev2\.zip"),
             ({"adapter": "InstantID", "face_embeddings": embedding, "pose_image": face_image(5)},
              r"^ip_adapters\.0\.pose_image: InstantID from images needs InsightFace's antelopev2 model pack")]  # fmt: skip
    for unit, message in cases:
        with pytest.raises(MissingFaceAnalysisError, match=message):
            generate(missing, unit)
        info = missing.cache_info()
        assert info["pipelines"]["entries"] == [] and not info["adapters"]["entries"], info
    monkeypatch.setitem(sys.modules, "insightface", None)  # not installed
    fresh = Engine([pack, instantid_root])
    with pytest.raises(MissingFaceAnalysisError, match=r"^ip_adapters\.0: InstantID from images needs InsightFace, "
                                                       r"which is not installed \(No module named 'insightface'\)"):
        generate(fresh, instantid(face_image(5)))
    assert fresh.cache_info()["pipelines"]["entries"] == []
    ok = generate(missing, {"adapter": "InstantID", "face_embeddings": [[20.0 / 512**0.5] * 512], "controlnet_scale": 0})
    assert ok.images[0] is not None  # no image read: neither the pack nor InsightFace needed


def test_models_listing_names_the_face_pack_and_identitynet(engine):
    from imprompt.plan import describe_store

    listed = next(a for a in describe_store(engine.state.store)["adapters"] if a["variant"] == "instantid")
    assert listed["encoder"] == "InsightFace antelopev2" and listed["face_pack"] == "antelopev2"
    assert listed["face_pack_present"] is True
    assert listed["identitynet"] == "checkpoints/ControlNetModel" and listed["fits_models"] == ["tiny-sdxl"]


def test_identitynet_is_never_guessed_among_other_controlnets(pack, instantid_root, tmp_path):
    """The A1111 extension's layout: InstantID's two files in ControlNet/ beside the user's other SDXL ControlNets.
    The net named InstantID is taken; where none is (or several are), the request and the listing say ambiguous
    and ask for `identitynet`, and never take another net (a canny one) as the IdentityNet."""
    from safetensors.torch import load_file, save_file

    from imprompt.plan import describe_store

    weights = load_file(instantid_root / "checkpoints" / "ControlNetModel" / "diffusion_pytorch_model.safetensors")
    adapter = (instantid_root / "checkpoints" / "ip-adapter.bin").read_bytes()

    def tree(name, *nets):
        folder = tmp_path / name / "ControlNet"
        folder.mkdir(parents=True)
        (folder / "ip-adapter_instant_id_sdxl.bin").write_bytes(adapter)
        for net in nets:
            save_file(weights, folder / f"{net}.safetensors")
        return Engine([pack, tmp_path / name], insightface_root=instantid_root / "insightface")

    def listed(engine):
        return next(a for a in describe_store(engine.state.store)["adapters"] if a["variant"] == "instantid")

    right = tree("right", "canny_sdxl", "control_instant_id_sdxl")
    assert listed(right)["identitynet"] == "control_instant_id_sdxl"
    got = generate(right, instantid(face_image(5), controlnet_scale=0.7))
    assert got.info["ip_adapters"][0]["identitynet"] == "control_instant_id_sdxl"
    for name, nets, candidates in (("unnamed", ["canny_sdxl"], ["canny_sdxl"]),
                                   ("two", ["canny_sdxl", "instantid_a", "instantid_b"], ["instantid_a", "instantid_b"])):  # fmt: skip
        engine = tree(name, *nets)
        with pytest.raises(RequestError, match=rf"IdentityNet of InstantID .* is ambiguous: .*{candidates[-1]}.* identitynet"):
            generate(engine, instantid(face_image(5)))
        item = listed(engine)
        assert item["identitynet"] is None and item["identitynet_ambiguous"] is True
        assert item["identitynet_candidates"] == candidates and "ambiguous" in item["identitynet_problem"]
        named = generate(engine, instantid(face_image(5), identitynet=candidates[0], controlnet_scale=0.7))
        assert named.info["ip_adapters"][0]["identitynet"] == candidates[0]


def test_sdnext_face_payload_a1111_units_and_imprompt_unit_agree(pack, instantid_root, tmp_path):
    """SD.Next's `face` payload in InstantID mode (id_strength, id_conditioning), the A1111 ControlNet extension's
    two units (instant_id_face_embedding + instant_id_face_keypoints, in the extension's file names: the IdentityNet
    as a single file in ControlNet/), and imprompt's own unit: one path, the same pixels."""
    from server_fixtures import b64, new_engine, post_txt2img, running_server
    from safetensors.torch import load_file, save_file

    a1111 = tmp_path / "a1111"  # the extension's names for InstantX's two files
    (a1111 / "ControlNet").mkdir(parents=True)
    (a1111 / "ControlNet" / "ip-adapter_instant_id_sdxl.bin").write_bytes(
        (instantid_root / "checkpoints" / "ip-adapter.bin").read_bytes())
    weights = instantid_root / "checkpoints" / "ControlNetModel" / "diffusion_pytorch_model.safetensors"
    save_file(load_file(weights), a1111 / "ControlNet" / "control_instant_id_sdxl.safetensors")

    def txt(**fields):
        return {"prompt": "a cat", "seed": 1, "steps": STEPS, "width": SIZE, "height": SIZE, "cfg_scale": 7.0,
                "override_settings": {"sd_model_checkpoint": "tiny-sdxl"}, **fields}  # fmt: skip

    face, pose = b64(face_image(5)), b64(face_image(9))
    engine = new_engine([pack, a1111], insightface_root=instantid_root / "insightface")
    with running_server(engine) as url:
        own, own_info = post_txt2img(url, txt(ip_adapter=[{"adapter": "InstantID", "images": [face], "scale": 0.9,
                                                           "controlnet_scale": 0.6}]))  # fmt: skip
        from_face, info = post_txt2img(url, txt(face={"mode": "InstantID", "source_images": [face], "id_strength": 0.9,
                                                      "id_conditioning": 0.6}))  # fmt: skip
        assert max_diff(own, from_face) == 0 and info["ip_adapters"][0]["identitynet"] == "control_instant_id_sdxl"
        units = [{"enabled": True, "module": "instant_id_face_embedding", "model": "ip-adapter_instant_id_sdxl",
                  "image": face, "weight": 0.9},
                 {"enabled": True, "module": "instant_id_face_keypoints", "model": "control_instant_id_sdxl",
                  "image": face, "weight": 0.6}]  # fmt: skip
        from_extension, _ = post_txt2img(url, txt(alwayson_scripts={"controlnet": {"args": units}}))
        assert max_diff(own, from_extension) == 0
        units[1]["image"] = pose  # the keypoints of another picture
        posed, _ = post_txt2img(url, txt(alwayson_scripts={"controlnet": {"args": units}}))
        own_posed, _ = post_txt2img(url, txt(ip_adapter=[{"adapter": "InstantID", "images": [face], "scale": 0.9,
                                                          "controlnet_scale": 0.6, "pose_image": pose}]))  # fmt: skip
        assert max_diff(posed, own_posed) == 0 and max_diff(posed, own) > 0
        alone, _ = post_txt2img(url, txt(alwayson_scripts={"controlnet": {"args": units[:1]}}))
        no_net, _ = post_txt2img(url, txt(ip_adapter=[{"adapter": "InstantID", "images": [face], "scale": 0.9,
                                                       "controlnet_scale": 0}]))  # fmt: skip
        assert max_diff(alone, no_net) == 0 and max_diff(alone, own) > 0
        refused = post_txt2img(url, txt(alwayson_scripts={"controlnet": {"args": units[1:]}}), 422)
        assert "instant_id_face_keypoints reads the face of an instant_id_face_embedding unit" in refused["detail"]


def test_a1111_keypoints_unit_fields_are_refused_or_warned_never_dropped(pack, instantid_root, tmp_path):
    """The extension's keypoints unit is an ordinary ControlNet unit there: its control mode and per-residual scales
    would change the IdentityNet (refused), its resize mode and preprocessor resolution the keypoint map (warned)."""
    from imprompt.models.store import ModelStore
    from imprompt.server.controlnet import controlnet_units

    folder = tmp_path / "ControlNet"
    folder.mkdir()
    (folder / "ip-adapter_instant_id_sdxl.bin").write_bytes((instantid_root / "checkpoints" / "ip-adapter.bin").read_bytes())
    net = instantid_root / "checkpoints" / "ControlNetModel"
    (folder / "control_instant_id_sdxl").symlink_to(net, target_is_directory=True)
    store = ModelStore([pack, tmp_path])

    def units(**fields):
        face = "aGVsbG8="  # not decoded here
        args = [{"enabled": True, "module": "instant_id_face_embedding", "model": "ip-adapter_instant_id_sdxl",
                 "image": face, "weight": 0.9},
                {"enabled": True, "module": "instant_id_face_keypoints", "model": "control_instant_id_sdxl",
                 "image": face, "weight": 0.6, **fields}]  # fmt: skip
        return controlnet_units({"controlnet": {"args": args}}, store)

    assert units(resize_mode="Just Resize").warnings == []
    for field, value in (("control_mode", 2), ("control_mode", "My prompt is more important"),
                         ("advanced_weighting", [0.1] * 10)):  # fmt: skip
        with pytest.raises(RequestError, match=rf"args\.1\.{field}: imprompt .* IdentityNet"):
            units(**{field: value})
    warned = units(resize_mode=2, processor_res=1024, pixel_perfect=True, control_mode=0).warnings
    assert [w.split(":")[0] for w in warned] == [f"alwayson_scripts.controlnet.args.1.{f}"
                                                for f in ("resize_mode", "processor_res", "pixel_perfect")]
    assert "'Resize and Fill' ignored" in warned[0]
    assert "Crop and Resize" in units().warnings[0]  # the extension's default crops


def test_instantid_face_embeddings_are_antelopev2_raw_ones(pack, instantid_root, engine):
    """InstantID was trained on antelopev2's raw `embedding` (norm about 20-30): a unit-length normed_embedding
    (FaceID's kind) is refused, and a wrong width is told the kind InstantID reads; the raw one runs."""
    raw, _ = antelope_face(instantid_root, face_image(5))
    raw = np.asarray(raw, dtype=np.float64)
    alone = {"controlnet_scale": 0}  # no keypoints: the adapter alone
    with pytest.raises(IncompatibleError, match=r"face_embeddings: an embedding of norm 1 .* antelopev2's raw `embedding`"):
        generate(engine, {"adapter": "InstantID", "face_embeddings": [list(raw / np.linalg.norm(raw))], **alone})
    with pytest.raises(IncompatibleError, match=r"shape \[1, 511\]; .*512-d face embeddings \(InsightFace antelopev2's raw"):
        generate(engine, {"adapter": "InstantID", "face_embeddings": [list(raw[:511])], **alone})
    assert generate(engine, {"adapter": "InstantID", "face_embeddings": [list(raw)], **alone}).images[0] is not None

