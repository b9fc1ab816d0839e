"""ComfyUI's split layout written from tiny diffusers SD 3.5 / FLUX pipelines: the transformer alone in
`models/diffusion_models/` (or `unet/`), the VAE alone in `models/vae/`, each text encoder alone in
`models/text_encoders/` (or `clip/`), under the names the files users download carry. The tensors are the
all-in-one file's (`single_files.transformer_single_file_tensors`) without its prefixes: Black Forest Labs' and
Stability's transformer names, the VAE in LDM names (as `ae.safetensors`), CLIP and T5 in transformers' names (as
`clip_l.safetensors` / `t5xxl_fp16.safetensors`)."""

from __future__ import annotations

from pathlib import Path

import torch
from single_files import transformer_single_file_tensors

# all-in-one prefix -> the part it holds
PART_PREFIXES = {"model.diffusion_model.": "transformer", "first_stage_model.": "vae",
                 "text_encoders.clip_l.transformer.": "clip_l", "text_encoders.clip_g.transformer.": "clip_g",
                 "text_encoders.t5xxl.transformer.": "t5xxl"}  # fmt: skip
# part -> (ComfyUI folder, the file name users have)
FLUX_NAMES = {"transformer": ("diffusion_models", "flux1-dev.safetensors"), "vae": ("vae", "ae.safetensors"),
              "clip_l": ("text_encoders", "clip_l.safetensors"), "t5xxl": ("text_encoders", "t5xxl_fp16.safetensors")}  # fmt: skip
SD35_NAMES = {"transformer": ("diffusion_models", "sd3.5_large.safetensors"), "vae": ("vae", "sd3.5_vae.safetensors"),
              "clip_l": ("text_encoders", "clip_l.safetensors"), "clip_g": ("text_encoders", "clip_g.safetensors"),
              "t5xxl": ("text_encoders", "t5xxl_fp16.safetensors")}  # fmt: skip


def split_tensors(pipeline, with_t5: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """part -> its tensors under the names its own file uses (no all-in-one prefix)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in transformer_single_file_tensors(pipeline, with_t5).items():
        prefix = next(p for p in PART_PREFIXES if key.startswith(p))
        parts.setdefault(PART_PREFIXES[prefix], {})[key[len(prefix) :]] = tensor
    return parts


def save_part(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = torch.float16) -> Path:
    """One part's file (`dtype` None: as given, e.g. already quantized)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (v if dtype is None else v.to(dtype)).contiguous().clone() for k, v in tensors.items()}, path,
              metadata={"format": "pt"})  # fmt: skip
    return path


def write_split_tree(pipeline, models: Path, names: dict | None = None, with_t5: bool = True,
                     dtype: torch.dtype = torch.float16) -> dict[str, Path]:  # fmt: skip
    """Every part of `pipeline` in its ComfyUI folder under `models/` (FLUX's or SD 3.5's usual names unless
    `names` says otherwise). Returns part -> path."""
    parts = split_tensors(pipeline, with_t5)
    flux = "t5xxl" in parts and "clip_g" not in parts
    names = names or (FLUX_NAMES if flux else SD35_NAMES)
    return {part: save_part(tensors, Path(models) / names[part][0] / names[part][1], dtype)
            for part, tensors in parts.items()}  # fmt: skip
