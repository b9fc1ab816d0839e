"""RetinaFace (ResNet-50) finds the faces in an image for PuLID: each one's box, score and five landmarks.

It follows facexlib (xinntao/facexlib, MIT: `detection/retinaface.py`, `retinaface_net.py`, `retinaface_utils.py`,
`utils/face_restoration_helper.py`), whose `retinaface_resnet50` PuLID's `get_id_embedding` runs through
`FaceRestoreHelper.get_face_landmarks_5(only_center_face=True)`. imprompt does not import facexlib: it imports
torchvision (for the ResNet-50 body and its NMS), which would pull a second, CUDA-built torch into the environment.
The rules, written here in plain torch and numpy:
- the network: torchvision's ResNet-50 under `body.` (its layer2..4 outputs), an FPN (1x1 `output1..3`, 3x3
  `merge1..2`), one SSH per level (`ssh1..3`), and three 1x1 heads per level (`ClassHead`, `BboxHead`,
  `LandmarkHead`, two anchors each); the FPN and SSH activations are LeakyReLU(0.1) when their width is at most 64,
  else ReLU (0 for the released 256);
- the input: the BGR image as float minus the means (104, 117, 123), at its own size (`use_origin_size=True`, the
  default every caller here keeps, so no resize);
- two square priors per cell (16/32, 64/128, 256/512 pixels at strides 8, 16, 32), decoded with variances 0.1/0.2,
  not clipped; scores are the face class's softmax; those above the threshold are sorted by score and thinned by NMS
  (torchvision's rule, which facexlib calls: a box goes when its float32 IoU with a kept, higher one is above the
  float64 threshold, areas without facexlib's older "+1").
Widths come from the tensors; the block counts from the keys; the strides are the architecture's.
Beyond diffusers: diffusers has no face detector; PuLID's preprocessing needs one.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError, ImageError
from ..loading.tensors import filled
from .facexlib_files import download_fix

FILE_NAME = "detection_Resnet50_Final.pth"
MEANS_BGR = (104.0, 117.0, 123.0)  # subtracted from the BGR pixels (0..255)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # cfg_re50's prior sides per level, in pixels
STEPS = (8, 16, 32)  # the levels' strides (ResNet-50's layer2, layer3, layer4)
VARIANCES = (0.1, 0.2)
LAYER_STRIDES = (1, 2, 2, 2)  # of ResNet's layer1..4 (torchvision's v1.5: the stride on the 3x3 conv)
HELPER_THRESHOLD = 0.97  # the score FaceRestoreHelper.get_face_landmarks_5 asks detect_faces for
FIX = download_fix(FILE_NAME)


def conv_bn(weight: torch.Tensor, stride: int = 1, slope: float | None = None) -> nn.Sequential:
    """facexlib's conv_bn / conv_bn_no_relu / conv_bn1X1 (`0` conv without bias, `1` BatchNorm, `2` LeakyReLU when
    `slope` is given), its shape read from the conv's weight."""
    out_ch, in_ch, k, _ = weight.shape
    layers = [nn.Conv2d(in_ch, out_ch, k, stride, k // 2, bias=False), nn.BatchNorm2d(out_ch)]
    if slope is not None:
        layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """torchvision's ResNet-50 block (1x1, 3x3 with the stride, 1x1, plus the shortcut), torchvision's names."""

    def __init__(self, sd: dict, prefix: str, stride: int):
        super().__init__()
        width, in_ch = sd[prefix + "conv1.weight"].shape[:2]
        out_ch = sd[prefix + "conv3.weight"].shape[0]
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU()
        self.downsample = None
        if prefix + "downsample.0.weight" in sd:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNetBody(nn.Module):
    """torchvision's resnet50 up to layer4 (what facexlib's IntermediateLayerGetter keeps), returning layer2..4."""

    def __init__(self, sd: dict):
        super().__init__()
        stem = sd["body.conv1.weight"].shape[0]
        self.conv1 = nn.Conv2d(sd["body.conv1.weight"].shape[1], stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for n, stride in enumerate(LAYER_STRIDES, start=1):
            count = block_count(sd, f"body.layer{n}.")
            blocks = [Bottleneck(sd, f"body.layer{n}.{i}.", stride if i == 0 else 1) for i in range(count)]
            setattr(self, f"layer{n}", nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    """facexlib's FPN: each level to the common width, the coarser level added (nearest upsampling) then merged."""

    def __init__(self, sd: dict):
        super().__init__()
        slope = leaky_slope(sd["fpn.output1.0.weight"].shape[0])
        for i in (1, 2, 3):
            setattr(self, f"output{i}", conv_bn(sd[f"fpn.output{i}.0.weight"], slope=slope))
        self.merge1 = conv_bn(sd["fpn.merge1.0.weight"], slope=slope)
        self.merge2 = conv_bn(sd["fpn.merge2.0.weight"], slope=slope)

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        p1, p2, p3 = self.output1(levels[0]), self.output2(levels[1]), self.output3(levels[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[2:], mode="nearest"))
        return [p1, p2, p3]


class SSH(nn.Module):
    """facexlib's SSH context module: a 3x3 branch (half the width) and 5x5- and 7x7-like stacks (a quarter each)."""

    def __init__(self, sd: dict, prefix: str):
        super().__init__()
        slope = leaky_slope(2 * sd[prefix + "conv3X3.0.weight"].shape[0])  # its output width: twice the 3x3 branch
        self.conv3X3 = conv_bn(sd[prefix + "conv3X3.0.weight"])
        self.conv5X5_1 = conv_bn(sd[prefix + "conv5X5_1.0.weight"], slope=slope)
        self.conv5X5_2 = conv_bn(sd[prefix + "conv5X5_2.0.weight"])
        self.conv7X7_2 = conv_bn(sd[prefix + "conv7X7_2.0.weight"], slope=slope)
        self.conv7x7_3 = conv_bn(sd[prefix + "conv7x7_3.0.weight"])  # facexlib's name, lower-case x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        five = self.conv5X5_1(x)
        seven = self.conv7x7_3(self.conv7X7_2(five))
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(five), seven], dim=1))


class Head(nn.Module):
    """One level's 1x1 head (`conv1x1`), its output as [B, H*W*anchors, values] in facexlib's order."""

    def __init__(self, weight: torch.Tensor, values: int):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(weight.shape[1], weight.shape[0], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFace(nn.Module):
    """The detector with facexlib's module names (so the released file loads strict); forward returns the box
    offsets [B, P, 4], the class probabilities [B, P, 2] and the landmark offsets [B, P, 10], P over the priors."""

    def __init__(self, sd: dict):
        super().__init__()
        self.body = ResNetBody(sd)
        self.fpn = FPN(sd)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(sd, f"ssh{i}.") for i in (1, 2, 3))
        self.ClassHead = nn.ModuleList(Head(sd[f"ClassHead.{i}.conv1x1.weight"], 2) for i in range(3))
        self.BboxHead = nn.ModuleList(Head(sd[f"BboxHead.{i}.conv1x1.weight"], 4) for i in range(3))
        self.LandmarkHead = nn.ModuleList(Head(sd[f"LandmarkHead.{i}.conv1x1.weight"], 10) for i in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = self.fpn(self.body(x))
        features = [self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        conf = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return loc, F.softmax(conf, dim=-1), landmarks


def leaky_slope(width: int) -> float:
    """facexlib's FPN/SSH activation: LeakyReLU(0.1) for widths up to 64 (its MobileNet), ReLU above (ResNet-50)."""
    return 0.1 if width <= 64 else 0.0


def block_count(sd: dict, prefix: str) -> int:
    """How many blocks a ResNet layer has in these tensors (resnet50's 3, 4, 6, 3)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in sd if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def build_retinaface(state_dict: dict, source: str = FILE_NAME) -> RetinaFace:
    """The detector from the file's tensors (facexlib's `module.` prefix dropped, as its loader does), in eval mode,
    fp32 on the tensors' device. A state dict saved before BatchNorm counted batches loads too (the count is unused)."""
    sd = {(k[7:] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    needed = ("body.conv1.weight", "body.layer4.0.conv1.weight", "fpn.output1.0.weight", "ssh1.conv3X3.0.weight",
              "ClassHead.0.conv1x1.weight", "BboxHead.2.conv1x1.weight", "LandmarkHead.2.conv1x1.weight")  # fmt: skip
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(source, f"not a RetinaFace ResNet-50 detector: no {', '.join(missing)} among its "
                              f"{len(sd)} tensors (expected facexlib's detection_Resnet50_Final.pth layout)", FIX)
    anchors = sd["ClassHead.0.conv1x1.weight"].shape[0] // 2
    if anchors != len(MIN_SIZES[0]):
        raise CheckpointError(source, f"a RetinaFace head with {anchors} anchors per cell; facexlib's priors give "
                              f"{len(MIN_SIZES[0])}", FIX)
    for key in [k for k in sd if k.endswith(".running_mean")]:
        sd.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.zeros((), dtype=torch.long))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    with torch.device("meta"):
        model = RetinaFace(sd)
    filled(model, sd, source, "RetinaFace ResNet-50 detector", FIX)
    return model.eval().requires_grad_(False)


def prior_boxes(height: int, width: int) -> torch.Tensor:
    """facexlib's PriorBox for cfg_re50: [P, 4] (cx, cy, w, h) relative to the image, per level, row by row, cell
    by cell, both sizes per cell; the grid ceil(side / step). Computed in float64 as facexlib's Python floats are,
    then float32."""
    priors = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step / height, (np.arange(cols) + 0.5) * step / width,
                             indexing="ij")  # fmt: skip
        for_cell = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], -1) for s in sizes]
        priors.append(np.stack(for_cell, axis=2).reshape(-1, 4))
    return torch.from_numpy(np.concatenate(priors).astype(np.float32))


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets -> (x1, y1, x2, y2) relative to the image: the centre moved by loc * 0.1 * prior side, the sides
    scaled by exp(loc * 0.2)."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    sides = priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])
    top_left = centre - sides / 2
    return torch.cat([top_left, top_left + sides], dim=1)


