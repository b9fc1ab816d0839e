"""Lineart (`lineart_realistic`, `lineart_coarse`) as the A1111 ControlNet extension runs it.

The models are the informative-drawings generator (Chan et al., "Learning to generate line drawings"), two sets of
weights from huggingface.co/lllyasviel/Annotators: `sk_model.pth` (realistic) and `sk_model2.pth` (coarse). The
network, written here from reading the extension's annotator/lineart (its key names kept, so the real files load
strictly): a 7x7 reflection-padded stem, two stride-2 downsamplings, three residual blocks (reflection pad, 3x3,
instance norm), two transposed-conv upsamplings and a 7x7 output conv with a sigmoid, instance norms without affine
parameters. The widths are read from the file (64 in the real ones), so tiny test weights use the same code.

The extension runs it on the image scaled to the processor resolution and edge-padded to 64 (RGB / 255 in), takes
(line * 255) clipped to uint8 and inverts it (255 - line: white lines on black), then crops the padding off.

Where users keep the files (A1111 / ComfyUI):
  extensions/sd-webui-controlnet/annotator/downloads/lineart/{sk_model.pth,sk_model2.pth}
  custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators/{sk_model.pth,sk_model2.pth}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..loading.tensors import read_tensors
from .loaded import cached_model
from .resize import hwc3, resize_with_pad

REALISTIC = "sk_model.pth"
COARSE = "sk_model2.pth"
WEIGHTS: tuple[str, ...] = (REALISTIC, COARSE)
A1111_FOLDER = "extensions/sd-webui-controlnet/annotator/downloads/lineart"
COMFYUI_FOLDER = "custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators"
SOURCE = "https://huggingface.co/lllyasviel/Annotators"



def run(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float,
        weights: dict[str, Path]) -> np.ndarray:
    """`lineart_realistic` (`sk_model.pth`): white lines on black at the detect resolution."""
    return detect(image, resolution, weights[REALISTIC])


def run_coarse(image: np.ndarray, resolution: int, threshold_a: float, threshold_b: float,
               weights: dict[str, Path]) -> np.ndarray:
    """`lineart_coarse` (`sk_model2.pth`): the same network with the coarse weights."""
    return detect(image, resolution, weights[COARSE])


def detect(image: np.ndarray, resolution: int, path: Path) -> np.ndarray:
    import torch

    padded, remove_pad = resize_with_pad(image, resolution)
    model = load_generator(path)
    with torch.no_grad():
        x = torch.from_numpy(padded).float() / 255.0
        line = model(x.permute(2, 0, 1)[None])[0, 0].numpy()
    line = (line * 255.0).clip(0, 255).astype(np.uint8)
    return hwc3(remove_pad(255 - line))


def build_generator(widths: int, residual_blocks: int, input_nc: int = 3, output_nc: int = 1):
    """The generator with the extension's module names: model0 (stem), model1 (down), model2 (residual blocks),
    model3 (up), model4 (output)."""
    import torch
    from torch import nn

    class ResidualBlock(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.conv_block = nn.Sequential(
                nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
                nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

        def forward(self, x):
            return x + self.conv_block(x)

    class Generator(nn.Module):
        def __init__(self):
            super().__init__()
            w = widths
            self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(input_nc, w, 7), nn.InstanceNorm2d(w),
                                        nn.ReLU())
            self.model1 = nn.Sequential(
                nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * w), nn.ReLU(),
                nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.InstanceNorm2d(4 * w), nn.ReLU())
            self.model2 = nn.Sequential(*[ResidualBlock(4 * w) for _ in range(residual_blocks)])
            self.model3 = nn.Sequential(
                nn.ConvTranspose2d(4 * w, 2 * w, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(2 * w),
                nn.ReLU(),
                nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(w),
                nn.ReLU())
            self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w, output_nc, 7), nn.Sigmoid())

        def forward(self, x):
            return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))

    return Generator().eval().requires_grad_(False).to(torch.float32)


def load_generator(path: Path):
    """The generator with the file's weights (pickles only through weights_only=True), kept while the file is
    unchanged (keyed by path, size, mtime)."""
    return cached_model(path, lambda: read_generator(Path(path)), "lineart")


def read_generator(path: Path):
    state = read_tensors(path)
    stem = state.get("model0.1.weight")
    if stem is None or stem.ndim != 4:
        raise CheckpointError(path, f"expected the lineart generator's tensors (model0.1.weight ...), found "
                                    f"{sorted(state)[:4]}", f"download {path.name} again from {SOURCE}")
    blocks = len({k.split(".")[1] for k in state if k.startswith("model2.")})
    model = build_generator(int(stem.shape[0]), blocks, int(stem.shape[1]))
    problems = model.load_state_dict(state, strict=False)
    if problems.missing_keys or problems.unexpected_keys:
        raise CheckpointError(path, f"not the lineart generator: missing {problems.missing_keys[:4]}, unexpected "
                                    f"{problems.unexpected_keys[:4]}", f"download {path.name} again from {SOURCE}")
    return model


def write_tiny_weights(folder: Path) -> dict[str, Path]:
    """Tiny generators (width 4, the real three residual blocks and key names) saved as `.pth` pickles where the
    A1111 extension keeps them under `folder` (a WebUI root); the coarse one has other random weights."""
    import torch

    target = Path(folder) / A1111_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed, name in enumerate(WEIGHTS):
        generator = torch.Generator().manual_seed(1000 + seed)
        model = build_generator(4, 3)
        state = {k: torch.randn(v.shape, generator=generator) * 0.5 for k, v in model.state_dict().items()}
        torch.save(state, target / name)
        paths[name] = target / name
    return paths
