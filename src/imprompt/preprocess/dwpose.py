"""DWPose whole-body pose (`dw_openpose_full`: body, hands and face) as the A1111 ControlNet extension runs it.

Two ONNX graphs from huggingface.co/yzd-v/DWPose:

- `yolox_l.onnx`, a YOLOX-L person detector: input [1, 3, 640, 640] (the image scaled to fit, top-left, on grey 114,
  RGB as the extension passes it, 0..255), output [1, 8400, 85]: per anchor of the stride 8/16/32 grids, the box
  centre as an offset in cells, log width/height in cells, objectness and 80 class probabilities.
- `dw-ll_ucoco_384.onnx`, DWPose's whole-body model: one person crop at a time, input [1, 3, 384, 288] (the box
  grown 1.25x to a 3:4 aspect, ImageNet-normalised), outputs SimCC `simcc_x` [1, 133, 576] and `simcc_y`
  [1, 133, 768] (two bins a pixel) for the 133 COCO-WholeBody keypoints.

Written from reading the extension's rules (annotator/openpose: cv_ox_det, cv_ox_pose, wholebody, util): person
boxes by class-aware NMS (IoU 0.45, score 0.1) then score > 0.3; if some box passed NMS but no person passed 0.3
the whole image is one person crop (the extension's quirk, kept); SimCC argmax decoding (score = the smaller peak);
a neck between the shoulders; COCO-WholeBody -> OpenPose order; keypoints below 0.3 dropped; then the OpenPose
drawing (17 limbs as filled ellipses in 60% colour, stick width 4, joints radius 4; hand edges coloured by hue,
joints blue; face points white, radius 3) on a black canvas of the detect resolution. The extension runs the graphs
with OpenCV's DNN module; onnxruntime runs the same graphs here.

Where users keep the files (A1111 / ComfyUI):
  extensions/sd-webui-controlnet/annotator/downloads/openpose/{yolox_l.onnx,dw-ll_ucoco_384.onnx}
  custom_nodes/comfyui_controlnet_aux/ckpts/yzd-v/DWPose/{yolox_l.onnx,dw-ll_ucoco_384.onnx}
"""

from __future__ import annotations

import colorsys
import math
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .loaded import cached_model
from .resize import resize_with_pad

DETECTOR = "yolox_l.onnx"
POSE = "dw-ll_ucoco_384.onnx"
WEIGHTS: tuple[str, ...] = (DETECTOR, POSE)
A1111_FOLDER = "extensions/sd-webui-controlnet/annotator/downloads/openpose"
COMFYUI_FOLDER = "custom_nodes/comfyui_controlnet_aux/ckpts/yzd-v/DWPose"
SOURCE = "https://huggingface.co/yzd-v/DWPose"

DETECT_SIZE = 640
STRIDES = (8, 16, 32)
POSE_SIZE = (288, 384)  # (width, height) of a person crop
SIMCC_SPLIT = 2.0
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])
KEEP_SCORE = 0.3

# COCO-WholeBody (with a neck inserted at 17) -> OpenPose body order, as the extension permutes it.
MMPOSE_ORDER = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
OPENPOSE_ORDER = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
         (2, 1), (1, 15), (15, 17), (1, 16), (16, 18)]  # 1-based OpenPose indices