def decode_landmarks(pre: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """Offsets -> five (x, y) points relative to the image, each the prior's centre moved by pre * 0.1 * its side."""
    points = priors[:, None, :2] + pre.reshape(-1, 5, 2) * VARIANCES[0] * priors[:, None, 2:]
    return points.reshape(-1, 10)


def nms(dets: np.ndarray, threshold: float) -> list[int]:
    """The rows of `dets` ([N, 5]: x1, y1, x2, y2, score) that survive torchvision's NMS, best first: the best left
    is kept and every box whose IoU with it is above `threshold` goes (areas without +1; the IoU in float32,
    compared with the threshold in float64: 40/100 in float32 is above 0.4; equal scores keep their order)."""
    x1, y1, x2, y2, scores = (dets[:, i].astype(np.float32) for i in range(5))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = inter / (areas[i] + areas[rest] - inter)
        # torchvision's kernel compares the float IoU with the double threshold (the IoU promoted): so in float64
        # here, where NumPy 2 would cast the threshold to float32 (and keep a box whose float32 IoU rounds to it);
        # a NaN IoU (two empty boxes) suppresses nothing, as in torchvision
        order = rest[~(iou.astype(np.float64) > float(threshold))]
    return keep


def detect_faces(model: RetinaFace, bgr: np.ndarray, conf_threshold: float = 0.8,
                 nms_threshold: float = 0.4) -> np.ndarray:  # fmt: skip
    """facexlib's `RetinaFace.detect_faces` (use_origin_size=True) on a BGR uint8 image [H, W, 3]: float32 rows
    [N, 15] of x1, y1, x2, y2, score, then the five landmarks' x, y (eyes, nose, mouth corners), in pixels, best
    score first."""
    height, width = bgr.shape[:2]
    param = next(model.parameters())
    pixels = torch.from_numpy(np.ascontiguousarray(bgr, dtype=np.float32)).permute(2, 0, 1)[None]
    pixels = pixels - torch.tensor(MEANS_BGR).view(1, 3, 1, 1)
    with torch.inference_mode():
        loc, conf, landmarks = (t[0].float().cpu() for t in model(pixels.to(param.device, param.dtype)))
    priors = prior_boxes(height, width)
    boxes = (decode_boxes(loc, priors) * torch.tensor([width, height] * 2, dtype=torch.float32)).numpy()
    points = (decode_landmarks(landmarks, priors) * torch.tensor([width, height] * 5, dtype=torch.float32)).numpy()
    scores = conf[:, 1].numpy()
    chosen = np.where(scores > conf_threshold)[0]
    boxes, points, scores = boxes[chosen], points[chosen], scores[chosen]
    order = scores.argsort()[::-1]  # as facexlib sorts before its NMS (which keeps this order among equal scores)
    dets = np.hstack([boxes[order], scores[order, None]]).astype(np.float32)
    keep = nms(dets, nms_threshold)
    return np.concatenate([dets[keep], points[order][keep]], axis=1).astype(np.float32)


def center_face_landmarks(model: RetinaFace, rgb: np.ndarray) -> tuple[np.ndarray, dict] | None:
    """FaceRestoreHelper.get_face_landmarks_5(only_center_face=True) as PuLID calls it: detect on the BGR of `rgb`
    at facexlib's 0.97, then the face whose box centre is nearest the image centre (the first such one on a tie).
    Returns its landmarks [5, 2] float32 and {"box", "score", "faces_found"}, or None when no face passes."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"the face detector takes an RGB image as uint8 [H, W, 3]; got {rgb.dtype} "
                         f"{list(rgb.shape)}. Convert the image to 8-bit RGB first")  # fmt: skip
    rows = detect_faces(model, rgb[:, :, ::-1], HELPER_THRESHOLD)
    if len(rows) == 0:
        return None
    height, width = rgb.shape[:2]
    centres = np.stack([(rows[:, 0] + rows[:, 2]) / 2, (rows[:, 1] + rows[:, 3]) / 2], axis=1)
    best = int(np.argmin(np.linalg.norm(centres - np.array([width / 2, height / 2]), axis=1)))
    row = rows[best]
    info = {"box": [float(v) for v in row[:4]], "score": float(row[4]), "faces_found": len(rows)}
    return row[5:15].reshape(5, 2).astype(np.float32), info
