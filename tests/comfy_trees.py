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


# ------------------------------------------------------------------------------- quantized parts (fp8, GGUF)


def fp8_tensors(tensors: dict[str, torch.Tensor], fp8: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """A part as an fp8 file has it (every floating tensor stored in `fp8`, as `model.to(fp8)` saves it)."""
    return {k: v.to(fp8) if v.is_floating_point() else v for k, v in tensors.items()}


def fp8_rounded(tensor: torch.Tensor, fp8: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """What a weight becomes through an fp8 file: rounded to fp8, back in its own dtype."""
    return tensor.to(fp8).to(tensor.dtype)


def scaled_fp8_tensors(tensors: dict[str, torch.Tensor], fp8: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """A part as ComfyUI's scaled-fp8 files have it: each linear layer's weight (2-D `*.weight`) stored as
    fp8(weight / scale) beside its float32 `scale_weight` (here max |w| / 448, one per layer), the rest in fp16,
    and the empty `scaled_fp8` marker tensor in the fp8 dtype."""
    out = {"scaled_fp8": torch.empty(0, dtype=fp8)}
    for key, tensor in tensors.items():
        if key.endswith(".weight") and tensor.ndim == 2:
            scale = (tensor.float().abs().max() / torch.finfo(fp8).max).clamp(min=1e-12)
            out[key] = (tensor.float() / scale).to(fp8)
            out[key.removesuffix(".weight") + ".scale_weight"] = scale.reshape(())
        else:
            out[key] = tensor.half()
    return out


def scaled_fp8_dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A scaled-fp8 part's weights as they are meant: fp8 weight x scale_weight (float32)."""
    out = {}
    for key, tensor in tensors.items():
        if key == "scaled_fp8" or key.endswith(".scale_weight"):
            continue
        scale = tensors.get(key.removesuffix(".weight") + ".scale_weight")
        out[key] = tensor.float() * scale.float() if scale is not None else tensor.float()
    return out


def gguf_quantized(tensor: torch.Tensor, qtype) -> bool:
    """Whether the GGUF writer below stores this tensor quantized: 2-D, its rows a whole number of blocks."""
    import gguf

    return tensor.ndim == 2 and tensor.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def gguf_bytes(tensor: torch.Tensor, qtype):
    """A 2-D tensor's rows quantized to GGML blocks (numpy uint8, one row of bytes per row). Q8_0 by the gguf
    package; Q4_K (which it cannot write) by a plain min/scale fit per 32 values: a valid block, not llama.cpp's
    optimised search."""
    import gguf
    import numpy as np

    data = tensor.detach().float().numpy()
    if qtype != gguf.GGMLQuantizationType.Q4_K:
        return gguf.quants.quantize(data, qtype)
    rows, columns = data.shape
    x = data.reshape(-1, 8, 32)  # super-blocks of 256: 8 sub-blocks of 32
    mins = np.maximum(0, -x.min(axis=2))
    scales = (x.max(axis=2) + mins) / 15
    d = (scales.max(axis=1) / 63).astype(np.float16)
    dmin = (mins.max(axis=1) / 63).astype(np.float16)
    df, dminf = np.where(d == 0, 1, d).astype(np.float32), np.where(dmin == 0, 1, dmin).astype(np.float32)
    sc = np.clip(np.round(scales / df[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(mins / dminf[:, None]), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[:, None] * sc)[:, :, None]
    offset = (dmin.astype(np.float32)[:, None] * mn)[:, :, None]
    q = np.clip(np.round((x + offset) / np.where(step == 0, 1, step)), 0, 15).astype(np.uint8)
    packed = np.concatenate([
        (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1).astype(np.uint8)  # fmt: skip
    qs = (q.reshape(-1, 4, 2, 32)[:, :, 0] | (q.reshape(-1, 4, 2, 32)[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qs], axis=1)
    return blocks.reshape(rows, -1)


def gguf_rounded(tensor: torch.Tensor, qtype) -> torch.Tensor:
    """What a weight becomes through the GGUF writer below, by the gguf package's own dequantization."""
    import gguf

    if gguf_quantized(tensor, qtype):
        values = gguf.quants.dequantize(gguf_bytes(tensor, qtype), qtype)
        return torch.from_numpy(values.copy()).reshape(tensor.shape).to(tensor.dtype)
    return tensor if tensor.ndim == 1 else tensor.half().to(tensor.dtype)


def write_gguf(tensors: dict[str, torch.Tensor], path: Path, qtype, architecture: str = "flux") -> Path:
    """A transformer as city96's GGUF files hold it: bare Black Forest Labs' / Stability's names,
    `general.architecture`, 2-D weights quantized where their rows are whole blocks, 1-D tensors F32, others F16."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == gguf.GGMLQuantizationType.Q8_0
                             else gguf.LlamaFileType.MOSTLY_Q4_K_S))  # fmt: skip
    for key, tensor in tensors.items():
        if gguf_quantized(tensor, qtype):
            writer.add_tensor(key, gguf_bytes(tensor, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(key, tensor.detach().float().numpy() if tensor.ndim == 1 else tensor.detach().half().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_MODEL = "flux1-dev-Q8_0"
FP8_T5 = "t5xxl_fp8_e4m3fn"


def write_comfy_flux_tree(root: Path, seed: int = 9) -> Path:
    """A ComfyUI install as FLUX users keep it: `models/unet/flux1-dev-Q8_0.gguf` (city96's layout), `models/vae/
    ae.safetensors`, `models/clip/clip_l.safetensors`, `t5xxl_fp16.safetensors` and `t5xxl_fp8_e4m3fn.safetensors`,
    two FLUX LoRAs in `models/loras/` (diffusers' and XLabs' names), T5's tokenizer where ComfyUI ships it. The
    model is a tiny FLUX of the demo pack's shape (the pack's XLabs adapters fit it) with CLIP's whole vocabulary,
    as every CLIP-L file has. Returns `root`."""
    import shutil

    import gguf
    from dit_loras import diffusers_lora, lora_pairs, original_pairs, write, xlabs_lora, xlabs_pairs

    from imprompt.demo.pack import FLUX_MODEL
    from imprompt.demo.tiny_dits import build_flux_pipeline
    from imprompt.models.single_file import COMFY_T5_TOKENIZER

    root = Path(root)
    models = root / "models"
    flux = build_flux_pipeline(root / "reference" / FLUX_MODEL, seed=seed, clip_vocabulary=True)
    parts = split_tensors(flux)
    write_gguf(parts["transformer"], models / "unet" / f"{GGUF_MODEL}.gguf", gguf.GGMLQuantizationType.Q8_0)
    save_part(parts["vae"], models / "vae" / "ae.safetensors")
    save_part(parts["clip_l"], models / "clip" / "clip_l.safetensors")
    save_part(parts["t5xxl"], models / "clip" / "t5xxl_fp16.safetensors")
    save_part(fp8_tensors(parts["t5xxl"]), models / "clip" / f"{FP8_T5}.safetensors", dtype=None)
    write(models / "loras" / "flux-detail.safetensors", diffusers_lora(lora_pairs(flux.transformer, 2, scale=0.2)))
    pairs = xlabs_pairs(lora_pairs(flux.transformer, 4, scale=0.2))
    write(models / "loras" / "flux-style-xlabs.safetensors", xlabs_lora(original_pairs(pairs, flux.transformer)))
    shutil.copytree(root / "reference" / FLUX_MODEL / "tokenizer_2", root / COMFY_T5_TOKENIZER)
    shutil.rmtree(root / "reference")
    return root