BODY_COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255),
                (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
STICK_WIDTH = 4
EPS = 0.01



def run(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float,
        weights: dict[str, Path]) -> np.ndarray:
    """`dw_openpose_full`: the pose map (HxWx3 uint8 RGB) at the detect resolution; the thresholds are unused."""
    padded, remove_pad = resize_with_pad(image, resolution)
    detector = load_session(weights[DETECTOR], "detector")
    pose = load_session(weights[POSE], "pose")
    people = detect_keypoints(padded, detector, pose)
    return remove_pad(draw_people(people, padded.shape[0], padded.shape[1]))


def load_session(path: Path, role: str):
    """An onnxruntime session for one graph, kept while the file is unchanged (keyed by path, size, mtime)."""
    return cached_model(path, lambda: open_session(Path(path), role), role)


def open_session(path: Path, role: str):
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise CheckpointError(path, f"is not a readable ONNX graph ({error})",
                              f"download the DWPose {role} again from {SOURCE}") from error
    check_signature(session, path, role)
    return session


def check_signature(session, path: Path, role: str) -> None:
    """Refuse a graph whose outputs are not the YOLOX detector's or DWPose's, naming what was found."""
    outputs = session.get_outputs()
    if role == "detector":
        ok = len(outputs) >= 1 and outputs[0].shape[-1] == 85
        expected = "one output [1, N, 85] (YOLOX boxes, objectness, 80 COCO classes)"
    else:
        ok = len(outputs) >= 2 and outputs[0].shape[-2] == 133 and outputs[1].shape[-2] == 133
        expected = "two outputs simcc_x [1, 133, 576] and simcc_y [1, 133, 768] (DWPose whole-body)"
    if not ok:
        found = ", ".join(f"{o.name} {o.shape}" for o in outputs)
        raise CheckpointError(path, f"expected the DWPose {role} with {expected}, found outputs {found}",
                              f"use {DETECTOR if role == 'detector' else POSE} from {SOURCE}")


# ---- detection -------------------------------------------------------------------------------------------------


def letterbox(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The detector's input: scaled to fit 640x640 (bilinear), top-left on grey 114, CHW float32."""
    import cv2

    ratio = min(DETECT_SIZE / image.shape[0], DETECT_SIZE / image.shape[1])
    new_w, new_h = int(image.shape[1] * ratio), int(image.shape[0] * ratio)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    canvas = np.full((DETECT_SIZE, DETECT_SIZE, 3), 114, dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    return np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32), ratio


def decode_yolox(raw: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x0, y0, x1, y1) in image pixels and per-class scores from the detector's [8400, 85] rows."""
    cells, steps = [], []
    for stride in STRIDES:
        size = DETECT_SIZE // stride
        xs, ys = np.meshgrid(np.arange(size), np.arange(size))
        cells.append(np.stack((xs, ys), 2).reshape(-1, 2))
        steps.append(np.full((size * size, 1), stride))
    cells, steps = np.concatenate(cells), np.concatenate(steps)
    rows = raw.copy()
    rows[:, :2] = (rows[:, :2] + cells) * steps
    rows[:, 2:4] = np.exp(rows[:, 2:4]) * steps
    scores = rows[:, 4:5] * rows[:, 5:]
    boxes = np.ones_like(rows[:, :4])
    boxes[:, 0] = rows[:, 0] - rows[:, 2] / 2.0
    boxes[:, 1] = rows[:, 1] - rows[:, 3] / 2.0
    boxes[:, 2] = rows[:, 0] + rows[:, 2] / 2.0
    boxes[:, 3] = rows[:, 1] + rows[:, 3] / 2.0
    boxes /= ratio
    return boxes, scores


def suppress(boxes: np.ndarray, scores: np.ndarray, iou_limit: float = 0.45) -> list[int]:
    """Greedy NMS, best first, with the +1 pixel areas of the extension's (py-faster-rcnn's) version."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        best, rest = order[0], order[1:]
        keep.append(best)
        w = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
        overlap = w * h / (areas[best] + areas[rest] - w * h)
        order = rest[overlap <= iou_limit]
    return keep


def detect_people(image: np.ndarray, session) -> np.ndarray | None:
    """Person boxes [n, 4]; None when no class scored over 0.1 anywhere; empty when only non-people (or weak
    people) passed NMS, which the pose step then treats as one person filling the image, as the extension does."""
    tensor, ratio = letterbox(image)
    raw = session.run(None, {session.get_inputs()[0].name: tensor[None]})[0][0]
    boxes, scores = decode_yolox(raw, ratio)
    any_class = False
    people = np.zeros((0, 4), dtype=boxes.dtype)
    for cls in range(scores.shape[1]):
        valid = scores[:, cls] > 0.1
        if not valid.any():
            continue
        kept = suppress(boxes[valid], scores[valid, cls])
        if not kept:
            continue
        any_class = True
        if cls == 0:
            kept_boxes, kept_scores = boxes[valid][kept], scores[valid, cls][kept]
            people = kept_boxes[kept_scores > KEEP_SCORE]
    return people if any_class else None


# ---- pose ------------------------------------------------------------------------------------------------------


def crop_transform(box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, scale, 2x3 affine) mapping the box grown 1.25x to 3:4 onto the 288x384 crop."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box)
    centre = np.array([x0 + x1, y0 + y1]) * 0.5
    w, h = (x1 - x0) * 1.25, (y1 - y0) * 1.25
    aspect = POSE_SIZE[0] / POSE_SIZE[1]
    scale = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    out_w, out_h = POSE_SIZE

    def third(a, b):
        d = a - b
        return b + np.array([-d[1], d[0]])

    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = centre
    src[1] = centre + np.array([0.0, scale[0] * -0.5])
    src[2] = third(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [out_w * 0.5, out_h * 0.5]
    dst[1] = np.array([out_w * 0.5, out_h * 0.5]) + np.array([0.0, out_w * -0.5])
    dst[2] = third(dst[0], dst[1])
    return centre, scale, cv2.getAffineTransform(src, dst)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints (K, 2) in crop pixels and scores (K,): argmax per axis, the smaller peak as score, -1 if <= 0."""
    xs, ys = simcc_x.reshape(simcc_x.shape[-2], -1), simcc_y.reshape(simcc_y.shape[-2], -1)
    locs = np.stack((np.argmax(xs, axis=1), np.argmax(ys, axis=1)), axis=-1).astype(np.float32)
    scores = np.minimum(np.amax(xs, axis=1), np.amax(ys, axis=1))
    locs[scores <= 0.0] = -1
    return locs / SIMCC_SPLIT, scores


def detect_keypoints(image: np.ndarray, detector, pose) -> list[np.ndarray]:
    """Per person, 134 rows (x, y, score) in image pixels, in the extension's order (OpenPose body 0-17, feet,
    face 24-91, left hand 92-112, right hand 113-133)."""
    import cv2

    boxes = detect_people(image, detector)
    if boxes is None:
        return []
    if len(boxes) == 0:
        boxes = [[0, 0, image.shape[1], image.shape[0]]]
    people = []
    for box in boxes:
        centre, scale, matrix = crop_transform(box)
        crop = cv2.warpAffine(image, matrix, POSE_SIZE, flags=cv2.INTER_LINEAR)
        tensor = ((crop - MEAN) / STD).transpose(2, 0, 1)[None].astype(np.float32)
        simcc_x, simcc_y = pose.run(None, {pose.get_inputs()[0].name: tensor})[:2]
        locs, scores = decode_simcc(simcc_x[0], simcc_y[0])
        points = locs / np.array(POSE_SIZE) * scale + centre - scale / 2
        rows = np.concatenate((points, scores[:, None]), axis=-1)
        neck = np.mean(rows[[5, 6]], axis=0)
        neck[2] = float(rows[5, 2] > KEEP_SCORE and rows[6, 2] > KEEP_SCORE)
        rows = np.insert(rows, 17, neck, axis=0)
        rows[OPENPOSE_ORDER] = rows[MMPOSE_ORDER]
        people.append(rows)
    return people


# ---- drawing ---------------------------------------------------------------------------------------------------


def kept(rows: np.ndarray) -> list | None:
    """(x, y) per keypoint scoring 0.3 or more, else None; None for a part with none kept."""
    points = [(float(x), float(y)) if s >= KEEP_SCORE else None for x, y, s in rows]
    return None if all(p is None for p in points) else points


def scale_for(points: list, canvas: np.ndarray) -> tuple[float, float]:
    """The extension's rule: coordinates all within [0, 1] are read as fractions of the canvas, else pixels."""
    present = [p for p in points if p is not None]
    if present and all(abs(x) <= 1 and abs(y) <= 1 for x, y in present):
        return float(canvas.shape[0]), float(canvas.shape[1])
    return 1.0, 1.0


def draw_body(canvas: np.ndarray, points: list) -> None:
    import cv2

    h, w = scale_for(points, canvas)
    for (a, b), colour in zip(LIMBS, BODY_COLOURS):
        p, q = points[a - 1], points[b - 1]
        if p is None or q is None:
            continue
        xs, ys = np.array([p[0], q[0]]) * w, np.array([p[1], q[1]]) * h
        length = math.hypot(ys[0] - ys[1], xs[0] - xs[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), STICK_WIDTH),
                                   int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in colour])
    for point, colour in zip(points, BODY_COLOURS):
        if point is not None:
            cv2.circle(canvas, (int(point[0] * w), int(point[1] * h)), 4, colour, thickness=-1)


