"""Tiny facexlib face models (RetinaFace detector, BiSeNet parser) written in their released files' key layouts.

PuLID's face preprocessing reads facexlib's `detection_Resnet50_Final.pth` and `parsing_bisenet.pth`; the tests and
`tools/bench_image_prompts.py` need files of those layouts without the network. The tables of names and shapes are
written from facexlib's constructors, not from imprompt's modules:
- BiSeNet (`facexlib/parsing/bisenet.py`: `BiSeNet(19)` with its `ContextPath` (`resnet`, `arm16`, `arm32`,
  `conv_head32`, `conv_head16`, `conv_avg`), `FeatureFusionModule(256, 256)` as `ffm`, `BiSeNetOutput`s `conv_out`
  (256 -> 256), `conv_out16` and `conv_out32` (128 -> 64); `resnet.py`'s `ResNet18`: stem 64, stages 64/128/256/512
  of two `BasicBlock`s, a `downsample` (1x1 conv + BN) where the width or stride changes);
- RetinaFace (`detection/retinaface.py`, `retinaface_net.py`): torchvision's resnet50 under `body.` (conv1, bn1,
  layer1..4 of Bottlenecks with `downsample.0/1` on each layer's first block; no fc, which IntermediateLayerGetter
  drops), `fpn.output1..3` / `fpn.merge1..2` and `sshN.conv3X3` / `conv5X5_1` / `conv5X5_2` / `conv7X7_2` /
  `conv7x7_3` as Sequentials of conv (no bias) + BatchNorm, `ClassHead` / `BboxHead` / `LandmarkHead` `.0..2.conv1x1`
  with biases (two anchors: 4, 8, 20 channels), every key `module.`-prefixed as the release is.
Every BatchNorm carries weight, bias, running_mean, running_var and num_batches_tracked, as `torch.save(model.
state_dict())` writes them. The released widths are `*_REAL`; the tiny ones are small.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

BISENET_REAL = dict(stem=64, stages=(64, 128, 256, 512), arm=128, ffm=256, head=256, aux=64)
BISENET_TINY = dict(stem=8, stages=(8, 16, 24, 32), arm=16, ffm=32, head=24, aux=8)
CLASSES = 19
PARSER_NAME = "parsing_bisenet.pth"
DETECTOR_NAME = "detection_Resnet50_Final.pth"
RETINAFACE_REAL = {"stem": 64, "planes": (64, 128, 256, 512), "blocks": (3, 4, 6, 3), "width": 256}
RETINAFACE_TINY = {"stem": 8, "planes": (4, 8, 16, 32), "blocks": (1, 2, 1, 1), "width": 16}
EXPANSION = 4  # resnet50's Bottleneck: out = 4 x planes
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ------------------------------------------------------------------------------------------------ BiSeNet


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


def tiny_bisenet(seed: int = 0, widths: dict = BISENET_TINY) -> OrderedDict:
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


def write_tiny_bisenet(path: Path, seed: int = 0, widths: dict = BISENET_TINY) -> OrderedDict:
    """`tiny_bisenet` saved at `path` with `torch.save`, as facexlib's release is (a folder, or a path without a
    suffix: `parsing_bisenet.pth` in it); returns its tensors."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / PARSER_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    state = tiny_bisenet(seed, widths)
    torch.save(state, path)
    return state


# ------------------------------------------------------------------------------------------------ RetinaFace


