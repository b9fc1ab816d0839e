"""Tiny RetinaFace files in the real key layout of facexlib's detection_Resnet50_Final.pth, for the tests.

The names are written from facexlib's code (`detection/retinaface.py`, `retinaface_net.py`): torchvision's resnet50
under `body.` (conv1, bn1, layer1..4 of Bottlenecks with `downsample.0/1` on each layer's first block; no fc, which
IntermediateLayerGetter drops), `fpn.output1..3` / `fpn.merge1..2` and `sshN.conv3X3` / `conv5X5_1` / `conv5X5_2` /
`conv7X7_2` / `conv7x7_3` as Sequentials of conv (no bias) + BatchNorm, and `ClassHead` / `BboxHead` /
`LandmarkHead` `.0..2.conv1x1` with biases (two anchors: 4, 8, 20 channels). Every BatchNorm carries weight, bias,
running_mean, running_var and num_batches_tracked. The released file's widths are `REAL`; the tiny ones are small.
"""

from __future__ import annotations

from pathlib import Path

import torch

REAL = {"stem": 64, "planes": (64, 128, 256, 512), "blocks": (3, 4, 6, 3), "width": 256}
TINY = {"stem": 8, "planes": (4, 8, 16, 32), "blocks": (1, 2, 1, 1), "width": 16}
EXPANSION = 4  # resnet50's Bottleneck: out = 4 x planes
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


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


def tiny_retinaface(seed: int = 0, width: int = TINY["width"]) -> dict[str, torch.Tensor]:
    """A random tiny RetinaFace state dict, `module.`-prefixed like the released file; activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in retinaface_shapes(TINY["stem"], TINY["planes"], TINY["blocks"], width).items():
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


def write_tiny_retinaface(path, seed: int = 0, width: int = TINY["width"]) -> Path:
    """`tiny_retinaface` saved with torch.save, as facexlib's release is (a plain dict of tensors)."""
    path = Path(path)
    torch.save(tiny_retinaface(seed, width), path)
    return path