def draw_hand(canvas: np.ndarray, points: list | None) -> None:
    import cv2

    if not points:
        return
    h, w = scale_for(points, canvas)
    for index, (a, b) in enumerate(HAND_EDGES):
        p, q = points[a], points[b]
        if p is None or q is None:
            continue
        x1, y1, x2, y2 = int(p[0] * w), int(p[1] * h), int(q[0] * w), int(q[1] * h)
        if x1 > EPS and y1 > EPS and x2 > EPS and y2 > EPS:
            colour = [c * 255 for c in colorsys.hsv_to_rgb(index / float(len(HAND_EDGES)), 1.0, 1.0)]
            cv2.line(canvas, (x1, y1), (x2, y2), colour, thickness=2)
    for point in points:
        if point is not None:
            x, y = int(point[0] * w), int(point[1] * h)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def draw_face(canvas: np.ndarray, points: list | None) -> None:
    import cv2

    if not points:
        return
    h, w = scale_for(points, canvas)
    for point in points:
        if point is not None:
            x, y = int(point[0] * w), int(point[1] * h)
            if x > EPS and y > EPS:
                cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


def draw_people(people: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """The OpenPose picture of everyone: body, left hand, right hand, face (68 points + both eyes), in that order."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for rows in people:
        body = kept(rows[:18]) or [None] * 18
        face = kept(rows[24:92])
        if face is not None:
            face = face + [body[14], body[15]]
        draw_body(canvas, body)
        draw_hand(canvas, kept(rows[92:113]))
        draw_hand(canvas, kept(rows[113:134]))
        draw_face(canvas, face)
    return canvas


# ---- tiny stand-ins in the real layout (tests and the demo) ----------------------------------------------------

# Detector rows the tiny YOLOX graph emits, in its 640x640 input space: (centre x, centre y, width, height,
# objectness, class probability[, COCO class, 0 = person]). Two people; a weaker copy of the first that NMS
# removes; a faint one under 0.3.
TINY_DETECTIONS = ((200.0, 210.0, 120.0, 300.0, 0.95, 0.95),
                   (440.0, 230.0, 110.0, 280.0, 0.9, 0.9),
                   (216.0, 220.0, 120.0, 300.0, 0.8, 0.8),
                   (560.0, 120.0, 60.0, 120.0, 0.5, 0.4))
TINY_HIDDEN = (4, 100, 101)  # COCO-WholeBody keypoints the tiny pose graph scores 0.1 (right ear, 2 left-hand points)
TINY_SCORE = 0.9


def tiny_template() -> np.ndarray:
    """The 133 (x, y) crop positions (in the 288x384 crop) the tiny pose graph puts keypoints at: a standing figure
    with feet, a 68-point face ring and two fanned hands, in COCO-WholeBody order."""
    body = [(144, 60), (154, 50), (134, 50), (166, 56), (122, 56), (190, 110), (98, 110), (210, 170), (78, 170),
            (220, 225), (68, 225), (175, 215), (113, 215), (180, 290), (108, 290), (182, 350), (106, 350)]
    feet = [(192, 362), (200, 364), (180, 366), (96, 362), (88, 364), (108, 366)]
    face = [(144 + 30 * math.cos(2 * math.pi * i / 68), 64 + 36 * math.sin(2 * math.pi * i / 68)) for i in range(68)]

    def hand(wx, wy, direction):
        points = [(wx, wy)]
        for finger in range(5):
            angle = math.radians(60 + 15 * finger) if direction > 0 else math.radians(120 - 15 * finger)
            points += [(wx + 8 * j * math.cos(angle), wy + 8 * j * math.sin(angle)) for j in (1, 2, 3, 4)]
        return points

    return np.array(body + feet + face + hand(220, 225, 1) + hand(68, 225, -1), dtype=np.float64)


def write_tiny_weights(folder: Path, detections=TINY_DETECTIONS) -> dict[str, Path]:
    """Tiny YOLOX and DWPose ONNX graphs with the real names and signatures, where the A1111 extension keeps them
    under `folder` (a WebUI root). Their outputs are constants (plus a small term from the image's mean, so the
    graphs read their input): the boxes of `detections` (TINY_DETECTIONS) and the pose of tiny_template()."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    target = Path(folder) / A1111_FOLDER
    target.mkdir(parents=True, exist_ok=True)

    def save(nodes, inits, input_info, outputs, path, name):
        graph = helper.make_graph(nodes, name, [input_info], outputs, initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        onnx.save(model, str(path))

    def mean_nodes(input_name):
        return [helper.make_node("ReduceMean", [input_name], ["mean"], keepdims=0),
                helper.make_node("Mul", ["mean", "drift"], ["shift"])]

    # Detector: 8400 rows of zeros, with TINY_DETECTIONS scattered onto the stride-32 anchors they fall in.
    offsets = {8: 0, 16: 80 * 80, 32: 80 * 80 + 40 * 40}
    indices, rows = [], []
    for cx, cy, w, h, objectness, probability, *cls in detections:
        stride = 32
        gx, gy = int(cx // stride), int(cy // stride)
        anchor = offsets[stride] + gy * (DETECT_SIZE // stride) + gx
        row = np.zeros(85, dtype=np.float32)
        row[:5] = [cx / stride - gx, cy / stride - gy, math.log(w / stride), math.log(h / stride), objectness]
        row[5 + (cls[0] if cls else 0)] = probability
        indices.append([0, anchor])
        rows.append(row)
    det_nodes = mean_nodes("images") + [
        helper.make_node("Add", ["rows", "shift"], ["updates"]),
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ScatterND", ["zeros", "indices", "updates"], ["output"])]
    drift = np.zeros((len(rows), 85), dtype=np.float32)
    drift[:, 0:2] = 1e-7  # box centres move by ~1e-7 cells per unit of mean brightness: read, yet negligible
    rows = np.array(rows, dtype=np.float32).reshape(-1, 85)
    det_inits = [numpy_helper.from_array(rows, "rows"), numpy_helper.from_array(drift, "drift"),
                 numpy_helper.from_array(np.array([1, 8400, 85], dtype=np.int64), "shape"),
                 numpy_helper.from_array(np.array(indices, dtype=np.int64).reshape(-1, 2), "indices")]
    save(det_nodes, det_inits, helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640]),
         [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8400, 85])], target / DETECTOR, "tiny_yolox")

    # Pose: each keypoint's SimCC rows are zero but for one peak at the template position (two bins a pixel).
    template = tiny_template()
    scores = np.full(133, TINY_SCORE, dtype=np.float32)
    scores[list(TINY_HIDDEN)] = 0.1
    pose_nodes = mean_nodes("input")
    pose_inits = [numpy_helper.from_array(np.full(133, 1e-3, dtype=np.float32), "drift")]
    outputs = []
    for axis, (name, bins) in enumerate((("simcc_x", 576), ("simcc_y", 768))):
        idx = np.array([[0, k, int(round(template[k, axis] * SIMCC_SPLIT))] for k in range(133)], dtype=np.int64)
        pose_nodes += [
            helper.make_node("Add", ["scores", "shift"], [f"{name}_peaks"]),
            helper.make_node("ConstantOfShape", [f"{name}_shape"], [f"{name}_zeros"],
                             value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
            helper.make_node("ScatterND", [f"{name}_zeros", f"{name}_idx", f"{name}_peaks"], [name])]
        pose_inits += [numpy_helper.from_array(np.array([1, 133, bins], dtype=np.int64), f"{name}_shape"),
                       numpy_helper.from_array(idx, f"{name}_idx")]
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 133, bins]))
    pose_inits.append(numpy_helper.from_array(scores, "scores"))
    save(pose_nodes, pose_inits, helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 384, 288]),
         outputs, target / POSE, "tiny_dwpose")
    return {name: target / name for name in WEIGHTS}
