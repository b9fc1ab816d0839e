"""HED soft edges (`softedge_hed`, `softedge_hedsafe`) and `scribble_hed`, as the A1111 ControlNet extension runs them.

The model is ControlNet's Apache-2 HED (`ControlNetHED.pth`, huggingface.co/lllyasviel/Annotators), an RGB-input
VGG-style network, written here from reading the extension's annotator/hed (its key names kept, so the real file
loads strictly): a learned per-channel offset `norm` subtracted from the 0..255 input, then five blocks
(`block1`..`block5`, 2, 2, 3, 3, 3 convs of 3x3 + ReLU; blocks 2-5 start with a 2x2 max pool), each with a 1x1
`projection` to one channel. The five projections are resized (bilinear) to the input size, averaged, and a
sigmoid gives the edge map. Widths are read from the file (64..512 in the real one), so tiny test weights use the
same code.

Runs as the extension does: at the processor resolution, edge-padded to 64, padding cropped off the result.
`softedge_hedsafe` quantises the map to three levels (the extension's safe_step, step 2); `scribble_hed` thins the
map to lines (blur sigma 3, directional maxima over 127), blurs it again (sigma 3) and keeps everything over 4 as
white.

Where users keep the file (A1111 / ComfyUI):
  extensions/sd-webui-controlnet/annotator/downloads/hed/ControlNetHED.pth
  custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators/ControlNetHED.pth
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..loading.tensors import read_tensors
from .loaded import cached_model
from .resize import hwc3, line_nms, resize_with_pad

HED = "ControlNetHED.pth"
WEIGHTS: tuple[str, ...] = (HED,)
A1111_FOLDER = "extensions/sd-webui-controlnet/annotator/downloads/hed"
COMFYUI_FOLDER = "custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators"
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
BLOCKS = 5



def run(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float,
        weights: dict[str, Path]) -> np.ndarray:
    """`softedge_hed`: the soft edge map at the detect resolution."""
    return hwc3(edges(image, resolution, weights[HED], safe=False))


def run_safe(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float,
             weights: dict[str, Path]) -> np.ndarray:
    """`softedge_hedsafe`: the edge map quantised to 0, 0.5 and 1 (fewer stray grey edges reach the model)."""
    return hwc3(edges(image, resolution, weights[HED], safe=True))


def run_scribble(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float,
                 weights: dict[str, Path]) -> np.ndarray:
    """`scribble_hed`: HED's edges thinned and thickened into a binary scribble."""
    import cv2

    soft = edges(image, resolution, weights[HED], safe=False)
    blurred = cv2.GaussianBlur(soft.astype(np.float32), (0, 0), 3.0)
    lines = np.zeros(soft.shape, dtype=np.uint8)
    lines[line_nms(blurred) > 127] = 255
    result = cv2.GaussianBlur(lines, (0, 0), 3.0)
    result[result > 4] = 255
    result[result < 255] = 0
    return hwc3(result)


def edges(image: np.ndarray, resolution: int, path: Path, safe: bool) -> np.ndarray:
    """The HxW uint8 edge map of the unpadded detect-resolution image."""
    import cv2
    import torch

    padded, remove_pad = resize_with_pad(image, resolution)
    height, width = padded.shape[:2]
    model = load_hed(path)
    with torch.no_grad():
        projections = model(torch.from_numpy(padded.copy()).float().permute(2, 0, 1)[None])
    maps = [cv2.resize(p[0, 0].numpy().astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
            for p in projections]
    edge = 1 / (1 + np.exp(-np.mean(np.stack(maps, axis=2), axis=2).astype(np.float64)))
    if safe:
        edge = (edge.astype(np.float32) * 3.0).astype(np.int32).astype(np.float32) / 2.0
    return remove_pad((edge * 255.0).clip(0, 255).astype(np.uint8))


def build_hed(widths: list[int], depths: list[int]):
    """The network with the extension's names: `norm`, `blockN.convs.M`, `blockN.projection`."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, in_channels: int, channels: int, depth: int, pool: bool):
            super().__init__()
            self.pool = pool
            self.convs = nn.Sequential(*[nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1)
                                         for i in range(depth)])
            self.projection = nn.Conv2d(channels, 1, 1)

        def forward(self, h):
            if self.pool:
                h = nn.functional.max_pool2d(h, kernel_size=2, stride=2)
            for conv in self.convs:
                h = nn.functional.relu(conv(h))
            return h, self.projection(h)

    class ControlNetHED(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
            channels = [3] + list(widths)
            for i in range(BLOCKS):
                setattr(self, f"block{i + 1}", Block(channels[i], channels[i + 1], depths[i], pool=i > 0))

        def forward(self, x):
            h = x - self.norm
            projections = []
            for i in range(BLOCKS):
                h, projection = getattr(self, f"block{i + 1}")(h)
                projections.append(projection)
            return projections

    return ControlNetHED().eval().requires_grad_(False).to(torch.float32)


def load_hed(path: Path):
    """The network with the file's weights (pickles only through weights_only=True), kept while the file is
    unchanged (keyed by path, size, mtime)."""
    return cached_model(path, lambda: read_hed(Path(path)), "hed")


def read_hed(path: Path):
    state = read_tensors(path)
    fix = f"download {HED} again from {SOURCE}"
    if "norm" not in state or any(f"block{i + 1}.projection.weight" not in state for i in range(BLOCKS)):
        raise CheckpointError(path, f"expected ControlNet's HED tensors (norm, block1..5), found {sorted(state)[:4]}",
                              fix)
    widths = [int(state[f"block{i + 1}.projection.weight"].shape[1]) for i in range(BLOCKS)]
    depths = [len({k for k in state if k.startswith(f"block{i + 1}.convs.") and k.endswith(".weight")})
              for i in range(BLOCKS)]
    model = build_hed(widths, depths)
    problems = model.load_state_dict(state, strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        raise CheckpointError(path, f"not ControlNet's HED: missing {problems.missing_keys[:4]}, unexpected "
                                    f"{problems.unexpected_keys[:4]}", fix)
    return model


def write_tiny_weights(folder: Path) -> dict[str, Path]:
    """A tiny HED (widths 4, 4, 8, 8, 8; the real 2, 2, 3, 3, 3 convs and key names) saved as a `.pth` pickle where
    the A1111 extension keeps it under `folder` (a WebUI root)."""
    import torch

    target = Path(folder) / A1111_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(2024)
    model = build_hed([4, 4, 8, 8, 8], [2, 2, 3, 3, 3])
    state = {}
    for key, value in model.state_dict().items():
        if key == "norm":
            state[key] = torch.tensor([123.0, 117.0, 104.0]).reshape(1, 3, 1, 1)
        elif key.endswith(".bias"):
            state[key] = torch.randn(value.shape, generator=generator) * 0.1
        else:  # He-scaled, the first conv scaled for 0..255 input: projections of a few units, soft edges
            fan_in = value[0].numel()
            gain = 1 / 128 if key.startswith("block1.convs.0") else 8.0 if "projection" in key else 1.0
            state[key] = torch.randn(value.shape, generator=generator) * gain * (2.0 / fan_in) ** 0.5
    torch.save(state, target / HED)
    return {HED: target / HED}
