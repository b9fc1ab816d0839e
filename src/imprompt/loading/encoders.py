"""CLIP and SigLIP image encoders from folders and single files, filled tensor by tensor in the compute dtype.

transformers folders (config.json + weights, as in h94/IP-Adapter) and single files (ComfyUI's `clip_vision/`)
are built on the meta device and filled from the checkpoint; no trust_remote_code, no custom modelling code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.probe import encoder_weights_file
from ..models.specs import EncoderSpec
from .tensors import first_line, read_tensors


def load_encoder(spec: EncoderSpec, device: torch.device, dtype: torch.dtype):
    """A CLIP vision model (with projection when the checkpoint has one), in eval mode on `device`/`dtype`.

    Folders (config.json + weights) and single files load the same way: the model is built on the meta device
    and each tensor is converted to `dtype` as it is read, so an fp16 file loaded for bf16 compute peaks at the
    bf16 weights plus one tensor (transformers' from_pretrained held the fp16 and the converted copy at once)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection, SiglipVisionModel

    siglip = spec.model_type == "siglip"
    cls = SiglipVisionModel if siglip else CLIPVisionModelWithProjection if spec.projection_dim else CLIPVisionModel
    path = Path(spec.path)
    try:
        if path.is_dir() and not siglip:
            config, weights = CLIPVisionConfig.from_json_file(path / "config.json"), encoder_weights_file(path)
        else:  # SigLIP: the tower's config from its shapes (a whole SiglipModel's config.json nests it)
            config, weights = spec.transformers_config(), encoder_weights_file(path) if path.is_dir() else path
        state = read_tensors(weights, dtype)
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        if siglip:  # the tower alone: a whole SiglipModel's text tower is not loaded; transformers 5 saves no prefix
            state = {k: v for k, v in state.items() if not k.startswith(("text_model.", "logit_"))}
            state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in state.items()}
        with torch.device("meta"):
            model = cls(config)
        if not hasattr(model, "vision_model"):  # CLIPVisionModel (no projection) has no vision_model wrapper
            state = {k.removeprefix("vision_model."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise CheckpointError(
                path,
                f"does not match a CLIP vision model of its shape (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})",
            )
        _materialise_buffers(model, spec)
    except CheckpointError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(path, f"cannot load image encoder ({first_line(exc)})", "Download it again") from None
    return model.to(device=device, dtype=dtype).eval()


def _materialise_buffers(model, spec: EncoderSpec) -> None:
    """Non-persistent buffers (position ids) stay on the meta device after `assign=True`; rebuild them."""
    embeddings = getattr(model, "vision_model", model).embeddings
    positions = (spec.image_size // spec.patch_size) ** 2 + (spec.model_type == "clip")  # CLIP's CLS token
    embeddings.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)


def image_processor(spec: EncoderSpec):
    """Preprocessing for an encoder: its own preprocessor_config.json if it has one, else what diffusers'
    `load_ip_adapter` builds (CLIP mean/std, bicubic resize and centre crop to the encoder's image size)."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    path = Path(spec.path)
    if spec.model_type == "siglip":  # resize to the tower's size, no crop, mean = std = 0.5 (SigLIP's own defaults)
        if path.is_dir() and (path / "preprocessor_config.json").is_file():
            config = json.loads((path / "preprocessor_config.json").read_text())
            config.pop("image_processor_type", None)
            config.pop("processor_class", None)
            return SiglipImageProcessor(**config)
        return SiglipImageProcessor(size={"height": spec.image_size, "width": spec.image_size})
    if path.is_dir() and (path / "preprocessor_config.json").is_file():
        config = json.loads((path / "preprocessor_config.json").read_text())
        config.pop("image_processor_type", None)
        return CLIPImageProcessor(**config)
    return CLIPImageProcessor(size=spec.image_size, crop_size=spec.image_size)
