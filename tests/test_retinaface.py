"""RetinaFace (facexlib's retinaface_resnet50) in plain torch: detections equal to a reference, the centre face.

facexlib cannot be imported here (it imports torchvision). The reference below is written in this file from the
rules of facexlib's code (`detection/retinaface.py` forward and detect_faces, `retinaface_net.py` FPN/SSH/heads,
`retinaface_utils.py` PriorBox/decode/decode_landm and its torchvision NMS, `utils/face_restoration_helper.py`
get_center_face), as plain functions over the file's tensors in float64, independent of imprompt's module. Tiny
models in the real key layout (`tests/retinaface_files.py`).
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from imprompt.errors import CheckpointError
from imprompt.ipadapter import retinaface
from imprompt.ipadapter.retinaface import build_retinaface, center_face_landmarks, detect_faces
from retinaface_files import REAL, retinaface_shapes, write_tiny_retinaface

HEIGHT, WIDTH = 100, 136  # neither a multiple of 32: the grids are ceil(side / step)

# ------------------------------------------------------------------------------------------------ reference


def ref_raw(sd: dict, bgr: np.ndarray):
    """facexlib's RetinaFace forward + decode on a BGR uint8 image: boxes [P, 4], scores [P], landmarks [P, 10] in
    pixels, float64."""
    v = {k.removeprefix("module."): t.double() for k, t in sd.items() if t.is_floating_point()}

    def bn(x, p):
        return F.batch_norm(x, v[p + ".running_mean"], v[p + ".running_var"], v[p + ".weight"], v[p + ".bias"],
                            training=False, eps=1e-5)  # fmt: skip

    def cb(x, p, slope=None):  # facexlib's conv_bn / conv_bn1X1 (slope) and conv_bn_no_relu (None)
        w = v[p + ".0.weight"]
        x = bn(F.conv2d(x, w, padding=w.shape[-1] // 2), p + ".1")
        return x if slope is None else F.leaky_relu(x, slope)

    x = torch.from_numpy(bgr.astype(np.float64)).permute(2, 0, 1)[None]
    x = x - torch.tensor([104.0, 117.0, 123.0], dtype=torch.float64).view(1, 3, 1, 1)
    x = F.relu(bn(F.conv2d(x, v["body.conv1.weight"], stride=2, padding=3), "body.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    outs = []
    for n in (1, 2, 3, 4):
        count = len({k.split(".")[2] for k in v if k.startswith(f"body.layer{n}.")})
        for i in range(count):
            p = f"body.layer{n}.{i}"
            stride = 2 if (n > 1 and i == 0) else 1
            y = F.relu(bn(F.conv2d(x, v[p + ".conv1.weight"]), p + ".bn1"))
            y = F.relu(bn(F.conv2d(y, v[p + ".conv2.weight"], stride=stride, padding=1), p + ".bn2"))
            y = bn(F.conv2d(y, v[p + ".conv3.weight"]), p + ".bn3")
            if p + ".downsample.0.weight" in v:
                x = bn(F.conv2d(x, v[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
            x = F.relu(y + x)
        outs.append(x)
    width = v["fpn.output1.0.weight"].shape[0]
    leaky = 0.1 if width <= 64 else 0.0
    o1, o2, o3 = (cb(outs[i], f"fpn.output{i}", leaky) for i in (1, 2, 3))
    o2 = cb(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"), "fpn.merge2", leaky)
    o1 = cb(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"), "fpn.merge1", leaky)
    features = []
    for s, f in zip((1, 2, 3), (o1, o2, o3)):
        a = cb(f, f"ssh{s}.conv3X3")
        b1 = cb(f, f"ssh{s}.conv5X5_1", leaky)
        b = cb(b1, f"ssh{s}.conv5X5_2")
        c = cb(cb(b1, f"ssh{s}.conv7X7_2", leaky), f"ssh{s}.conv7x7_3")
        features.append(F.relu(torch.cat([a, b, c], 1)))

    def head(name, n):
        outs = []
        for i, f in enumerate(features):
            o = F.conv2d(f, v[f"{name}.{i}.conv1x1.weight"], v[f"{name}.{i}.conv1x1.bias"])
            outs.append(o.permute(0, 2, 3, 1).reshape(-1, n))
        return torch.cat(outs)

    loc, conf, landm = head("BboxHead", 4), F.softmax(head("ClassHead", 2), -1), head("LandmarkHead", 10)
    h, w = bgr.shape[:2]
    anchors = []  # PriorBox, cfg_re50
    for step, sizes in zip((8, 16, 32), ([16, 32], [64, 128], [256, 512])):
        for i, j in product(range(math.ceil(h / step)), range(math.ceil(w / step))):
            for size in sizes:
                anchors.append([(j + 0.5) * step / w, (i + 0.5) * step / h, size / w, size / h])
    pr = torch.tensor(anchors, dtype=torch.float64)
    assert pr.shape[0] == loc.shape[0]
    cxcy = pr[:, :2] + loc[:, :2] * 0.1 * pr[:, 2:]
    wh = pr[:, 2:] * torch.exp(loc[:, 2:] * 0.2)
    boxes = torch.cat([cxcy - wh / 2, cxcy + wh / 2], 1) * torch.tensor([w, h, w, h], dtype=torch.float64)
    marks = torch.cat([pr[:, :2] + landm[:, 2 * k: 2 * k + 2] * 0.1 * pr[:, 2:] for k in range(5)], 1)
    marks = marks * torch.tensor([w, h] * 5, dtype=torch.float64)
    return boxes.numpy(), conf[:, 1].numpy(), marks.numpy()


def ref_detect(sd: dict, bgr: np.ndarray, conf: float, nms: float):
    """facexlib's detect_faces: (rows [N, 15], how many passed the threshold before NMS)."""
    boxes, scores, marks = ref_raw(sd, bgr)
    idx = [i for i in sorted(range(len(scores)), key=lambda i: -scores[i]) if scores[i] > conf]
    kept = []
    for i in idx:  # torchvision's NMS: drop a box whose IoU with a kept (better) box is above the threshold
        ok = True
        for k in kept:
            ax1, ay1, ax2, ay2 = boxes[i]
            bx1, by1, bx2, by2 = boxes[k]
            inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
            union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
            if inter / union > nms:
                ok = False
                break
        if ok:
            kept.append(i)
    rows = np.array([[*boxes[i], scores[i], *marks[i]] for i in kept]).reshape(-1, 15)
    return rows, len(idx)


