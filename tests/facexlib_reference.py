"""facexlib's face models written as plain functions over a file's tensors: the tests' references for PuLID's faces.

Written from the rules of facexlib's code (xinntao/facexlib, MIT), independent of imprompt's modules, in float64:
- RetinaFace (`detection/retinaface.py` forward and detect_faces, `retinaface_net.py` FPN/SSH/heads,
  `retinaface_utils.py` PriorBox/decode/decode_landm and its torchvision NMS), and `utils/face_restoration_helper.py`
  get_center_face;
- BiSeNet (`parsing/bisenet.py`, `resnet.py`), and PuLID's face-features image of its parsing (`pulid/pipeline_flux.py`
  get_id_embedding + to_gray).
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import torch
from torch.nn import functional as F

# ------------------------------------------------------------------------------------------------ RetinaFace


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


def ref_center_face(rows: np.ndarray, height: int, width: int) -> int:
    """facexlib's get_center_face: the row whose box centre is nearest the image centre (the first on a tie)."""
    distances = [math.hypot((r[0] + r[2]) / 2 - width / 2, (r[1] + r[3]) / 2 - height / 2) for r in rows]
    return distances.index(min(distances))


# ------------------------------------------------------------------------------------------------ BiSeNet


def ref_bisenet(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """facexlib's `BiSeNet.forward(x)[0]` as plain functions over the file's tensors (fp64): the logits of the main
    head, bilinearly upsampled (align_corners) to the input. Written from `bisenet.py` / `resnet.py`."""
    w = {k: v.double() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    x = x.double()

    def bn(name, h):
        return F.batch_norm(h, w[f"{name}.running_mean"], w[f"{name}.running_var"], w[f"{name}.weight"],
                            w[f"{name}.bias"], training=False, eps=1e-5)  # fmt: skip

    def cbr(name, h, stride=1):  # ConvBNReLU
        weight = w[f"{name}.conv.weight"]
        return F.relu(bn(f"{name}.bn", F.conv2d(h, weight, stride=stride, padding=weight.shape[-1] // 2)))

    def block(p, h, stride):
        r = F.relu(bn(p + "bn1", F.conv2d(h, w[p + "conv1.weight"], stride=stride, padding=1)))
        r = bn(p + "bn2", F.conv2d(r, w[p + "conv2.weight"], padding=1))
        s = bn(p + "downsample.1", F.conv2d(h, w[p + "downsample.0.weight"], stride=stride)) if p + "downsample.0.weight" in w else h
        return F.relu(s + r)

    def arm(name, h):
        feat = cbr(f"{name}.conv", h)
        att = F.avg_pool2d(feat, feat.shape[2:])
        return feat * torch.sigmoid(bn(f"{name}.bn_atten", F.conv2d(att, w[f"{name}.conv_atten.weight"])))

    r = "cp.resnet."
    h = F.max_pool2d(F.relu(bn(r + "bn1", F.conv2d(x, w[r + "conv1.weight"], stride=2, padding=3))), 3, 2, 1)
    feats = []
    for n in range(1, 5):
        for i in range(2):
            h = block(f"{r}layer{n}.{i}.", h, 2 if n > 1 and i == 0 else 1)
        feats.append(h)
    feat8, feat16, feat32 = feats[1:]
    avg = cbr("cp.conv_avg", F.avg_pool2d(feat32, feat32.shape[2:]))
    avg_up = F.interpolate(avg, feat32.shape[2:], mode="nearest")
    up32 = cbr("cp.conv_head32", F.interpolate(arm("cp.arm32", feat32) + avg_up, feat16.shape[2:], mode="nearest"))
    up16 = cbr("cp.conv_head16", F.interpolate(arm("cp.arm16", feat16) + up32, feat8.shape[2:], mode="nearest"))
    fuse = cbr("ffm.convblk", torch.cat([feat8, up16], dim=1))
    att = torch.sigmoid(F.conv2d(F.relu(F.conv2d(F.avg_pool2d(fuse, fuse.shape[2:]), w["ffm.conv1.weight"])), w["ffm.conv2.weight"]))
    fuse = fuse * att + fuse
    out = F.conv2d(cbr("conv_out.conv", fuse), w["conv_out.conv_out.weight"])
    return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def ref_face_features(sd: dict, rgb) -> torch.Tensor:
    """PuLID's face features image of an aligned RGB crop (uint8 H x W x 3): the crop / 255, normalised with
    ImageNet's mean and std for the parser, argmax; labels 0, 16, 18, 7, 8, 9, 14, 15 white, the rest
    0.299 R + 0.587 G + 0.114 B (`pipeline_flux.py` get_id_embedding + to_gray). Float32 [1, 3, H, W]."""
    image = torch.from_numpy(np.asarray(rgb, np.float32)).permute(2, 0, 1)[None] / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    labels = ref_bisenet(sd, (image - mean) / std).argmax(dim=1, keepdim=True)
    bg = sum(labels == i for i in (0, 16, 18, 7, 8, 9, 14, 15)).bool()
    gray = (0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(bg, torch.ones_like(image), gray)
