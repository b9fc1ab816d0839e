"""A tiny InstantID for the demo pack's tiny SDXL, in InstantX's published layout: adapter file + IdentityNet folder.

InstantX/InstantID ships `ip-adapter.bin` (a torch pickle `{"image_proj": {...}, "ip_adapter": {...}}`: a Resampler
whose `proj_in` reads the 512-d antelopev2 face embedding, 16 latents, 4 layers, and `<n>.to_k_ip` / `to_v_ip` per
cross-attention layer, keys 1, 3, 5, ... in UNet processor order) and `ControlNetModel/` (the IdentityNet: a
diffusers SDXL ControlNet folder) beside it. This writes both for the tiny SDXL (its widths read from the pack),
random weights from a fixed seed, the IdentityNet's zero-started layers drawn at random (a zero ControlNet would
change nothing, and a test could not fail).
"""

from __future__ import annotations

from pathlib import Path

import torch

from imprompt.demo.tiny_models import adapter_tensors, cross_attention_widths

SEED = 41


def write_instantid(folder: Path, pack: Path, resampler_dim: int = 64) -> dict[str, Path]:
    """Write `folder/checkpoints/ip-adapter.bin` and `folder/checkpoints/ControlNetModel/`; returns their paths."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    folder = Path(folder) / "checkpoints"
    paths = {"adapter": folder / "ip-adapter.bin", "identitynet": folder / "ControlNetModel"}
    if paths["adapter"].is_file() and (paths["identitynet"] / "config.json").is_file():
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(Path(pack) / "diffusers" / "tiny-sdxl" / "unet")
    widths = cross_attention_widths(unet)
    state = adapter_tensors("plus", 512, widths, unet.config.cross_attention_dim, SEED, tokens=16,
                            dtype=torch.float32, resampler_dim=resampler_dim)  # fmt: skip
    torch.save(state, paths["adapter"])
    net = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith("controlnet_") and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    net.save_pretrained(paths["identitynet"])
    return paths
