"""A tiny stand-in for InsightFace's `buffalo_l` model pack, plus synthetic face images it detects.

The FaceID tests and the demo need InsightFace's own code to run end to end, offline: `FaceAnalysis` detection,
`face_align.norm_crop` alignment, ArcFace recognition (`face.normed_embedding`). The real pack is a ~300 MB download,
so this writes two small ONNX graphs (built with `onnx.helper`, deterministic weights, well under 1 MB) with the
input/output signatures InsightFace's model zoo routes on, in InsightFace's own folder layout
(`<root>/models/<name>/*.onnx`, which `FaceAnalysis(name=name, root=root)` uses without downloading):

- `det_10g.onnx`, an SCRFD detector: input `input.1` [1, 3, ?, ?], nine outputs (scores, box distances, 5 keypoints
  for strides 8, 16, 32; 2 anchors per location). It "detects" a large light blob on a dark background: the stride-32
  score is a sigmoid of a Gaussian-weighted brightness, kept only where it is a local maximum (so one blob gives one
  face); box and keypoints are constant offsets (a frontal face) from that anchor. Strides 8 and 16 never fire.
- `w600k_r50.onnx`, an ArcFace recognizer: input [1, 3, 112, 112], output [1, 512]; 14x14 average pooling and a
  fixed random projection, so different aligned crops give different embeddings.

`face_image(seed)` draws such a face (light ellipse with darker eyes and mouth, varied by the seed) that the detector
finds exactly once; `no_face_image()` is a dark image in which it finds nothing. The detector needs a large, light
face, 40% or more of the image's shorter side across, on a mostly dark image; two faces apart give two detections.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageDraw

OPSET = 17
IR_VERSION = 8  # opset 17 needs IR 8; old enough for any onnxruntime that runs opset 17
STRIDES = (8, 16, 32)
ANCHORS = 2
# Box distances (left, top, right, bottom) and keypoints (x, y) * 5, in stride-32 units from the anchor, which SCRFD
# puts at a cell's top-left corner: +0.5 recentres them on the cell. The keypoints are ArcFace's alignment template
# (eyes, nose, mouth corners) scaled so the eyes are ~3.4 cells (110 px at 640) apart.
BOX = (4.5 - 0.5, 4.5 - 0.5, 4.5 + 0.5, 4.5 + 0.5)
KPS = (-1.21, -0.30, 2.19, -0.32, 0.50, 1.63, -0.90, 3.63, 1.92, 3.61)
# Stride-32 score: sigmoid(GAIN * (blur - LEVEL)) of the brightness above BLACK, blurred by a Gaussian of SIGMA cells,
# times sigmoid(GAIN * (BACKDROP - mean brightness)): a light blob only counts on a mostly dark image.
BLACK, SIGMA, LEVEL, BACKDROP, GAIN = -0.6, 3.0, 0.2, 0.5, 25.0


def _f32(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _i64(name: str, value) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.int64), name)


def _detector() -> onnx.ModelProto:
    """SCRFD's 9-output signature (scores 8/16/32, boxes 8/16/32, keypoints 8/16/32; [N, 1|4|10] each, N = h*w*2)."""
    half = 7
    grid = np.arange(-half, half + 1, dtype=np.float32)
    gauss = np.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * SIGMA**2))
    inits = [
        _f32("black", BLACK), _f32("zero", 0.0), _f32("level", LEVEL), _f32("backdrop", BACKDROP),
        _f32("gain", GAIN),
        _f32("gauss", (gauss / gauss.sum())[None, None]), _i64("flat_shape", [-1, 1]),
        _f32("box", [BOX]), _f32("kps", [KPS]),
    ]  # fmt: skip
    node = helper.make_node
    nodes = [
        # Brightness above the background level; zero padding (and SCRFD's black letterbox) count as background.
        node("ReduceMean", ["input.1"], ["det_gray"], name="det_gray", axes=[1], keepdims=1),
        node("Sub", ["det_gray", "black"], ["det_lifted"], name="det_lift"),
        node("Relu", ["det_lifted"], ["det_light"], name="det_light"),
    ]
    # Stride 32: mean per cell, Gaussian blur over cells, sigmoid, kept only at local maxima (one per blob) and only
    # when the image is mostly dark (a white or grey image is not one big face).
    detect32 = [
        node("ReduceMean", ["det_cells32"], ["det_mean"], name="det_mean", keepdims=1),
        node("Sub", ["backdrop", "det_mean"], ["det_dark_margin"], name="det_dark_margin"),
        node("Mul", ["det_dark_margin", "gain"], ["det_dark_logit"], name="det_dark_logit"),
        node("Sigmoid", ["det_dark_logit"], ["det_dark"], name="det_dark"),
        node("Conv", ["det_cells32", "gauss"], ["det_blur"], name="det_blur", pads=[half] * 4),
        node("MaxPool", ["det_blur"], ["det_peak"], name="det_peak", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        node("GreaterOrEqual", ["det_blur", "det_peak"], ["det_is_peak"], name="det_is_peak"),
        node("Cast", ["det_is_peak"], ["det_peak_mask"], name="det_peak_mask", to=TensorProto.FLOAT),
        node("Sub", ["det_blur", "level"], ["det_margin"], name="det_margin"),
        node("Mul", ["det_margin", "gain"], ["det_logit"], name="det_logit"),
        node("Sigmoid", ["det_logit"], ["det_prob"], name="det_prob"),
        node("Mul", ["det_prob", "det_peak_mask"], ["det_peak_prob"], name="det_peak_prob"),
        node("Mul", ["det_peak_prob", "det_dark"], ["det_map32"], name="det_map32"),
    ]
    outputs: dict[str, list] = {"score": [], "bbox": [], "kps": []}
    for stride in STRIDES:
        s = str(stride)
        nodes.append(node("AveragePool", ["det_light"], [f"det_cells{s}"], name=f"det_cells{s}",
                          kernel_shape=[stride, stride], strides=[stride, stride]))  # fmt: skip
        if stride == 32:
            nodes += detect32
        else:  # only stride 32 detects; the others are all-zero maps of the right size
            nodes.append(node("Mul", [f"det_cells{s}", "zero"], [f"det_map{s}"], name=f"det_map{s}"))
        # [1, 1, h, w] -> [h*w*2, 1], the 2 anchors of a location next to each other (SCRFD's anchor order).
        nodes += [
            node("Concat", [f"det_map{s}"] * ANCHORS, [f"det_anchors{s}"], name=f"det_anchors{s}", axis=1),
            node("Transpose", [f"det_anchors{s}"], [f"det_hwa{s}"], name=f"det_hwa{s}", perm=[0, 2, 3, 1]),
            node("Reshape", [f"det_hwa{s}", "flat_shape"], [f"score_{s}"], name=f"score_{s}"),
            node("Mul", [f"score_{s}", "zero"], [f"det_zeros{s}"], name=f"det_zeros{s}"),
            node("Add", [f"det_zeros{s}", "box"], [f"bbox_{s}"], name=f"bbox_{s}"),
            node("Add", [f"det_zeros{s}", "kps"], [f"kps_{s}"], name=f"kps_{s}"),
        ]
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            outputs[kind].append(helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [f"n{s}", width]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


def _recognizer() -> onnx.ModelProto:
    """ArcFace's signature ([1, 3, 112, 112] -> [1, 512]): 8x8 colour thumbnail times a fixed random matrix. The
    matrix's columns are centred, which subtracts the thumbnail's mean first: embeddings follow the crop's pattern,
    not its overall brightness. Node names avoid Sub/Mul prefixes, so InsightFace normalises with 127.5 / 127.5."""
    weights = np.random.default_rng(112).standard_normal((3 * 8 * 8, 512)).astype(np.float32)
    weights -= weights.mean(axis=0, keepdims=True)
    node = helper.make_node
    nodes = [
        node("AveragePool", ["input.1"], ["rec_pool"], name="rec_pool", kernel_shape=[14, 14], strides=[14, 14]),
        node("Flatten", ["rec_pool"], ["rec_flat"], name="rec_flat"),
        node("MatMul", ["rec_flat", "projection"], ["683"], name="rec_project"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [1, 512])], [_f32("projection", weights)],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)


# each pack's file names for its detector and recognizer (antelopev2: SCRFD-10G with keypoints, ArcFace ResNet-100)
PACK_FILES = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"), "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}


