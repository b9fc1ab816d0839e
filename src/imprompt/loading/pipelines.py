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
from ..models.single_file import write_config_folder
from ..models.specs import PipelineSpec
from .tensors import first_line, read_tensor_table

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


def load_pipeline(spec: PipelineSpec, device: torch.device, dtype: torch.dtype, shared: dict | None = None):
    """The text-to-image pipeline `spec` describes, on `device` in `dtype`. `shared`: components already loaded
    (name -> module) that it uses instead of reading its own copy of the same files."""
    import diffusers

    cls = getattr(diffusers, spec.pipeline_class)
    path = Path(spec.path)
    try:
        if path.is_file():
            table, _ = read_tensor_table(path)
            with tempfile.TemporaryDirectory(prefix="imprompt-config-") as folder:
                write_config_folder(path, table, Path(folder))
                pipeline = cls.from_single_file(
                    str(path), config=folder, local_files_only=True, dtype=dtype, image_encoder=None,
                    feature_extractor=None, **WITHOUT[spec.pipeline_class],
                )  # fmt: skip
        else:
            pipeline = cls.from_pretrained(
                spec.path, dtype=dtype, local_files_only=True, **{**absent_components(path), "image_encoder": None,
                "feature_extractor": None, **WITHOUT[spec.pipeline_class], **(shared or {})},
            )  # fmt: skip
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        what = "single-file checkpoint" if path.is_file() else "pipeline"
        raise CheckpointError(spec.path, f"cannot load {what} ({first_line(exc)})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