def threshold_between(scores: np.ndarray, rank: int) -> float:
    """A threshold letting about `rank` scores through, at a gap between two scores (no near-ties at the edge)."""
    s = np.sort(scores)[::-1]
    while s[rank - 1] - s[rank] < 1e-4:
        rank += 1
    return float((s[rank - 1] + s[rank]) / 2)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("width", [16, 72])  # LeakyReLU(0.1) below 64 channels, ReLU above (the released 256)
def test_detect_faces_equals_facexlib_rules(tmp_path, image, width):
    path = write_tiny_retinaface(tmp_path / "det.pth", seed=1, width=width)
    sd = torch.load(path, weights_only=True)
    model = build_retinaface(sd)
    _, scores, _ = ref_raw(sd, image)
    conf = threshold_between(scores, 60)
    expected, passed = ref_detect(sd, image, conf, 0.4)
    rows = detect_faces(model, image, conf_threshold=conf, nms_threshold=0.4)
    assert rows.dtype == np.float32 and rows.shape == expected.shape, (rows.shape, expected.shape)
    assert 2 <= len(rows) < passed  # several faces, and NMS removed some candidates
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-4)


def test_center_face_is_the_one_nearest_the_centre(monkeypatch, image):
    h, w = image.shape[:2]
    seen = {}

    def row(cx, cy, score, mark):
        return [cx - 10, cy - 10, cx + 10, cy + 10, score, *([mark] * 10)]

    rows = np.array([row(10, 10, 0.999, 1), row(w / 2 + 5, h / 2 - 3, 0.98, 2), row(w - 12, h / 2, 0.975, 3)],
                    dtype=np.float32)  # fmt: skip

    def fake(model, bgr, conf_threshold=0.8, nms_threshold=0.4):
        seen.update(bgr=bgr.copy(), conf=conf_threshold, nms=nms_threshold)
        return rows

    monkeypatch.setattr(retinaface, "detect_faces", fake)
    marks, info = center_face_landmarks(None, image)
    assert np.array_equal(seen["bgr"], image[:, :, ::-1]) and seen["conf"] == 0.97 and seen["nms"] == 0.4
    assert marks.shape == (5, 2) and marks.dtype == np.float32 and (marks == 2).all()
    assert info == {"box": [w / 2 - 5, h / 2 - 13, w / 2 + 15, h / 2 + 7], "score": pytest.approx(0.98),
                    "faces_found": 3}  # fmt: skip

    monkeypatch.setattr(retinaface, "detect_faces", lambda *a, **k: np.zeros((0, 15), np.float32))
    assert center_face_landmarks(None, image) is None


