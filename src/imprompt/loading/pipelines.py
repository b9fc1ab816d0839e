"""diffusers pipelines from folders and single files, with no image encoder or safety checker.

imprompt encodes reference images itself and hands the pipeline finished embeddings. Folders load with
`from_pretrained`, A1111 / SD.Next single files with `from_single_file` and the configuration imprompt ships
(`models/single_file.py`). Which pipelines can run at all is decided earlier, in the plan.
"""

from __future__ import annotations

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
}


def load_pipeline(spec: PipelineSpec, device: torch.device, dtype: torch.dtype):
    """The text-to-image pipeline `spec` describes, on `device` in `dtype`."""
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
                spec.path, dtype=dtype, image_encoder=None, feature_extractor=None, local_files_only=True,
                **WITHOUT[spec.pipeline_class],
            )  # fmt: skip
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as exc:
        what = "single-file checkpoint" if path.is_file() else "pipeline"
        raise CheckpointError(spec.path, f"cannot load {what} ({first_line(exc)})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
