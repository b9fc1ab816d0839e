"""RetinaFace (facexlib's retinaface_resnet50) in plain torch: detections equal to a reference, the centre face.

facexlib cannot be imported here (it imports torchvision). The reference (`facexlib_reference.py`) is written from
the rules of facexlib's code (`detection/retinaface.py` forward and detect_faces, `retinaface_net.py` FPN/SSH/heads,
`retinaface_utils.py` PriorBox/decode/decode_landm and its torchvision NMS, `utils/face_restoration_helper.py`
get_center_face), as plain functions over the file's tensors in float64, independent of imprompt's module. Tiny
models in the real key layout (`imprompt.demo.tiny_faces`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from facexlib_reference import ref_detect, ref_raw

from imprompt.demo.tiny_faces import RETINAFACE_REAL as REAL
from imprompt.demo.tiny_faces import retinaface_shapes, write_tiny_retinaface
from imprompt.errors import CheckpointError
from imprompt.ipadapter import retinaface
from imprompt.ipadapter.retinaface import build_retinaface, center_face_landmarks, detect_faces

HEIGHT, WIDTH = 100, 136  # neither a multiple of 32: the grids are ceil(side / step)


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


def torchvision_nms(dets: np.ndarray, threshold: float) -> list[int]:
    """torchvision's CPU kernel (`nms_kernel_impl`), its rule written here: float32 boxes and IoU, the IoU compared
    with the double threshold (C++ promotes the float), the higher score first (a stable order on ties)."""
    order = sorted(range(len(dets)), key=lambda i: -float(dets[i, 4]))
    areas = [np.float32((d[2] - d[0]) * (d[3] - d[1])) for d in dets]
    suppressed, keep = set(), []
    for at, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[at + 1:]:
            w = max(np.float32(0), min(dets[i, 2], dets[j, 2]) - max(dets[i, 0], dets[j, 0]))
            h = max(np.float32(0), min(dets[i, 3], dets[j, 3]) - max(dets[i, 1], dets[j, 1]))
            inter = np.float32(w * h)
            if float(inter / (areas[i] + areas[j] - inter)) > threshold:  # a C++ float > double
                suppressed.add(j)
    return keep


def test_nms_at_an_iou_equal_to_the_threshold_is_torchvisions():
    """(0, 0, 10, 10) and (0, 0, 10, 4): IoU 40 / 100, float32(0.4) = 0.4000000059604645 > 0.4 in double, so the
    second box goes, as in torchvision; a box of IoU 0.39 stays."""
    from imprompt.ipadapter.retinaface import nms

    tie = np.array([[0, 0, 10, 10, 0.99], [0, 0, 10, 4, 0.98]], np.float32)
    assert np.float32(40) / np.float32(100) == np.float32(0.4)
    assert nms(tie, 0.4) == torchvision_nms(tie, 0.4) == [0]
    below = np.array([[0, 0, 10, 10, 0.99], [0, 0, 10, 3.9, 0.98], [20, 20, 30, 30, 0.97]], np.float32)
    assert nms(below, 0.4) == torchvision_nms(below, 0.4) == [0, 1, 2]


def test_a_detector_file_with_a_tensor_too_many_or_too_few_names_it_and_the_release():
    from imprompt.demo.tiny_faces import tiny_retinaface

    extra = {**tiny_retinaface(0), "module.body.fc.weight": torch.zeros(3)}
    short = {k: v for k, v in tiny_retinaface(0).items() if k != "module.ssh2.conv5X5_2.1.running_var"}
    for sd, named in ((extra, "unexpected body.fc.weight"), (short, "missing ssh2.conv5X5_2.1.running_var")):
        with pytest.raises(CheckpointError) as raised:
            build_retinaface(sd, "det.pth")
        message = str(raised.value)
        assert message.startswith("det.pth: cannot build this RetinaFace ResNet-50 detector: ") and named in message
        assert "facexlib's release v0.1.0 (https://github.com/xinntao/facexlib/releases/download/v0.1.0/" in message