def retinaface_shapes(stem: int, planes, blocks, width: int, batches_tracked: bool = True) -> dict[str, tuple]:
    """Every tensor name of a RetinaFace-ResNet-50 state dict (without `module.`) and its shape."""
    shapes: dict[str, tuple] = {}

    def bn(prefix: str, ch: int):
        for key in BN_KEYS if batches_tracked else BN_KEYS[:4]:
            shapes[f"{prefix}.{key}"] = () if key == "num_batches_tracked" else (ch,)

    def conv_bn(prefix: str, out_ch: int, in_ch: int, k: int):
        shapes[f"{prefix}.0.weight"] = (out_ch, in_ch, k, k)
        bn(f"{prefix}.1", out_ch)

    shapes["body.conv1.weight"] = (stem, 3, 7, 7)
    bn("body.bn1", stem)
    in_ch, outs = stem, []
    for n, (p, count) in enumerate(zip(planes, blocks), start=1):
        for i in range(count):
            pre = f"body.layer{n}.{i}"
            shapes[f"{pre}.conv1.weight"] = (p, in_ch, 1, 1)
            bn(f"{pre}.bn1", p)
            shapes[f"{pre}.conv2.weight"] = (p, p, 3, 3)
            bn(f"{pre}.bn2", p)
            shapes[f"{pre}.conv3.weight"] = (p * EXPANSION, p, 1, 1)
            bn(f"{pre}.bn3", p * EXPANSION)
            if i == 0:  # torchvision gives every layer's first block a projection (layer1: 64 -> 256 channels)
                shapes[f"{pre}.downsample.0.weight"] = (p * EXPANSION, in_ch, 1, 1)
                bn(f"{pre}.downsample.1", p * EXPANSION)
            in_ch = p * EXPANSION
        outs.append(in_ch)
    for i, ch in enumerate(outs[1:], start=1):
        conv_bn(f"fpn.output{i}", width, ch, 1)
    conv_bn("fpn.merge1", width, width, 3)
    conv_bn("fpn.merge2", width, width, 3)
    for s in (1, 2, 3):
        conv_bn(f"ssh{s}.conv3X3", width // 2, width, 3)
        conv_bn(f"ssh{s}.conv5X5_1", width // 4, width, 3)
        conv_bn(f"ssh{s}.conv5X5_2", width // 4, width // 4, 3)
        conv_bn(f"ssh{s}.conv7X7_2", width // 4, width // 4, 3)
        conv_bn(f"ssh{s}.conv7x7_3", width // 4, width // 4, 3)
    for head, values in (("ClassHead", 2), ("BboxHead", 4), ("LandmarkHead", 10)):
        for i in range(3):
            shapes[f"{head}.{i}.conv1x1.weight"] = (2 * values, width, 1, 1)
            shapes[f"{head}.{i}.conv1x1.bias"] = (2 * values,)
    return shapes


def tiny_retinaface(seed: int = 0, width: int = RETINAFACE_TINY["width"]) -> dict[str, torch.Tensor]:
    """A random tiny RetinaFace state dict, `module.`-prefixed like the released file; activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    tiny = RETINAFACE_TINY
    sd = {}
    for name, shape in retinaface_shapes(tiny["stem"], tiny["planes"], tiny["blocks"], width).items():
        if name.endswith("num_batches_tracked"):
            t = torch.tensor(0, dtype=torch.long)
        elif name.endswith("running_var"):  # the stem's spans the pixels' scale (+-128 after the means)
            t = (1e4 if name == "body.bn1.running_var" else 1.0) * (0.5 + torch.rand(shape, generator=gen))
        elif name.endswith(".weight") and len(shape) == 1:
            t = 0.5 + torch.rand(shape, generator=gen)
        elif len(shape) == 1:  # biases and running means
            t = 0.2 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[1] * shape[2] * shape[3]
            gain = 0.01 if "Head" in name else 2.0  # heads: logits and offsets O(1)
            t = torch.randn(shape, generator=gen) * (gain / fan_in) ** 0.5
        sd["module." + name] = t
    return sd


def write_tiny_retinaface(path, seed: int = 0, width: int = RETINAFACE_TINY["width"]) -> Path:
    """`tiny_retinaface` saved with torch.save, as facexlib's release is (a plain dict of tensors)."""
    path = Path(path)
    torch.save(tiny_retinaface(seed, width), path)
    return path


# ------------------------------------------------------------------------------------------------ both


def write_facexlib_files(root: Path, detects: bool = True, folder: str = "facexlib") -> dict:
    """facexlib's two files in `root/folder` (`facexlib/`, where ComfyUI's PuLID nodes keep them): the tiny parser,
    and the tiny RetinaFace whose stride-32 level (priors of 256 and 512 px) scores every location a face through its
    class bias and the two finer levels none, so an image gives a few large overlapping boxes that NMS thins and the
    centre one is aligned (or, not `detects`, a detector that finds no face). Returns the detector's tensors."""
    place = Path(root) / folder
    write_tiny_bisenet(place / PARSER_NAME)
    sd = tiny_retinaface(0)
    for level, sign in ((0, -1.0), (1, -1.0), (2, 1.0 if detects else -1.0)):
        sd[f"module.ClassHead.{level}.conv1x1.bias"] = sign * torch.tensor([-4.0, 4.0, -4.0, 4.0])  # (bg, face) x 2
    torch.save(sd, place / DETECTOR_NAME)
    return sd
