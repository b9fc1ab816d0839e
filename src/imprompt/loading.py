"""Safe loading: tensors from safetensors, pickles only with `weights_only=True`, encoders from folders or single
files, pipelines from diffusers folders without any image encoder.

Every failure becomes a `CheckpointError` naming the file; nothing here mutates state outside what it returns,
so a load that fails half-way leaves nothing half-loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError, UnsupportedError
from .probe import (
    AdapterSpec,
    EncoderSpec,
    PipelineSpec,
    _first_line,
    encoder_weights_file,
    flatten_state_dict,
    load_pickle,
)


def read_tensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, converted tensor by tensor to `dtype` (no full-precision copy of the
    whole file is ever made when loading an fp16 file for bf16/fp16 compute)."""
    from safetensors import SafetensorError, safe_open

    from .probe import read_safetensors_header

    path = Path(path)
    tensors = {}
    if path.suffix == ".safetensors":
        read_safetensors_header(path)  # imprompt's checked parser first: the library only sees sound headers
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
        else:
            for key, tensor in flatten_state_dict(load_pickle(path)).items():
                tensors[key] = tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read tensors ({_first_line(exc)})", "Download the file again") from None
    return tensors


def load_adapter_state_dict(spec: AdapterSpec) -> dict[str, dict[str, torch.Tensor]]:
    """h94 format, either flat safetensors or a nested pickle -> {"image_proj": {...}, "ip_adapter": {...}}."""
    state = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in read_tensors(Path(spec.path)).items():
        group, _, name = key.partition(".")
        if group in state:
            state[group][name] = tensor
    return state


def load_encoder(spec: EncoderSpec, device: torch.device, dtype: torch.dtype):
    """A CLIP vision model (with projection when the checkpoint has one), in eval mode on `device`/`dtype`.

    Folders (config.json + weights) and single files load the same way: the model is built on the meta device
    and each tensor is converted to `dtype` as it is read, so an fp16 file loaded for bf16 compute peaks at the
    bf16 weights plus one tensor (transformers' from_pretrained held the fp16 and the converted copy at once)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    cls = CLIPVisionModelWithProjection if spec.projection_dim else CLIPVisionModel
    path = Path(spec.path)
    try:
        if path.is_dir():
            config, weights = CLIPVisionConfig.from_json_file(path / "config.json"), encoder_weights_file(path)
        else:
            config, weights = spec.transformers_config(), path
        state = read_tensors(weights, dtype)
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
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
        raise CheckpointError(path, f"cannot load image encoder ({_first_line(exc)})", "Download it again") from None
    return model.to(device=device, dtype=dtype).eval()


def _materialise_buffers(model, spec: EncoderSpec) -> None:
    """Non-persistent buffers (position ids) stay on the meta device after `assign=True`; rebuild them."""
    embeddings = getattr(model, "vision_model", model).embeddings
    positions = (spec.image_size // spec.patch_size) ** 2 + 1
    embeddings.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)


def image_processor(spec: EncoderSpec):
    """Preprocessing for an encoder: its own preprocessor_config.json if it has one, else what diffusers'
    `load_ip_adapter` builds (CLIP mean/std, bicubic resize and centre crop to the encoder's image size)."""
    from transformers import CLIPImageProcessor

    path = Path(spec.path)
    if path.is_dir() and (path / "preprocessor_config.json").is_file():
        config = json.loads((path / "preprocessor_config.json").read_text())
        config.pop("image_processor_type", None)
        return CLIPImageProcessor(**config)
    return CLIPImageProcessor(size=spec.image_size, crop_size=spec.image_size)


# pipeline class -> the components it must load without (imprompt encodes reference images itself)
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": {"safety_checker": None, "requires_safety_checker": False},
    "StableDiffusionXLPipeline": {},
}


def load_pipeline(spec: PipelineSpec, device: torch.device, dtype: torch.dtype):
    """A diffusers text-to-image pipeline without image encoder, feature extractor or safety checker: imprompt
    encodes reference images itself and hands the pipeline finished embeddings."""
    import diffusers

    if Path(spec.path).is_file():
        from .single_file import load_single_file

        return load_single_file(spec, device, dtype)
    if spec.pipeline_class not in SUPPORTED_PIPELINES:
        raise UnsupportedError(
            f"model {Path(spec.path).name}: pipeline class {spec.pipeline_class} is not supported; "
            f"supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    cls = getattr(diffusers, spec.pipeline_class)
    try:
        pipeline = cls.from_pretrained(
            spec.path,
            dtype=dtype,
            image_encoder=None,
            feature_extractor=None,
            local_files_only=True,
            **SUPPORTED_PIPELINES[spec.pipeline_class],
        )
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(spec.path, f"cannot load pipeline ({_first_line(exc)})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