def test_center_face_none_when_no_score_passes(tmp_path, image):
    sd = torch.load(write_tiny_retinaface(tmp_path / "det.pth"), weights_only=True)
    _, scores, _ = ref_raw(sd, image[:, :, ::-1].copy())
    assert scores.max() < 0.97  # precondition: random weights score nothing at facexlib's 0.97
    assert center_face_landmarks(build_retinaface(sd), image) is None


@pytest.mark.parametrize("batches_tracked", [True, False])
def test_released_layout_loads_strict_on_meta(batches_tracked):
    shapes = retinaface_shapes(REAL["stem"], REAL["planes"], REAL["blocks"], REAL["width"], batches_tracked)
    # 318 in the body (conv1 + bn1: 6; 16 Bottlenecks x 18; 4 downsamples x 6), FPN 30, SSH 3 x 30, heads 18
    assert len(shapes) == (456 if batches_tracked else 383)
    sd = {"module." + k: torch.empty(s, device="meta", dtype=torch.long if not s else torch.float32)
          for k, s in shapes.items()}  # fmt: skip
    model = build_retinaface(sd)
    state = model.state_dict()
    full = retinaface_shapes(REAL["stem"], REAL["planes"], REAL["blocks"], REAL["width"])
    assert set(state) == set(full)
    assert all(tuple(state[k].shape) == s for k, s in full.items())
    # torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them in the fc facexlib drops; the FPN adds
    # 2,099,712, the three SSHs 1,661,184, the heads 24,672: RetinaFace-R50's published 27.29M
    assert sum(p.numel() for p in model.parameters()) == 25_557_032 - 2_049_000 + 2_099_712 + 1_661_184 + 24_672


def test_not_a_retinaface_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="not a RetinaFace ResNet-50 detector: no body.conv1.weight"):
        build_retinaface({"conv1.weight": torch.zeros(64, 3, 7, 7)})


def test_a_file_without_batch_counts_loads_whole(tmp_path, image):
    """A file saved before BatchNorm counted batches (383 keys) builds: counts filled, nothing left on meta."""
    sd = torch.load(write_tiny_retinaface(tmp_path / "det.pth"), weights_only=True)
    old = {k: t for k, t in sd.items() if not k.endswith("num_batches_tracked")}
    model = build_retinaface(old)
    assert not any(t.is_meta for t in model.state_dict().values())
    np.testing.assert_array_equal(detect_faces(model, image, 0.6), detect_faces(build_retinaface(sd), image, 0.6))
