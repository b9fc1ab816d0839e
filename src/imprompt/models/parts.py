"""The files a transformer-alone model (ComfyUI's split layout) runs with: its VAE and text encoders, chosen.

A FLUX or SD 3.5 transformer in `models/diffusion_models/` holds neither VAE nor text encoders. Each part comes from
the request (`vae`, `text_encoders`) or, when not given, from the models folders: the file whose tensors fit the
role, and where tensors cannot tell (FLUX's and SD 3's VAEs have the same shapes) by ComfyUI's usual names. What
was chosen, and why, is part of the result's info. A part that cannot be found is refused before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelParts:
    """role ("vae", "clip_l", "clip_g", "t5xxl") -> the store entry chosen for it, and how it was chosen."""

    files: dict = field(default_factory=dict)
    why: dict = field(default_factory=dict)

    def key(self) -> tuple:
        """Part of the pipeline cache key: the same transformer with other parts is another pipeline."""
        return tuple((role, self.files[role].key()) for role in sorted(self.files))

    def describe(self) -> dict:
        """info["model_parts"]: role -> name, file, why, quantization."""
        return {role: {"name": entry.name, "file": str(entry.path), "why": self.why.get(role, ""),
                       "quantization": getattr(entry.spec, "quantization", "")}
                for role, entry in sorted(self.files.items())}  # fmt: skip


NO_PARTS = ModelParts()
