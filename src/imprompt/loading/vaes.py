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
