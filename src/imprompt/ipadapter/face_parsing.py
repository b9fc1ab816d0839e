"""facexlib's BiSeNet face parser in plain torch, and PuLID's use of it: the aligned face's non-face painted white.

PuLID's `get_id_embedding` (ToTheBeginning/PuLID `pulid/pipeline_flux.py`, `pipeline_v1_1.py`) parses the aligned
512 crop with facexlib's `init_parsing_model('bisenet')` (`parsing_bisenet.pth`, 19 classes) and feeds EVA02-CLIP
the crop in gray with the background, hat, ears, earrings, neck, necklace and cloth white. facexlib imports
torchvision, so imprompt computes the network itself from the rules read in facexlib's code
(`facexlib/parsing/bisenet.py`, `resnet.py`):
- a ResNet-18 context path (`cp.resnet.*`: a 7x7 stride-2 stem, a 3x3 stride-2 max pool, four stages of two basic
  blocks, stages 2..4 halving the size), whose 1/8, 1/16 and 1/32 maps are kept;
- attention refinement of the 1/16 and 1/32 maps (`cp.arm16`, `cp.arm32`: conv-BN-ReLU, then a sigmoid channel
  gate from the global mean), the 1/32 map plus its global mean (`cp.conv_avg`), each upsampled (nearest) onto the
  next and refined (`cp.conv_head32`, `cp.conv_head16`);
- feature fusion of the 1/8 ResNet map with that (`ffm.*`: conv-BN-ReLU of the concatenation, plus itself gated by
  a two-layer channel attention), the head (`conv_out.*`) and a bilinear (align_corners) upsample to the input.
Only the first output is computed: PuLID reads `[0]`; the two auxiliary heads (`conv_out16`, `conv_out32`) are
loaded, so the file is read strictly, but never run. Every width and stage depth is read from the tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import CheckpointError
from ..loading.tensors import filled
from .facexlib_files import download_fix

CLASSES = 19  # facexlib's BiSeNet(num_class=19): CelebAMask-HQ's labels
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)  # PuLID's bg_label: background, cloth, hat, ears, earring, neck, necklace
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the parser's input normalisation in PuLID (not EVA's OpenAI mean/std)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY = (0.299, 0.587, 0.114)  # PuLID's to_gray, on the RGB crop
PROBE_KEY = "cp.arm16.conv_atten.weight"
FIX = download_fix("parsing_bisenet.pth")


class ConvBN(nn.Module):
    """A bias-free conv and its BatchNorm (`conv` / `bn`), ReLU after unless told not to."""

    def __init__(self, weight_shape, stride: int = 1):
        super().__init__()
        out, inp, k, _ = weight_shape
        self.conv = nn.Conv2d(inp, out, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(out)

    def forward(self, x, relu: bool = True):
        x = self.bn(self.conv(x))
        return F.relu(x) if relu else x


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 conv-BNs over a shortcut (a 1x1 conv-BN where the width or size changes)."""

    def __init__(self, t: dict, p: str, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(*reversed(t[p + "conv1.weight"][:2]), 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(t[p + "conv1.weight"][0])
        self.conv2 = nn.Conv2d(*reversed(t[p + "conv2.weight"][:2]), 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(t[p + "conv2.weight"][0])
        self.downsample = None
        if p + "downsample.0.weight" in t:
            out, inp = t[p + "downsample.0.weight"][:2]
            self.downsample = nn.Sequential(nn.Conv2d(inp, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu((x if self.downsample is None else self.downsample(x)) + residual)


class ResNet18(nn.Module):
    """The context path's backbone: stem, max pool, four stages; returns the 1/8, 1/16 and 1/32 maps."""

    def __init__(self, t: dict, p: str):
        super().__init__()
        out, inp, k, _ = t[p + "conv1.weight"]
        self.conv1 = nn.Conv2d(inp, out, k, stride=2, padding=k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        for n in range(1, 5):
            stage = f"{p}layer{n}."
            blocks = sorted({int(k[len(stage):].split(".")[0]) for k in t if k.startswith(stage)})
            if blocks != list(range(len(blocks))) or not blocks:
                raise KeyError(f"{stage}0")
            setattr(self, f"layer{n}", nn.Sequential(*[BasicBlock(t, f"{stage}{i}.", 2 if n > 1 and i == 0 else 1)
                                                         for i in blocks]))  # fmt: skip

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        feat8 = self.layer2(self.layer1(x))
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


def global_mean(x):
    return x.mean(dim=(2, 3), keepdim=True)  # F.avg_pool2d over the whole map


class AttentionRefinement(nn.Module):
    """conv-BN-ReLU, then its channels gated by sigmoid(BN(conv1x1(global mean)))."""

    def __init__(self, t: dict, p: str):
        super().__init__()
        self.conv = ConvBN(t[p + "conv.conv.weight"])
        width = t[p + "conv_atten.weight"][0]
        self.conv_atten = nn.Conv2d(width, width, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(width)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(global_mean(feat))))


class ContextPath(nn.Module):
    def __init__(self, t: dict):
        super().__init__()
        self.resnet = ResNet18(t, "cp.resnet.")
        self.arm16, self.arm32 = AttentionRefinement(t, "cp.arm16."), AttentionRefinement(t, "cp.arm32.")
        self.conv_head32, self.conv_head16 = ConvBN(t["cp.conv_head32.conv.weight"]), ConvBN(t["cp.conv_head16.conv.weight"])
        self.conv_avg = ConvBN(t["cp.conv_avg.conv.weight"])

    def forward(self, x):
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(global_mean(feat32))  # [N, C, 1, 1]: its nearest upsample is a broadcast
        up32 = self.conv_head32(F.interpolate(self.arm32(feat32) + avg, feat16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(feat16) + up32, feat8.shape[2:], mode="nearest"))
        return feat8, up16


class FeatureFusion(nn.Module):
    def __init__(self, t: dict):
        super().__init__()
        self.convblk = ConvBN(t["ffm.convblk.conv.weight"])
        self.conv1 = nn.Conv2d(*reversed(t["ffm.conv1.weight"][:2]), 1, bias=False)
        self.conv2 = nn.Conv2d(*reversed(t["ffm.conv2.weight"][:2]), 1, bias=False)

    def forward(self, spatial, context):
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(global_mean(feat)))))
        return feat * gate + feat


class Head(nn.Module):
    """BiSeNetOutput: conv-BN-ReLU then a 1x1 conv to the classes."""

    def __init__(self, t: dict, p: str):
        super().__init__()
        self.conv = ConvBN(t[p + "conv.conv.weight"])
        self.conv_out = nn.Conv2d(*reversed(t[p + "conv_out.weight"][:2]), 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """facexlib's BiSeNet, in its key layout; `forward` gives the main head's logits at the input's size."""

    def __init__(self, table: dict[str, tuple]):
        super().__init__()
        self.cp = ContextPath(table)
        self.ffm = FeatureFusion(table)
        self.conv_out = Head(table, "conv_out.")
        self.conv_out16 = Head(table, "conv_out16.")  # auxiliary (training) heads: loaded, never run
        self.conv_out32 = Head(table, "conv_out32.")

    @property
    def classes(self) -> int:
        return self.conv_out.conv_out.out_channels

    def forward(self, x):
        feat8, context = self.cp(x)
        out = self.conv_out(self.ffm(feat8, context))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def bisenet_table(tensors: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def build_bisenet(state_dict: dict, path="parsing_bisenet.pth", device=None) -> BiSeNet:
    """The parser of `parsing_bisenet.pth`'s tensors (`module.` prefixes dropped), filled strictly, float32 (PuLID
    runs it in float32; its argmax is what counts). A file without BatchNorm's `num_batches_tracked` counters (saved
    by an old torch) loads too: eval mode never reads them."""
    tensors = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if PROBE_KEY not in tensors:
        raise CheckpointError(path, f"not facexlib's BiSeNet face parser (no {PROBE_KEY})", FIX)
    try:
        with torch.device("meta"):
            parser = BiSeNet(bisenet_table(tensors))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(path, f"not facexlib's BiSeNet face parser (no {exc})", FIX) from None
    for name, buffer in parser.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in tensors:
            tensors[name] = torch.zeros((), dtype=buffer.dtype)
    filled(parser, tensors, path, "BiSeNet face parser", FIX)
    if parser.classes != CLASSES:
        raise CheckpointError(path, f"a face parser of {parser.classes} classes; PuLID reads facexlib's {CLASSES}", FIX)
    return parser.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def parse(parser: BiSeNet, image: torch.Tensor) -> torch.Tensor:
    """The label of each pixel of `image` ([N, 3, H, W] RGB in 0..1): argmax of the logits of the ImageNet-
    normalised image, as PuLID calls the parser."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1, 1)
    with torch.no_grad():
        return parser((image - mean) / std).argmax(dim=1, keepdim=True)


def face_features_image(parser: BiSeNet, aligned_rgb) -> torch.Tensor:
    """PuLID's `face_features_image` of an aligned crop (RGB uint8, H x W x 3): where the parser says background,
    hat, ears, earrings, neck, necklace or cloth, white; elsewhere the crop's gray (0.299 R + 0.587 G + 0.114 B,
    three times). [1, 3, H, W] float32 in 0..1, on the parser's device."""
    import numpy as np

    device = next(parser.parameters()).device
    image = torch.from_numpy(np.ascontiguousarray(aligned_rgb, dtype=np.float32)).to(device).permute(2, 0, 1)[None] / 255.0
    labels = parse(parser, image)
    background = torch.zeros_like(labels, dtype=torch.bool)
    for label in BACKGROUND_LABELS:
        background |= labels == label
    gray = (GRAY[0] * image[:, 0:1] + GRAY[1] * image[:, 1:2] + GRAY[2] * image[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(background, torch.ones_like(image), gray)
