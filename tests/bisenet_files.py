"""Tiny facexlib BiSeNet face parsers in `parsing_bisenet.pth`'s key layout, and facexlib's two files for PuLID tests.

The table of names and shapes follows facexlib's constructors (`facexlib/parsing/bisenet.py`: `BiSeNet(19)` with its
`ContextPath` (`resnet`, `arm16`, `arm32`, `conv_head32`, `conv_head16`, `conv_avg`), `FeatureFusionModule(256, 256)`
as `ffm`, `BiSeNetOutput`s `conv_out` (256 -> 256), `conv_out16` and `conv_out32` (128 -> 64); `resnet.py`'s
`ResNet18`: stem 64, stages 64/128/256/512 of two `BasicBlock`s, a `downsample` (1x1 conv + BN) where the width or
stride changes), written here from that code, not from imprompt's module. Every BatchNorm has weight, bias,
running_mean, running_var and num_batches_tracked, as `torch.save(model.state_dict())` writes them.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

REAL = dict(stem=64, stages=(64, 128, 256, 512), arm=128, ffm=256, head=256, aux=64)
TINY = dict(stem=8, stages=(8, 16, 24, 32), arm=16, ffm=32, head=24, aux=8)
CLASSES = 19
FILE_NAME = "parsing_bisenet.pth"
DETECTOR_NAME = "detection_Resnet50_Final.pth"


def bisenet_table(stem, stages, arm, ffm, head, aux, classes=CLASSES) -> dict[str, tuple]:
    """Every tensor name of facexlib's BiSeNet and its shape, for the given widths."""
    t: dict[str, tuple] = {}

    def bn(name, width):
        t.update({f"{name}.weight": (width,), f"{name}.bias": (width,), f"{name}.running_mean": (width,),
                  f"{name}.running_var": (width,), f"{name}.num_batches_tracked": ()})  # fmt: skip

    def conv_bn_relu(name, inp, out, k):  # ConvBNReLU: conv (no bias) + bn
        t[f"{name}.conv.weight"] = (out, inp, k, k)
        bn(f"{name}.bn", out)

    r = "cp.resnet."
    t[f"{r}conv1.weight"] = (stem, 3, 7, 7)
    bn(f"{r}bn1", stem)
    inp = stem
    for n, width in enumerate(stages, start=1):
        for i in range(2):
            p = f"{r}layer{n}.{i}."
            t[f"{p}conv1.weight"] = (width, inp, 3, 3)
            bn(f"{p}bn1", width)
            t[f"{p}conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}bn2", width)
            if inp != width or (n > 1 and i == 0):
                t[f"{p}downsample.0.weight"] = (width, inp, 1, 1)
                bn(f"{p}downsample.1", width)
            inp = width
    for name, source in (("arm16", stages[2]), ("arm32", stages[3])):
        conv_bn_relu(f"cp.{name}.conv", source, arm, 3)
        t[f"cp.{name}.conv_atten.weight"] = (arm, arm, 1, 1)
        bn(f"cp.{name}.bn_atten", arm)
    conv_bn_relu("cp.conv_head32", arm, arm, 3)
    conv_bn_relu("cp.conv_head16", arm, arm, 3)
    conv_bn_relu("cp.conv_avg", stages[3], arm, 1)
    conv_bn_relu("ffm.convblk", stages[1] + arm, ffm, 1)
    t["ffm.conv1.weight"], t["ffm.conv2.weight"] = (ffm // 4, ffm, 1, 1), (ffm, ffm // 4, 1, 1)
    for name, source, mid in (("conv_out", ffm, head), ("conv_out16", arm, aux), ("conv_out32", arm, aux)):
        conv_bn_relu(f"{name}.conv", source, mid, 3)
        t[f"{name}.conv_out.weight"] = (classes, mid, 1, 1)
    return t


def tiny_bisenet(seed: int = 0, widths: dict = TINY) -> OrderedDict:
    """Random tensors in the table's layout: He-scaled convs, BatchNorms near identity with random statistics. The
    classifier's rows for background (0) and skin (1) are scaled up, so that across an image the argmax takes both
    a label PuLID paints white and one it keeps gray, in patches."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for name, shape in bisenet_table(**widths).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(1000, dtype=torch.int64)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean") or name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # a BatchNorm's weight
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    state["conv_out.conv_out.weight"][:2] *= 4.0
    return state


def write_tiny_bisenet(path: Path, seed: int = 0, widths: dict = TINY) -> OrderedDict:
    """`tiny_bisenet` saved at `path` with `torch.save`, as facexlib's release is (a folder, or a path without a
    suffix: `parsing_bisenet.pth` in it); returns its tensors."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_bisenet(seed, widths)
    torch.save(state, path)
    return state


def write_facexlib_files(root: Path, detects: bool = True) -> dict:
    """facexlib's two files where ComfyUI's PuLID nodes keep them (`root/facexlib/`): the tiny parser, and the tiny
    RetinaFace (`retinaface_files.tiny_retinaface`) whose stride-32 level (priors of 256 and 512 px) scores every
    location a face through its class bias and the two finer levels none, so an image gives a few large overlapping
    boxes that NMS thins and the centre one is aligned (or, not `detects`, a detector that finds no face). Returns
    the detector's tensors."""
    from retinaface_files import tiny_retinaface

    root = Path(root)
    write_tiny_bisenet(root / "facexlib" / FILE_NAME)
    sd = tiny_retinaface(0)
    for level, sign in ((0, -1.0), (1, -1.0), (2, 1.0 if detects else -1.0)):
        sd[f"module.ClassHead.{level}.conv1x1.bias"] = sign * torch.tensor([-4.0, 4.0, -4.0, 4.0])  # (bg, face) x 2
    torch.save(sd, root / "facexlib" / DETECTOR_NAME)
    return sd


# ------------------------------------------------------------------------------------------------ the reference


def ref_bisenet(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """facexlib's `BiSeNet.forward(x)[0]` as plain functions over the file's tensors (fp64): the logits of the main
    head, bilinearly upsampled (align_corners) to the input. Written from `bisenet.py` / `resnet.py`."""
    from torch.nn import functional as F

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
    import numpy as np

    image = torch.from_numpy(np.asarray(rgb, np.float32)).permute(2, 0, 1)[None] / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    labels = ref_bisenet(sd, (image - mean) / std).argmax(dim=1, keepdim=True)
    bg = sum(labels == i for i in (0, 16, 18, 7, 8, 9, 14, 15)).bool()
    gray = (0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(bg, torch.ones_like(image), gray)
