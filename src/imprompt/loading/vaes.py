"""A VAE file from the tree (A1111's `sd_vae`), built to the loaded pipeline's VAE configuration.

A standalone VAE carries weights only; its shape and scaling factor are the model family's, so the pipeline's own
VAE configuration is used. Files in the original (LDM) names are converted with diffusers' own converter; pickles
are read by imprompt's weights-only loader, like every pickle.
"""

from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.recognise import unwrapped
from ..models.specs import VaeSpec
from .tensors import first_line, read_tensors


def load_vae(spec: VaeSpec, like, device: torch.device, dtype: torch.dtype):
    """An `AutoencoderKL` with `spec`'s weights and the configuration of `like` (the pipeline's VAE)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = unwrapped(read_tensors(spec.path))
    try:
        if spec.format == "ldm":
            state = convert_ldm_vae_checkpoint(state, like.config)
        vae = AutoencoderKL.from_config(like.config)
        vae.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(
            spec.path, f"does not fit this model's VAE ({first_line(exc)})", "Choose a VAE of the model's family"
        ) from None
    vae = vae.to(device=device)
    return (vae if dtype == torch.float32 else vae.to(dtype=dtype)).eval()


DECODE_TENSORS = 8  # measured: SD 1.5's VAE decoding 512 px in float32 on the CPU peaks at 1.0 GiB, 1024 px at 3.8 GiB


def decode_bytes(vae, width: int, height: int) -> int:
    """What decoding one image of this size holds at its peak: about 8 tensors of the decoder's widest full-size
    layer (`block_out_channels[0]` channels per pixel), in float32 where the pipeline upcasts a float16 VAE."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    element = 4 if upcast else torch.empty((), dtype=vae.dtype).element_size()
    return DECODE_TENSORS * vae.config.block_out_channels[0] * width * height * element


def needs_tiling(vae, width: int, height: int, budget_bytes: int) -> bool:
    """Whether this image's decode must go tile by tile (diffusers' tiled VAE, tiles of the VAE's `sample_size`) to
    stay within `budget_bytes`, the device memory left for activations. Decided from the size and the device only,
    so a request's pixels never depend on what ran before; tiled decoding blends tile seams, so its pixels differ
    slightly from a whole decode, which is why it is used only where the whole one would not fit."""
    return decode_bytes(vae, width, height) > budget_bytes
