"""FLUX and SD 3.5 from ComfyUI's split files and from quantized files (fp8, scaled fp8, GGUF): the same pixels as
diffusers' own pipeline from the reference folder, whose weights went through the same rounding (fp8), the same
dequantization (scaled fp8, GGUF by the gguf package's own `dequantize`)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from comfy_trees import (
    PART_PREFIXES,
    fp8_rounded,
    fp8_tensors,
    gguf_rounded,
    save_part,
    scaled_fp8_dequantized,
    scaled_fp8_tensors,
    split_tensors,
    write_gguf,
    write_split_tree,
)

from imprompt.demo.tiny_dits import build_flux_pipeline, build_sd3_pipeline
from imprompt.loading.pipelines import load_pipeline
from imprompt.models.parts import ModelParts
from imprompt.models.probe import probe
from imprompt.models.single_file import COMFY_T5_TOKENIZER
from imprompt.models.store import Entry

CPU, F32 = torch.device("cpu"), torch.float32
Q8_0, Q4_K = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_K


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Path:
    """A ComfyUI install with split FLUX and SD 3.5 trees (`models/`), T5's tokenizer where ComfyUI ships it,
    and the diffusers folders they were written from (`reference/`)."""
    root = tmp_path_factory.mktemp("ComfyUI")
    write_split_tree(build_flux_pipeline(root / "reference" / "flux", seed=5, clip_vocabulary=True), root / "models")
    write_split_tree(build_sd3_pipeline(root / "reference" / "sd35", seed=5, clip_vocabulary=True), root / "models")
    shutil.copytree(root / "reference" / "flux" / "tokenizer_2", root / COMFY_T5_TOKENIZER)
    return root


def reference(folder: Path):
    import diffusers

    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if folder.name == "sd35" else {}  # saved without it
    return diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True, **without_t5)


def run(pipeline, flux: bool) -> np.ndarray:
    """One image as 0..255 integers (3 steps, 64 px, a fixed seed)."""
    fields = {"guidance_scale": 3.5} if flux else {"guidance_scale": 4.0, "negative_prompt": "blurry"}
    image = pipeline(prompt="a red cat", num_inference_steps=3, width=64, height=64, output_type="np",
                     generator=torch.Generator().manual_seed(3), **fields).images[0]  # fmt: skip
    return (image * 255).round().astype(np.int32)


def split_model(comfy: Path, transformer: Path, roles: dict[str, Path], architecture: str):
    """A split model as the probe and `models/parts.py` hand it to the loader: its spec (the reference folder's,
    on the transformer's file, naming its parts) and the chosen part files."""
    spec = dataclasses.replace(probe(comfy / "reference" / ("flux" if architecture == "flux" else "sd35")),
                               path=str(transformer), parts=tuple(roles))  # fmt: skip
    return spec, ModelParts({role: Entry(path.stem, path, (), None) for role, path in roles.items()}, {})


FLUX_PARTS = {"vae": "vae/ae.safetensors", "clip_l": "text_encoders/clip_l.safetensors",
              "t5xxl": "text_encoders/t5xxl_fp16.safetensors"}  # fmt: skip
SD35_PARTS = {"vae": "vae/sd3.5_vae.safetensors", "clip_l": "text_encoders/clip_l.safetensors",
              "clip_g": "text_encoders/clip_g.safetensors"}  # fmt: skip


def parts_of(comfy: Path, names: dict[str, str], **replaced: Path) -> dict[str, Path]:
    return {role: replaced.get(role, comfy / "models" / name) for role, name in names.items()}


def linear_dtypes(module: torch.nn.Module) -> set:
    return {m.weight.dtype for m in module.modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("architecture", ["flux", "sd3"])
def test_split_trees_generate_like_their_folders(comfy, architecture):
    """The transformer alone in diffusion_models/, the VAE and text encoders in their own files: the same pixels
    (to 1/255: the files store fp16) as diffusers' pipeline from the folder they were written from."""
    flux = architecture == "flux"
    transformer = comfy / "models" / "diffusion_models" / ("flux1-dev.safetensors" if flux else "sd3.5_large.safetensors")
    spec, parts = split_model(comfy, transformer, parts_of(comfy, FLUX_PARTS if flux else SD35_PARTS), architecture)
    pipeline = load_pipeline(spec, CPU, F32, None, parts)
    expected = run(reference(comfy / "reference" / ("flux" if flux else "sd35")), flux)
    assert np.abs(run(pipeline, flux) - expected).max() <= 1


def test_fp8_transformer_and_t5_stay_fp8_and_equal_their_rounded_weights(comfy):
    """An fp8 e4m3fn transformer and an fp8 e5m2 T5: their linear layers stay fp8 in memory (diffusers' layerwise
    casting upcasts each for its forward), and the pixels equal diffusers' pipeline whose weights were rounded
    through the same fp8 dtypes."""
    tensors = split_tensors(reference(comfy / "reference" / "flux"))
    transformer = save_part(fp8_tensors(tensors["transformer"]), comfy / "fp8" / "flux1-dev-fp8.safetensors", None)
    t5 = save_part(fp8_tensors(tensors["t5xxl"], torch.float8_e5m2), comfy / "fp8" / "t5xxl_fp8_e5m2.safetensors", None)
    spec, parts = split_model(comfy, transformer, parts_of(comfy, FLUX_PARTS, t5xxl=t5), "flux")
    pipeline = load_pipeline(spec, CPU, F32, None, parts)
    assert torch.float8_e4m3fn in linear_dtypes(pipeline.transformer)
    assert torch.float8_e5m2 in linear_dtypes(pipeline.text_encoder_2)

    expected = reference(comfy / "reference" / "flux")
    with torch.no_grad():
        for p in expected.transformer.parameters():
            p.copy_(fp8_rounded(p))
        for p in expected.text_encoder_2.parameters():
            p.copy_(fp8_rounded(p, torch.float8_e5m2))
    assert np.abs(run(pipeline, True) - run(expected, True)).max() <= 1


def test_scaled_fp8_files_equal_their_dequantized_weights(comfy, tmp_path):
    """ComfyUI's scaled fp8 (fp8 weights x `scale_weight`), dequantized at load: an SD 3.5 transformer alone
    and the same in an all-in-one file (which the probe no longer refuses) equal diffusers' pipeline whose
    transformer diffusers loaded from the dequantized weights."""
    from diffusers import SD3Transformer2DModel

    folder = comfy / "reference" / "sd35"
    tensors = split_tensors(reference(folder))
    scaled = scaled_fp8_tensors(tensors["transformer"])
    alone = save_part(scaled, tmp_path / "sd3.5_large_fp8_scaled.safetensors", None)
    spec, parts = split_model(comfy, alone, parts_of(comfy, SD35_PARTS), "sd3")

    expected = reference(folder)
    expected.transformer = SD3Transformer2DModel.from_single_file(scaled_fp8_dequantized(scaled), config=str(folder),
                                                                  subfolder="transformer", local_files_only=True)  # fmt: skip
    pixels = run(expected, False)
    assert np.abs(run(load_pipeline(spec, CPU, F32, None, parts), False) - pixels).max() <= 1

    prefixes = {part: prefix for prefix, part in PART_PREFIXES.items()}
    whole = {prefixes["transformer"] + k: v for k, v in scaled.items()}
    for part in ("vae", "clip_l", "clip_g"):
        whole.update({prefixes[part] + k: v.half() for k, v in tensors[part].items()})
    aio = save_part(whole, tmp_path / "checkpoints" / "sd3.5_large_fp8_scaled_aio.safetensors", None)
    spec = probe(aio)
    assert spec.unsupported is None
    assert np.abs(run(load_pipeline(spec, CPU, F32), False) - pixels).max() <= 1


@pytest.mark.parametrize("qtype, width", [(Q8_0, 32), (Q4_K, 256)])
def test_gguf_transformers_stay_quantized_and_equal_their_dequantized_weights(comfy, tmp_path, qtype, width):
    """A FLUX transformer in city96's GGUF layout (bare Black Forest Labs' names; Q8_0 at 32 wide, Q4_K at 256
    wide, where its 256-value blocks fit a row): kept quantized in memory (diffusers' GGUFParameter), the same
    pixels as diffusers' pipeline whose weights are the gguf package's dequantization of the same blocks."""
    from diffusers.quantizers.gguf.utils import GGUFParameter

    base = comfy / f"gguf-{qtype.name}"  # inside the ComfyUI install, where T5's tokenizer is found
    if width == 32:
        folder, models = comfy / "reference" / "flux", comfy / "models"
    else:
        folder, models = base / "reference", base / "models"
        write_split_tree(build_flux_pipeline(folder, seed=5, clip_vocabulary=True, heads=2, head_dim=128), models)
    tensors = split_tensors(reference(folder))
    path = write_gguf(tensors["transformer"], base / f"flux1-dev-{qtype.name}.gguf", qtype)
    spec, parts = split_model(comfy, path, {role: models / name for role, name in FLUX_PARTS.items()}, "flux")
    spec = dataclasses.replace(spec, layer_widths=(width,) * len(spec.layer_widths))
    pipeline = load_pipeline(spec, CPU, F32, None, parts)
    quantized = [p for p in pipeline.transformer.parameters() if isinstance(p, GGUFParameter)]
    assert quantized and all(p.quant_type == qtype for p in quantized)

    expected = reference(folder)
    with torch.no_grad():
        for p in expected.transformer.parameters():
            p.copy_(gguf_rounded(p, qtype))
    assert np.abs(run(pipeline, True) - run(expected, True)).max() <= 1
