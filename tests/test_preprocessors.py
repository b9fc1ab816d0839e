"""ControlNet preprocessors: the A1111 ControlNet extension's rules, its weights' layouts, the detection cache.

References are written in the tests from the extension's rules with OpenCV / numpy directly, never by calling
imprompt's functions, so a change in imprompt's arithmetic shows here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

cv2 = pytest.importorskip("cv2")

from imprompt import preprocess
from imprompt.util.cache import ByteLRU  # noqa: E402
from imprompt.errors import (  # noqa: E402
    ImpromptError,
    MissingPreprocessorWeightsError,
    RequestError,
    UnknownPreprocessorError,
)
from imprompt.preprocess import resize  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# helper A: registry, model-free preprocessors, resize modes, pixel perfect, weights lookup, cache, depth
# ---------------------------------------------------------------------------------------------------------------

def photo(width=300, height=200, seed=0) -> np.ndarray:
    """A smooth picture with shapes and edges: many colours, real edges for Canny."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=2)
    img[height // 4: height // 2, width // 5: width // 2] = (230, 40, 60)
    cv2.circle(img, (int(width * 0.7), int(height * 0.6)), min(width, height) // 5, (20, 200, 90), -1)
    img += rng.normal(0, 3, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def ext_pad(img, res):
    """The extension's detector input: short side to res (cubic up, area down), edge-padded to 64."""
    h, w = img.shape[:2]
    k = float(res) / min(h, w)
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    out = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    ph, pw = int(np.ceil(th / 64.0) * 64 - th), int(np.ceil(tw / 64.0) * 64 - tw)
    return np.pad(out, [[0, ph], [0, pw], [0, 0]], mode="edge"), (th, tw)


def run(name, img, res=512, a=-1, b=-1, weights=None, cache=None):
    pre = preprocess.find(name)
    kwargs = {} if cache is None else {"cache": cache}
    out = preprocess.detect(pre, Image.fromarray(img), res, a, b, weights or {}, **kwargs)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_canny_is_the_extensions():
    img = photo()
    padded, (th, tw) = ext_pad(img, 256)
    edges = cv2.Canny(padded, 50, 150)[:th, :tw]
    assert np.array_equal(run("canny", img, 256, 50, 150), np.stack([edges] * 3, axis=2))
    # out-of-range values are the slider defaults (100, 200), as the extension's unit validation makes them
    padded, (th, tw) = ext_pad(img, 512)
    edges = cv2.Canny(padded, 100, 200)[:th, :tw]
    assert np.array_equal(run("canny", img, -1, -1, -1), np.stack([edges] * 3, axis=2))


def test_scribble_xdog_is_the_extensions():
    img = photo(seed=1)
    padded, (th, tw) = ext_pad(img, 320)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    expected = np.zeros_like(padded)
    expected[2 * (255 - dog) > 20] = 255
    assert np.array_equal(run("scribble_xdog", img, 320, 20), expected[:th, :tw])


def test_tile_resample_invert_threshold_blur_are_the_extensions():
    img = photo(seed=2)
    assert np.array_equal(run("tile_resample", img, 512, 1.0), img)  # below 1.1: unchanged
    expected = cv2.resize(img, (int(300 / 2.5), int(200 / 2.5)), interpolation=cv2.INTER_AREA)
    assert np.array_equal(run("tile_resample", img, 512, 2.5), expected)
    assert np.array_equal(run("invert", img), 255 - img)
    padded, (th, tw) = ext_pad(img, 256)
    expected = np.where(np.min(padded, axis=2) > 100, 255, 0).astype(np.uint8)[:th, :tw]
    assert np.array_equal(run("threshold", img, 256, 100), np.stack([expected] * 3, axis=2))
    blurred = cv2.GaussianBlur(np.ascontiguousarray(padded[:th, :tw]), (0, 0), 3.0)
    assert np.array_equal(run("blur_gaussian", img, 256, 3.0), blurred)
    assert np.array_equal(run("none", img), img)


def test_registry_names_and_spellings():
    assert preprocess.find("lineart_realistic") is preprocess.find("lineart")  # label and the extension's key
    assert preprocess.find("softedge_hed") is preprocess.find("hed")
    assert preprocess.find("LineArt Realistic").name == "lineart_realistic"  # SD.Next's spelling
    assert preprocess.find("Canny").name == "canny"
    assert preprocess.find("invert (from white bg & black line)").name == "invert"
    pre = preprocess.find("depth_anything")
    assert pre.weights == ("depth_anything_vitl14.pth",) and not pre.model_free and pre.control_type == "Depth"
    assert preprocess.find("canny").model_free
    for name in ("none", "canny", "tile_resample", "scribble_xdog", "dw_openpose_full", "lineart_realistic",
                 "lineart_coarse", "softedge_hed", "scribble_hed", "depth_anything", "depth_anything_v2"):
        assert name in preprocess.PREPROCESSORS
    with pytest.raises(UnknownPreprocessorError) as err:
        preprocess.find("cany")
    assert "'cany'" in str(err.value) and "canny" in str(err.value)
    assert err.value.http_status == 422 and isinstance(err.value, RequestError)


def test_resize_modes_as_the_extension():
    img = photo(100, 50, seed=3)  # many colours: cubic / area
    out = np.asarray(resize.fit(Image.fromarray(img), 64, 64, "Crop and Resize"))
    # cover: k = max(64/50, 64/100) = 1.28 -> 128 x 64, centre crop from x = 32
    assert np.array_equal(out, cv2.resize(img, (128, 64), interpolation=cv2.INTER_CUBIC)[:, 32:96])
    out = np.asarray(resize.fit(Image.fromarray(img), 64, 64, 2))
    # fit: k = min(1.28, 0.64) = 0.64 -> 64 x 32 (area, shrinking), at y = 16, the rest the border's median
    borders = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    median = np.median(borders, axis=0).astype(np.uint8)
    assert np.array_equal(out[16:48], cv2.resize(img, (64, 32), interpolation=cv2.INTER_AREA))
    assert (out[:16] == median).all() and (out[48:] == median).all()
    out = np.asarray(resize.fit(Image.fromarray(img), 80, 40, "Just Resize"))
    assert np.array_equal(out, cv2.resize(img, (80, 40), interpolation=cv2.INTER_AREA))
    # a map of a few colours (segmentation): nearest
    seg = np.zeros((50, 100, 3), np.uint8)
    seg[:, 30:60] = (10, 200, 30)
    seg[20:, 70:] = (120, 5, 250)
    out = np.asarray(resize.fit(Image.fromarray(seg), 64, 64, "Inner Fit (Scale to Fit)"))
    assert np.array_equal(out, cv2.resize(seg, (128, 64), interpolation=cv2.INTER_NEAREST)[:, 32:96])
    assert resize.resize_mode("Outer Fit (Shrink to Fit)") == "Resize and Fill"
    assert resize.resize_mode(3) == "Just Resize" and resize.resize_mode(1) == "Crop and Resize"
    with pytest.raises(RequestError):
        resize.resize_mode("Stretch")


def test_binary_maps_stay_binary_when_resized():
    edges = np.zeros((50, 100, 3), np.uint8)
    edges[10:40, 20:70] = 255  # a filled block: binary, not one-pixel edges
    out = np.asarray(resize.fit(Image.fromarray(edges), 200, 100, 0))
    grey = np.mean(cv2.resize(edges, (200, 100), interpolation=cv2.INTER_CUBIC).astype(np.float32), axis=2)
    _, expected = cv2.threshold(grey.clip(0, 255).astype(np.uint8), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert np.array_equal(out, np.stack([expected] * 3, axis=2))
    assert set(np.unique(out)) <= {0, 255}


def test_pixel_perfect_resolution_hand_computed():
    img = Image.new("RGB", (768, 512))
    assert resize.pixel_perfect_resolution(img, 512, 512, "Crop and Resize") == 512  # max(1, 2/3) * 512
    assert resize.pixel_perfect_resolution(img, 512, 512, "Resize and Fill") == 341  # 2/3 * 512 = 341.3
    img = Image.new("RGB", (1000, 600))
    assert resize.pixel_perfect_resolution(img, 832, 512, 0) == 512  # max(0.853, 0.832) * 600
    assert resize.pixel_perfect_resolution(img, 832, 512, 2) == 499  # 0.832 * 600 = 499.2


def test_cache_by_content_and_parameters():
    cache = ByteLRU("detections", 64 * 1024 * 1024)
    img = photo(seed=4)
    pre = preprocess.find("canny")
    first = preprocess.detect(pre, Image.fromarray(img), 256, 100, 200, {}, cache=cache)
    again = preprocess.detect(pre, Image.fromarray(img.copy()), 256, 100, 200, {}, cache=cache)
    assert again is first  # same content, another object: a hit
    other = preprocess.detect(pre, Image.fromarray(img), 256, 5, 10, {}, cache=cache)
    assert other is not first and not np.array_equal(np.asarray(other), np.asarray(first))
    changed = img.copy()
    changed[0, 0] = 255 - changed[0, 0]
    assert preprocess.detect(pre, Image.fromarray(changed), 256, 100, 200, {}, cache=cache) is not first
    tiny = ByteLRU("detections", 1)  # over budget: only the newest is kept
    one = preprocess.detect(pre, Image.fromarray(img), 256, 100, 200, {}, cache=tiny)
    preprocess.detect(pre, Image.fromarray(img), 256, 5, 10, {}, cache=tiny)
    assert preprocess.detect(pre, Image.fromarray(img), 256, 100, 200, {}, cache=tiny) is not one


def test_missing_weights_named_with_every_folder(tmp_path):
    root = tmp_path / "webui" / "models"
    root.mkdir(parents=True)
    pre = preprocess.find("depth_anything")
    with pytest.raises(MissingPreprocessorWeightsError) as err:
        preprocess.locate_weights(pre, [root])
    message = str(err.value)
    assert "depth_anything_vitl14.pth" in message
    assert str(tmp_path / "webui" / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads"
               / "depth_anything") in message
    assert str(root / "annotators") in message
    assert "comfyui_controlnet_aux" in message and err.value.http_status == 422
    assert preprocess.locate_weights(preprocess.find("canny"), [root]) == {}


def test_weights_found_where_users_keep_them(tmp_path):
    pre = preprocess.find("depth_anything")
    a1111 = tmp_path / "a" / "extensions" / "sd-webui-controlnet" / "annotator" / "downloads" / "depth_anything"
    a1111.mkdir(parents=True)
    (a1111 / "depth_anything_vitl14.pth").write_bytes(b"x")
    (tmp_path / "a" / "models").mkdir()
    found = preprocess.locate_weights(pre, [tmp_path / "a" / "models"])  # the extension beside models/
    assert found == {"depth_anything_vitl14.pth": a1111 / "depth_anything_vitl14.pth"}
    comfy = tmp_path / "c" / "custom_nodes" / "comfyui_controlnet_aux" / "ckpts" / "LiheYoung" / "Depth-Anything"
    (comfy / "checkpoints").mkdir(parents=True)
    (comfy / "checkpoints" / "depth_anything_vitl14.pth").write_bytes(b"x")
    (tmp_path / "c" / "models" / "controlnet").mkdir(parents=True)
    found = preprocess.locate_weights(pre, [tmp_path / "c" / "models" / "controlnet"])
    assert found["depth_anything_vitl14.pth"] == comfy / "checkpoints" / "depth_anything_vitl14.pth"
    own = tmp_path / "o" / "annotators" / "depth-anything"
    own.mkdir(parents=True)
    (own / "config.json").write_text("{}")
    (own / "model.safetensors").write_bytes(b"x")
    assert preprocess.locate_weights(pre, [tmp_path / "o"]) == {"depth_anything_vitl14.pth": own}


def test_unknown_module_is_a_typed_error_not_a_crash():
    with pytest.raises(ImpromptError):
        preprocess.find("")


@pytest.fixture(scope="module")
def annotator_pack(tmp_path_factory):
    """Tiny annotator weights in the A1111, ComfyUI and imprompt layouts (tools/annotator_pack.py)."""
    from tools.annotator_pack import write_annotator_pack

    return write_annotator_pack(tmp_path_factory.mktemp("annotators"))


def ext_depth(model, img, res):
    """The extension's depth_anything, written from its code, on a transformers model loaded by transformers."""
    import torch
    import torch.nn.functional as F

    padded, (th, tw) = ext_pad(img, res)
    h, w = padded.shape[:2]
    x = cv2.cvtColor(padded, cv2.COLOR_BGR2RGB) / 255.0  # the extension's call on its RGB image
    scale = max(518 / h, 518 / w)

    def multiple(v):
        y = int(np.round(v / 14) * 14)
        return int(np.ceil(v / 14) * 14) if y < 518 else y

    x = cv2.resize(x, (multiple(scale * w), multiple(scale * h)), interpolation=cv2.INTER_CUBIC)
    x = ((x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).transpose(2, 0, 1)
    with torch.no_grad():
        depth = model(pixel_values=torch.from_numpy(np.ascontiguousarray(x).astype(np.float32))[None]).predicted_depth
        depth = F.interpolate(depth[None], (h, w), mode="bilinear", align_corners=False)[0, 0]
    depth = ((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).numpy().astype(np.uint8)
    return np.stack([depth[:th, :tw]] * 3, axis=2)


def test_depth_anything_from_users_trees_equals_transformers(annotator_pack):
    from transformers import DepthAnythingForDepthEstimation

    img = photo(240, 180, seed=5)
    roots = annotator_pack["roots"]
    paths = annotator_pack["depth_anything"]
    v1 = DepthAnythingForDepthEstimation.from_pretrained(paths["imprompt_v1"]).eval()
    v2 = DepthAnythingForDepthEstimation.from_pretrained(paths["transformers_v2"]).eval()
    expected = {"depth_anything": ext_depth(v1, img, 256), "depth_anything_v2": ext_depth(v2, img, 256)}
    for name in expected:
        assert len(np.unique(expected[name])) > 20, name  # a real map, not a constant
    assert not np.array_equal(expected["depth_anything"], expected["depth_anything_v2"])
    for tree in ("a1111", "comfyui", "imprompt"):
        for name in ("depth_anything", "depth_anything_v2") if tree != "imprompt" else ("depth_anything",):
            pre = preprocess.find(name)
            weights = preprocess.locate_weights(pre, [roots[tree]])
            assert str(next(iter(weights.values()))).startswith(str(roots[tree].parent))
            out = run(name, img, 256, weights=weights, cache=None)
            assert np.abs(out.astype(int) - expected[name]).max() <= 1, (tree, name)


def test_tiny_depth_files_have_the_original_keys(annotator_pack):
    import torch
    from safetensors.torch import load_file

    paths = annotator_pack["depth_anything"]
    v1 = torch.load(paths["a1111_v1"], weights_only=True)
    v2 = load_file(str(paths["a1111_v2"]))
    for sd in (v1, v2):
        for key in ("pretrained.cls_token", "pretrained.pos_embed", "pretrained.mask_token",
                    "pretrained.patch_embed.proj.weight", "pretrained.blocks.7.attn.qkv.weight",
                    "pretrained.blocks.0.ls1.gamma", "pretrained.norm.weight", "depth_head.projects.3.weight",
                    "depth_head.resize_layers.3.weight", "depth_head.scratch.layer4_rn.weight",
                    "depth_head.scratch.refinenet4.resConfUnit2.conv1.weight",
                    "depth_head.scratch.refinenet1.out_conv.weight", "depth_head.scratch.output_conv2.2.bias"):
            assert key in sd, key
        assert not any(k.startswith(("backbone.", "neck.", "head.", "depth_head.resize_layers.2")) for k in sd)
        assert sd["pretrained.blocks.0.attn.qkv.weight"].shape == (3 * 128, 128)


def test_broken_depth_file_is_a_checkpoint_error_naming_it(tmp_path):
    import torch

    from imprompt.errors import CheckpointError

    folder = tmp_path / "annotators"
    folder.mkdir()
    torch.save({"pretrained.cls_token": torch.zeros(1, 1, 64), "something.else": torch.zeros(2)},
               folder / "depth_anything_vitl14.pth")
    pre = preprocess.find("depth_anything")
    weights = preprocess.locate_weights(pre, [tmp_path])
    with pytest.raises(CheckpointError) as err:
        run("depth_anything", photo(64, 64), 64, weights=weights, cache=None)
    assert "depth_anything_vitl14.pth" in str(err.value) and "missing" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# DWPose, lineart, HED (helper B): tiny weights in the real layouts; references from the extension's rules
# ---------------------------------------------------------------------------------------------------------------

A1111_DOWNLOADS = Path("extensions/sd-webui-controlnet/annotator/downloads")


def test_dwpose_tiny_graphs_have_the_real_names_layout_and_signatures(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from imprompt.preprocess import dwpose

    weights = dwpose.write_tiny_weights(tmp_path)
    assert weights == {"yolox_l.onnx": tmp_path / A1111_DOWNLOADS / "openpose" / "yolox_l.onnx",
                       "dw-ll_ucoco_384.onnx": tmp_path / A1111_DOWNLOADS / "openpose" / "dw-ll_ucoco_384.onnx"}
    assert dwpose.WEIGHTS == ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")
    det = ort.InferenceSession(str(weights["yolox_l.onnx"]))
    assert [(i.name, i.shape) for i in det.get_inputs()] == [("images", [1, 3, 640, 640])]
    assert [(o.name, o.shape) for o in det.get_outputs()] == [("output", [1, 8400, 85])]
    pose = ort.InferenceSession(str(weights["dw-ll_ucoco_384.onnx"]))
    assert [(i.name, i.shape) for i in pose.get_inputs()] == [("input", [1, 3, 384, 288])]
    assert [(o.name, o.shape) for o in pose.get_outputs()] == [("simcc_x", [1, 133, 576]), ("simcc_y", [1, 133, 768])]
    for path in weights.values():
        assert path.stat().st_size < 64_000


def dw_expected_people(weights, padded):
    """Where the extension's rules put each OpenPose body keypoint, from the tiny graphs' own outputs: YOLOX rows
    decoded by hand, NMS by IoU, the crop box grown 1.25x to 3:4, SimCC argmax / 2 mapped back."""
    ort = pytest.importorskip("onnxruntime")
    h, w = padded.shape[:2]
    ratio = min(640 / h, 640 / w)
    boxed = np.full((640, 640, 3), 114, np.uint8)
    boxed[:int(h * ratio), :int(w * ratio)] = cv2.resize(padded, (int(w * ratio), int(h * ratio)))
    det = ort.InferenceSession(str(weights["yolox_l.onnx"]))
    rows = det.run(None, {"images": boxed.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
    anchors = [(s, gy, gx) for s in (8, 16, 32) for gy in range(640 // s) for gx in range(640 // s)]
    found = []
    for i in np.nonzero(rows[:, 4] * rows[:, 5] > 0.1)[0]:
        s, gy, gx = anchors[i]
        cx, cy = (rows[i, 0] + gx) * s, (rows[i, 1] + gy) * s
        bw, bh = np.exp(rows[i, 2]) * s, np.exp(rows[i, 3]) * s
        found.append((rows[i, 4] * rows[i, 5], np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]) / ratio))
    found.sort(key=lambda f: -f[0])
    kept = []
    for score, box in found:
        def iou(a, b):
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
            area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
            return iw * ih / (area(a) + area(b) - iw * ih)
        if all(iou(box, k) <= 0.45 for _, k in kept):
            kept.append((score, box))
    people = []
    pose = ort.InferenceSession(str(weights["dw-ll_ucoco_384.onnx"]))
    zeros = np.zeros((1, 3, 384, 288), np.float32)
    sx, sy = pose.run(None, {"input": zeros})
    crop_points = np.stack([sx[0].argmax(1), sy[0].argmax(1)], 1) / 2.0
    scores = np.minimum(sx[0].max(1), sy[0].max(1))
    for score, box in kept:
        if score <= 0.3:
            continue
        centre = (box[:2] + box[2:]) / 2
        bw, bh = (box[2:] - box[:2]) * 1.25
        scale = np.array([bw, bw / 0.75]) if bw > bh * 0.75 else np.array([bh * 0.75, bh])
        points = crop_points / np.array([288, 384]) * scale + centre - scale / 2
        # OpenPose body order from COCO: nose, neck, r-shoulder, r-elbow, r-wrist, l-..., r-hip, r-knee, r-ankle,
        # l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear
        coco = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
        body = []
        for c in coco:
            if c is None:
                ok = scores[5] > 0.3 and scores[6] > 0.3
                body.append((points[5] + points[6]) / 2 if ok else None)
            else:
                body.append(points[c] if scores[c] >= 0.3 else None)
        people.append(body)
    return people


def test_dwpose_draws_each_person_where_the_tiny_model_puts_them(tmp_path):
    pytest.importorskip("onnxruntime")
    from imprompt.preprocess import dwpose

    weights = dwpose.write_tiny_weights(tmp_path)
    img = photo(700, 500, seed=3)
    out = dwpose.run(img, 500, -1, -1, weights)
    padded, (th, tw) = ext_pad(img, 500)
    assert padded.shape[:2] == (512, 704) and out.shape == (th, tw, 3) == (500, 700, 3) and out.dtype == np.uint8

    people = dw_expected_people(weights, padded)
    assert len(people) == 2  # the weaker overlapping box is suppressed, the faint one is under 0.3
    colours = {0: (255, 0, 0), 8: (0, 255, 170), 9: (0, 255, 255), 10: (0, 170, 255), 11: (0, 85, 255),
               12: (0, 0, 255), 13: (85, 0, 255), 17: (255, 0, 85)}
    for body in people:
        for index, colour in colours.items():
            x, y = body[index]
            assert tuple(out[int(y), int(x)]) == colour, (index, x, y)
        assert body[16] is None  # the right ear scores 0.1
        x, y = people[0][17]
        rx, ry = 2 * people[0][0][0] - x, y  # where the hidden right ear would be (mirror of the left)
        assert tuple(out[int(ry), int(rx)]) != (255, 0, 170)
    # one left ear (a colour nothing else uses) per person: nothing drawn for the suppressed or the faint box
    ears = np.all(out == (255, 0, 85), axis=2).astype(np.uint8)
    assert cv2.connectedComponents(ears)[0] - 1 == 2
    # hands (blue joints) and face ring (white) drawn too
    assert np.all(out == (0, 0, 255), axis=2).sum() > 100
    assert np.all(out == (255, 255, 255), axis=2).sum() > 100


def test_dwpose_keeps_its_sessions_while_the_files_are_unchanged(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from imprompt.preprocess import dwpose

    weights = dwpose.write_tiny_weights(tmp_path)
    opened = []
    real = ort.InferenceSession

    def counting(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    img = photo(256, 256)
    first = dwpose.run(img, 256, -1, -1, weights)
    again = dwpose.run(img, 256, -1, -1, weights)
    assert opened == ["yolox_l.onnx", "dw-ll_ucoco_384.onnx"]
    assert np.array_equal(first, again)


def test_dwpose_unreadable_graph_is_a_checkpoint_error_naming_the_file(tmp_path):
    pytest.importorskip("onnxruntime")
    from imprompt.errors import CheckpointError
    from imprompt.preprocess import dwpose

    weights = dwpose.write_tiny_weights(tmp_path)
    weights["yolox_l.onnx"].write_bytes(b"not an onnx graph")
    with pytest.raises(CheckpointError, match="yolox_l.onnx") as caught:
        dwpose.run(photo(128, 128), 128, -1, -1, weights)
    assert "yzd-v/DWPose" in str(caught.value)


def test_dwpose_through_the_registry_from_the_users_tree(tmp_path):
    """find -> locate_weights in the A1111 tree -> detect: the same map as the module computes."""
    pytest.importorskip("onnxruntime")
    from imprompt.preprocess import dwpose

    dwpose.write_tiny_weights(tmp_path)
    (tmp_path / "models").mkdir()
    pre = preprocess.find("dw_openpose_full")
    weights = preprocess.locate_weights(pre, [tmp_path / "models"])
    img = photo(320, 240, seed=5)
    out = run("dw_openpose_full", img, 320, weights=weights)
    assert np.array_equal(out, dwpose.run(img, 320, -1, -1, weights))
    assert out.any()


LINEART_KEYS = {"model0.1.weight", "model0.1.bias", "model1.0.weight", "model1.0.bias", "model1.3.weight",
                "model1.3.bias", "model3.0.weight", "model3.0.bias", "model3.3.weight", "model3.3.bias",
                "model4.1.weight", "model4.1.bias"} | {
    f"model2.{i}.conv_block.{j}.{p}" for i in range(3) for j in (1, 5) for p in ("weight", "bias")}


def lineart_reference(state, padded):
    """The informative-drawings generator written out with torch.nn.functional from the file's tensors."""
    import torch
    F = torch.nn.functional

    def conv(h, key, pad=0, **kw):
        if pad:
            h = F.pad(h, (pad,) * 4, mode="reflect")
        return F.conv2d(h, state[key + ".weight"], state[key + ".bias"], **kw)

    h = torch.from_numpy(padded).float().div(255.0).permute(2, 0, 1)[None]
    h = F.relu(F.instance_norm(conv(h, "model0.1", pad=3)))
    h = F.relu(F.instance_norm(conv(h, "model1.0", stride=2, padding=1)))
    h = F.relu(F.instance_norm(conv(h, "model1.3", stride=2, padding=1)))
    for i in range(3):
        r = F.relu(F.instance_norm(conv(h, f"model2.{i}.conv_block.1", pad=1)))
        h = h + F.instance_norm(conv(r, f"model2.{i}.conv_block.5", pad=1))
    for key in ("model3.0", "model3.3"):
        h = F.relu(F.instance_norm(F.conv_transpose2d(h, state[key + ".weight"], state[key + ".bias"], stride=2,
                                                      padding=1, output_padding=1)))
    line = torch.sigmoid(conv(h, "model4.1", pad=3))[0, 0].numpy()
    return 255 - (line * 255.0).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("name,file", [("lineart_realistic", "sk_model.pth"), ("lineart_coarse", "sk_model2.pth")])
def test_lineart_is_the_extensions_from_the_real_layout(tmp_path, name, file):
    import torch
    from imprompt.preprocess import lineart

    written = lineart.write_tiny_weights(tmp_path)
    assert written[file] == tmp_path / A1111_DOWNLOADS / "lineart" / file
    state = torch.load(written[file], map_location="cpu", weights_only=True)
    assert set(state) == LINEART_KEYS and state["model0.1.weight"].shape[1:] == (3, 7, 7)
    (tmp_path / "models").mkdir()
    weights = preprocess.locate_weights(preprocess.find(name), [tmp_path / "models"])
    assert weights == {file: written[file]}

    img = photo(300, 200, seed=7)
    out = run(name, img, 256, weights=weights)
    padded, (th, tw) = ext_pad(img, 256)
    expected = lineart_reference(state, padded)[:th, :tw]
    assert out.shape == (256, 384, 3) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert 10 < len(np.unique(out)) and out.std() > 20  # the tiny generator draws something, not a flat map


def test_lineart_realistic_and_coarse_use_their_own_files_and_keep_the_model(tmp_path, monkeypatch):
    from imprompt.loading import tensors
    from imprompt.preprocess import lineart

    weights = lineart.write_tiny_weights(tmp_path)
    img = photo(128, 128, seed=2)
    reads = []
    real = tensors.read_tensors
    monkeypatch.setattr(lineart, "read_tensors", lambda path, *a: (reads.append(Path(path).name), real(path, *a))[1])
    realistic = lineart.run(img, 128, -1, -1, weights)
    coarse = lineart.run_coarse(img, 128, -1, -1, weights)
    assert not np.array_equal(realistic, coarse)
    assert np.array_equal(lineart.run(img, 128, -1, -1, weights), realistic)
    assert reads.count("sk_model.pth") <= 1 and reads.count("sk_model2.pth") <= 1


def test_lineart_file_of_another_model_is_a_checkpoint_error_naming_it(tmp_path):
    import torch
    from imprompt.errors import CheckpointError
    from imprompt.preprocess import lineart

    weights = lineart.write_tiny_weights(tmp_path)
    torch.save({"model0.1.weight": torch.zeros(4, 3, 7, 7), "other.weight": torch.zeros(1)}, weights["sk_model.pth"])
    with pytest.raises(CheckpointError, match="sk_model.pth"):
        lineart.run(photo(64, 64), 64, -1, -1, weights)


HED_KEYS = {"norm"} | {f"block{b}.projection.{p}" for b in range(1, 6) for p in ("weight", "bias")} | {
    f"block{b}.convs.{c}.{p}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for c in range(n)
    for p in ("weight", "bias")}


def hed_reference(state, padded):
    """ControlNet's HED written out with torch.nn.functional from the file's tensors; the sigmoid of the mean of
    the five projections, each resized bilinearly to the input."""
    import torch
    F = torch.nn.functional
    h = torch.from_numpy(padded.copy()).float().permute(2, 0, 1)[None] - state["norm"]
    maps = []
    for b, n in zip(range(1, 6), (2, 2, 3, 3, 3)):
        if b > 1:
            h = F.max_pool2d(h, 2, 2)
        for c in range(n):
            h = F.relu(F.conv2d(h, state[f"block{b}.convs.{c}.weight"], state[f"block{b}.convs.{c}.bias"], padding=1))
        p = F.conv2d(h, state[f"block{b}.projection.weight"], state[f"block{b}.projection.bias"])
        maps.append(cv2.resize(p[0, 0].numpy(), (padded.shape[1], padded.shape[0]), interpolation=cv2.INTER_LINEAR))
    return 1 / (1 + np.exp(-np.mean(np.stack(maps, 2), 2).astype(np.float64)))


def test_hed_softedge_safe_and_scribble_are_the_extensions(tmp_path):
    import torch
    from imprompt.preprocess import hed

    written = hed.write_tiny_weights(tmp_path)
    assert written == {"ControlNetHED.pth": tmp_path / A1111_DOWNLOADS / "hed" / "ControlNetHED.pth"}
    state = torch.load(written["ControlNetHED.pth"], map_location="cpu", weights_only=True)
    assert set(state) == HED_KEYS and state["norm"].shape == (1, 3, 1, 1)
    (tmp_path / "models").mkdir()
    weights = preprocess.locate_weights(preprocess.find("softedge_hed"), [tmp_path / "models"])

    img = photo(300, 200, seed=11)
    padded, (th, tw) = ext_pad(img, 256)
    edge = hed_reference(state, padded)
    soft = (edge * 255.0).clip(0, 255).astype(np.uint8)[:th, :tw]
    out = run("softedge_hed", img, 256, weights=weights)
    assert out.shape == (256, 384, 3) and np.abs(out[..., 1].astype(int) - soft).max() <= 1
    assert len(np.unique(out)) > 50

    stepped = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
    safe = (stepped * 255.0).clip(0, 255).astype(np.uint8)[:th, :tw]
    got = hed.run_safe(img, 256, -1, -1, weights)
    assert set(np.unique(got)) <= {0, 127, 255} and (got[..., 0] != safe).mean() < 0.001

    x = cv2.GaussianBlur(soft.astype(np.float32), (0, 0), 3.0)
    y = np.zeros_like(x)
    for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
              [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]]):
        np.putmask(y, cv2.dilate(x, kernel=np.array(k, np.uint8)) == x, x)
    lines = np.where(y > 127, 255, 0).astype(np.uint8)
    scribble = cv2.GaussianBlur(lines, (0, 0), 3.0)
    scribble = np.where(scribble > 4, 255, 0).astype(np.uint8)
    got = run("scribble_hed", img, 256, weights=weights)
    assert set(np.unique(got)) == {0, 255} and (got[..., 0] != scribble).mean() < 0.001


@pytest.mark.parametrize("name", ["dw_openpose_full", "lineart_realistic", "lineart_coarse", "softedge_hed",
                                  "scribble_hed"])
def test_pose_lineart_hed_found_in_a1111_and_comfyui_trees_give_the_same_map(annotator_pack, name):
    pytest.importorskip("onnxruntime")
    pre = preprocess.find(name)
    roots = annotator_pack["roots"]
    a1111 = preprocess.locate_weights(pre, [roots["a1111"]])
    comfy = preprocess.locate_weights(pre, [roots["comfyui"]])
    assert set(a1111) == set(comfy) == set(pre.weights)
    assert all(A1111_DOWNLOADS.as_posix() in p.as_posix() for p in a1111.values())
    assert all("comfyui_controlnet_aux/ckpts/" in p.as_posix() for p in comfy.values())
    img = photo(256, 192, seed=13)
    out = run(name, img, 192, weights=a1111)
    assert out.shape == (192, 256, 3) and out.any()
    assert np.array_equal(out, run(name, img, 192, weights=comfy))


def test_dwpose_nobody_found_is_black_and_only_non_people_mean_the_whole_image_is_one_person(tmp_path):
    """The extension's two edge cases: nothing over 0.1 -> no pose; boxes that survive NMS but none a person over
    0.3 -> the pose model runs once on the whole image."""
    pytest.importorskip("onnxruntime")
    from imprompt.preprocess import dwpose

    img = photo(256, 256, seed=17)
    nobody = dwpose.write_tiny_weights(tmp_path / "nobody", detections=())
    assert not dwpose.run(img, 256, -1, -1, nobody).any()

    car = dwpose.write_tiny_weights(tmp_path / "car", detections=((320.0, 320.0, 100.0, 100.0, 0.9, 0.9, 2),))
    tall = photo(200, 400, seed=19)
    out = dwpose.run(tall, 200, -1, -1, car)
    padded, (th, tw) = ext_pad(tall, 200)
    assert padded.shape[:2] == (448, 256) and out.shape == (th, tw, 3) == (400, 200, 3)
    # the crop box is the whole padded 256x448 image: grown 1.25x to 320x560, then to 3:4 -> 420x560 around its centre
    scale = np.array([420.0, 560.0])
    nose = dwpose.tiny_template()[0] / np.array([288, 384]) * scale + np.array([128, 224]) - scale / 2
    assert tuple(out[int(nose[1]), int(nose[0])]) == (255, 0, 0)
    ears = np.all(out == (255, 0, 85), axis=2).astype(np.uint8)
    assert cv2.connectedComponents(ears)[0] - 1 == 1
