"""diffusers pipelines from folders and single files, with no image encoder or safety checker.

imprompt encodes reference images itself and hands the pipeline finished embeddings. Folders load with
`from_pretrained`, A1111 / SD.Next single files with `from_single_file` and the configuration imprompt ships
(`models/single_file.py`). Which pipelines can run at all is decided earlier, in the plan.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.single_file import (
    DIT_TEXT_ENCODERS,
    UNET,
    clip_widths,
    require_t5_tokenizer,
    write_config_folder,
    write_transformer_config_folder,
)
from ..models.parts import NO_PARTS, ModelParts
from ..models.specs import PipelineSpec
from .split_files import FLUX1_WIDTH, flux_checkpoint_at_any_width, load_from_parts, needs_components, part_files
from .tensors import first_line, read_tensor_table, read_tensors_under

# pipeline class (one of models.specs.SUPPORTED_PIPELINES) -> the components it loads without
WITHOUT = {
    "StableDiffusionPipeline": {"safety_checker": None, "requires_safety_checker": False},
    "StableDiffusionXLPipeline": {},
    "StableDiffusion3Pipeline": {},
    "FluxPipeline": {},
}


def absent_components(path: Path) -> dict:
    """Components a folder's model_index.json lists as `[null, null]` (an SD 3.5 saved without T5): diffusers
    loads such a folder only when they are passed as None."""
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {name: None for name, value in entries.items()
            if isinstance(value, list) and len(value) == 2 and value == [None, None]}  # fmt: skip


SHAREABLE = ("vae", "text_encoder", "text_encoder_2")  # never the UNet: its attached adapters are per pipeline


def component_identities(spec: PipelineSpec, dtype: torch.dtype) -> dict[str, str]:
    """For a pipeline folder, each shareable component's identity: its weight files as the disk knows them (device,
    inode, size, modification time) and the dtype, so two folders whose `vae/` is the same file (a symlink, a hard
    link) share one module. Single files hold their components inside: {}."""
    path = Path(spec.path)
    if not path.is_dir():
        return {}
    identities = {}
    for name in SHAREABLE:
        files = sorted(f for f in (path / name).glob("*") if f.suffix in (".safetensors", ".bin") and f.is_file())
        if files:
            stats = [f.stat() for f in files]
            identities[name] = f"{dtype}|" + ";".join(f"{s.st_dev}:{s.st_ino}:{s.st_size}:{s.st_mtime_ns}" for s in stats)
    return identities


def load_pipeline(spec: PipelineSpec, device: torch.device, dtype: torch.dtype, shared: dict | None = None,
                  parts: ModelParts = NO_PARTS):  # fmt: skip
    """The text-to-image pipeline `spec` describes, on `device` in `dtype`. `shared`: components already loaded
    (name -> module) that it uses instead of reading its own copy of the same files. `parts`: a transformer-alone
    model's VAE and text encoders (`models/parts.py`)."""
    import diffusers

    cls = getattr(diffusers, spec.pipeline_class)
    path = Path(spec.path)
    try:
        if needs_components(spec, parts):  # a split model, or a quantized all-in-one file
            pipeline = load_from_parts(cls, spec, part_files(spec, parts), dtype)
        elif path.is_file():
            pipeline = from_single_file(cls, spec, dtype)
        else:
            pipeline = cls.from_pretrained(
                spec.path, dtype=dtype, local_files_only=True, **{**absent_components(path), "image_encoder": None,
                "feature_extractor": None, **WITHOUT[spec.pipeline_class], **(shared or {})},
            )  # fmt: skip
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        what = "split model" if parts.files else "single-file checkpoint" if path.is_file() else "pipeline"
        raise CheckpointError(spec.path, f"cannot load {what} ({first_line(exc)})") from None
    pipeline.set_progress_bar_config(disable=True)
    for name, component in pipeline.components.items():  # not `pipeline.to`: that would move the shared ones too,
        if isinstance(component, torch.nn.Module) and name not in (shared or {}):  # off a resident model's device
            component.to(device)
    return pipeline


def from_single_file(cls, spec: PipelineSpec, dtype: torch.dtype):
    """diffusers' `from_single_file` with the config folder imprompt writes from the tensors. SD 3 files without T5
    load without it, as diffusers allows; FLUX files of another width than FLUX.1's get their transformer here."""
    path = Path(spec.path)
    table, _ = read_tensor_table(path)
    extra = dict(WITHOUT[spec.pipeline_class])
    with tempfile.TemporaryDirectory(prefix="imprompt-config-") as name:
        folder = Path(name)
        if spec.architecture == "unet":
            write_config_folder(path, table, folder)
        else:
            write_transformer_config_folder(path, table, folder, spec.architecture, require_t5_tokenizer(spec))
            if spec.architecture == "sd3" and "t5xxl" not in spec.text_encoders:
                extra.update(text_encoder_3=None, tokenizer_3=None)
            widths = clip_widths(table)
            if spec.architecture == "sd3" and widths["clip_l"] == widths["clip_g"]:
                extra["text_encoder_2"] = sd3_clip_g(path, folder, dtype)
            if spec.architecture == "flux" and table[UNET + "img_in.weight"].shape[0] != FLUX1_WIDTH:
                extra["transformer"] = flux_transformer_at_any_width(path, folder, dtype)
        pipeline = cls.from_single_file(str(path), config=str(folder), local_files_only=True, dtype=dtype,
                                        image_encoder=None, feature_extractor=None, **extra)  # fmt: skip
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # diffusers' single-file loader leaves T5 in training mode: dropout on, prompts drift
    return pipeline


def sd3_clip_g(path: Path, config_folder: Path, dtype: torch.dtype):
    """SD 3's CLIP bigG tower from a file where it is as wide as CLIP-L (imprompt goes beyond diffusers here):
    diffusers' single-file loader tells the two towers apart by width alone (768 / 1280) and would fill both from
    `clip_l`. The tensors under `text_encoders.clip_g.` are converted by diffusers' own function."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    prefix = DIT_TEXT_ENCODERS["clip_g"]
    state = convert_ldm_clip_checkpoint(read_tensors_under(path, prefix), prefix)
    model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config_folder / "text_encoder_2"))
    model.load_state_dict({k: v for k, v in state.items() if not k.endswith("position_ids")})  # strict: all named
    return model.to(dtype)


def flux_transformer_at_any_width(path: Path, config_folder: Path, dtype: torch.dtype):
    """A FLUX-shaped transformer from an all-in-one file narrower or wider than FLUX.1 (imprompt goes beyond
    diffusers here: `split_files.flux_checkpoint_at_any_width`)."""
    from diffusers import FluxTransformer2DModel

    checkpoint = {k.removeprefix(UNET): v for k, v in read_tensors_under(path, UNET).items()}
    config = json.loads((config_folder / "transformer" / "config.json").read_text())
    transformer = FluxTransformer2DModel.from_config(config)
    transformer.load_state_dict(flux_checkpoint_at_any_width(checkpoint))  # strict: every tensor named, nothing else
    return transformer.to(dtype)
