"""Quantized weight files read as diffusers can run them: fp8, ComfyUI's scaled fp8, and GGUF.

- fp8 (e4m3fn / e5m2) safetensors: every fp8 value is exact in fp16, bf16 and fp32, so upcasting per tensor to the
  compute dtype changes nothing. A transformer's or T5's linear layer whose tensors are all fp8 stays fp8 in memory
  unless diffusers' layerwise casting skips it (its "norm" pattern takes FLUX's and SD 3's AdaLN modulation layers;
  T5's `wo`): diffusers' casting hook (`apply_layerwise_casting_hook`) upcasts it for its forward only, the same
  values as upcast once. One function (`fp8_kept`) decides it for the loader and the memory plan's estimate.
- ComfyUI's scaled fp8 (a `scaled_fp8` marker tensor; each linear layer's fp8 `weight` beside a `scale_weight`):
  the weight is `weight * scale_weight`, dequantized at load into the compute dtype. It is NOT kept fp8: the
  product is not an fp8 value, and diffusers has no layer that applies the scale per forward.
- GGUF (city96's files: the transformer in Black Forest Labs' / Stability's names, bare): read by diffusers'
  `load_gguf_checkpoint` into `GGUFParameter`s, kept quantized; diffusers' GGUF layers dequantize per forward.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .tensors import TensorInfo

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FP8_NAMES = {torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e5m2: "fp8_e5m2"}
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker tensor (empty, of the fp8 dtype the file uses)
SCALE_SUFFIXES = (".scale_weight", ".scale_input")  # ComfyUI: per-layer weight scale, and its fp8-matmul input scale


def quantization_of(table: dict[str, TensorInfo], path: Path | str = "") -> str:
    """How a file's (or one part's) weights are stored: "" (fp16 / bf16 / fp32), "fp8_e4m3fn", "fp8_e5m2",
    "scaled_fp8", or "gguf_<type>" (the commonest quantized GGML type among its tensors)."""
    if str(path).endswith(".gguf"):
        counts: dict[str, int] = {}
        for info in table.values():
            if info.dtype not in ("F32", "F16", "BF16"):
                counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return f"gguf_{max(counts, key=counts.get)}" if counts else ""
    if any(k == SCALED_FP8_MARKER or k.endswith(SCALED_FP8_MARKER) or k.endswith(".scale_weight") for k in table):
        return "scaled_fp8"
    kinds = [FP8_NAMES[FP8[info.dtype]] for info in table.values() if info.dtype in FP8]
    return max(set(kinds), key=kinds.count) if kinds else ""


def read_part(path: Path, prefix: str, dtype: torch.dtype, keep_fp8: bool) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file under `prefix` (names without it), one by one: floating tensors in
    `dtype`, fp8 ones left fp8 when `keep_fp8`, scaled-fp8 weights dequantized (weight * scale_weight, computed in
    float32, then `dtype`) and their scales dropped. No full-precision copy of the whole file is held beside it."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        names = [n for n in handle.keys() if n.startswith(prefix)]
        scaled = set(names)
        for name in names:
            if name.endswith(SCALE_SUFFIXES) or name.endswith(SCALED_FP8_MARKER):
                continue
            tensor = handle.get_tensor(name)
            scale = name.removesuffix(".weight") + ".scale_weight"
            if name.endswith(".weight") and scale in scaled:
                tensor = (tensor.to(torch.float32) * handle.get_tensor(scale).to(torch.float32)).to(dtype)
            elif tensor.is_floating_point() and not (keep_fp8 and tensor.dtype in FP8_NAMES):
                tensor = tensor.to(dtype)
            tensors[name[len(prefix) :]] = tensor
    return tensors


def fp8_storage(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The fp8 dtype most of these tensors are stored in (None: none is fp8)."""
    kinds = [t.dtype for t in tensors.values() if t.dtype in FP8_NAMES]
    return max(set(kinds), key=kinds.count) if kinds else None


KEEPS_FP8 = ("transformer", "t5xxl")  # the parts loaded with their fp8 layers kept fp8 (VAE and CLIP: upcast)


def keeps_fp8(part: str, quantization: str) -> bool:
    """Whether a part's fp8 layers are kept fp8 as it loads (`fp8_kept` says which): the transformer's and T5's
    (their bulk), where the file is plain fp8; scaled fp8 is dequantized, other parts upcast."""
    return part in KEEPS_FP8 and quantization.startswith("fp8")


def fp8_kept(model: torch.nn.Module, dtypes: dict[str, torch.dtype], skip: tuple[str, ...] = ()) -> set[str]:
    """The one rule for which tensors of an fp8 file stay fp8 in memory, which the loader (`load_keeping_fp8`) and
    the memory plan's size estimate (`memory_plan.estimate_sizes`, on a model built on the meta device) both call:
    each linear / convolution layer of `model` whose tensors (`dtypes`: name -> dtype as read) are all of one fp8
    dtype, unless its name or an ancestor's matches diffusers' layerwise-casting skip patterns (its defaults,
    `skip`, and the model's own `_skip_layerwise_casting_patterns`: "norm" upcasts FLUX's and SD 3's AdaLN
    modulation layers). Returns the names of the tensors kept fp8."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = (*DEFAULT_SKIP_MODULES_PATTERN, *skip, *(getattr(model, "_skip_layerwise_casting_patterns", None) or ()))
    supported = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    kept = set()
    for name, module in model.named_modules():
        if not isinstance(module, supported):
            continue
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        kinds = {dtypes[k] for k in own if k in dtypes}
        ancestors = [".".join(name.split(".")[: i + 1]) for i in range(name.count(".") + 1)] if name else []
        if (len(kinds) == 1 and next(iter(kinds)) in FP8_NAMES and own
                and not any(re.search(p, a) for p in patterns for a in ancestors)):  # fmt: skip
            kept.update(own)
    return kept


def load_keeping_fp8(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype,
                     skip: tuple[str, ...] = ()) -> torch.nn.Module:  # fmt: skip
    """Fill `model` (built on the meta device) from `state`, whose tensors are `dtype` or fp8: the layers `fp8_kept`
    names stay fp8 and get diffusers' layerwise casting hook (upcast to `dtype` for their forward); everything else
    is upcast now. `skip`: name patterns (regular expressions) of layers to upcast anyway."""
    from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook

    kept = fp8_kept(model, {k: t.dtype for k, t in state.items()}, skip)
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if own and all(k in kept for k in own):
            apply_layerwise_casting_hook(module, state[own[0]].dtype, dtype, non_blocking=False)
    loaded = {k: (t if k in kept or not t.is_floating_point() else t.to(dtype)) for k, t in state.items()}
    model.load_state_dict(loaded, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------------- GGUF


def gguf_table(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A GGUF file's tensor table: GGML type names and logical shapes in torch's order (GGML lists dims
    innermost first), and its string metadata (`general.architecture`, ...)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    table = {t.name: TensorInfo(t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors}
    metadata = {}
    for field in reader.fields.values():
        if field.types and field.types[0].name == "STRING":
            metadata[field.name] = bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    return table, metadata


def read_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A GGUF file's tensors as diffusers reads them: quantized ones as `GGUFParameter` (raw blocks, kept
    quantized), F16 / F32 ones as plain tensors."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path))


def is_gguf_quantized(tensor: torch.Tensor) -> bool:
    from diffusers.quantizers.gguf.utils import GGUFParameter

    return isinstance(tensor, GGUFParameter)