def write_insightface_pack(root: Path, name: str = "buffalo_l") -> Path:
    """Write `root/models/<name>/{det_10g,w600k_r50}.onnx` (antelopev2: `{scrfd_10g_bnkps,glintr100}.onnx`), in
    InsightFace's layout: `FaceAnalysis(name=name, root=str(root))` finds the folder and downloads nothing; return
    that folder."""
    folder = Path(root) / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    detector, recognizer = PACK_FILES.get(name, PACK_FILES["buffalo_l"])
    for filename, model in ((detector, _detector()), (recognizer, _recognizer())):
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(folder / filename))
    return folder


def face_image(seed: int, size: int = 256) -> Image.Image:
    """A dark RGB square with one light "face" (ellipse with darker eyes and mouth) that the tiny detector finds
    exactly once; its position, size and colours vary with the seed, so seeds give different embeddings."""
    rng = np.random.default_rng(seed)
    background = tuple(int(v) for v in rng.integers(10, 36, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = size * (0.5 + rng.uniform(-0.08, 0.08, 2))
    rx = size * rng.uniform(0.18, 0.23)
    ry = rx * rng.uniform(1.15, 1.3)
    skin = tuple(int(v) for v in rng.integers(170, 246, 3))
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    dark = tuple(int(v) for v in rng.integers(20, 90, 3))
    eye_dx, eye_y, eye_r = rx * rng.uniform(0.3, 0.45), cy - ry * rng.uniform(0.15, 0.3), rx * rng.uniform(0.08, 0.15)
    for ex in (cx - eye_dx, cx + eye_dx):
        draw.ellipse((ex - eye_r, eye_y - eye_r * 0.7, ex + eye_r, eye_y + eye_r * 0.7), fill=dark)
    mouth_w, mouth_y = rx * rng.uniform(0.25, 0.45), cy + ry * rng.uniform(0.4, 0.55)
    draw.ellipse((cx - mouth_w, mouth_y - ry * 0.06, cx + mouth_w, mouth_y + ry * 0.06), fill=dark)
    return image


def no_face_image(size: int = 256) -> Image.Image:
    """A dark RGB square with a faint gradient and no face: the tiny detector finds nothing in it."""
    ramp = np.linspace(12, 40, size, dtype=np.float32)
    gray = (ramp[None, :] + ramp[:, None]) / 2
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2).astype(np.uint8), "RGB")
