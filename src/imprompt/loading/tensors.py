"""Checkpoint files read safely: tensor tables and tensors, safetensors, GGUF or weights-only pickles.

safetensors go through the safetensors library, GGUF files (city96's quantized FLUX / SD 3.5 transformers) through
the `gguf` package, pickles only through `torch.load(weights_only=True)`, and every failure is a `CheckpointError`
that names the file. Two levels: the *tensor table* (names, dtypes, shapes,
metadata; no tensor data is read, so probing a 3 GB encoder costs a millisecond) and the *tensors* themselves,
converted one by one to the compute dtype as they are read, so loading an fp16 file for bf16 compute never holds
a full-precision copy of the whole file.
"""

from __future__ import annotations

import os
import pickle
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, UnsafeCheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
REDOWNLOAD = "Download the file again, or remove it from the models folder"


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor table and metadata of a `.safetensors` file. The safetensors library checks the header (size
    limit, JSON, known dtypes, offsets inside the file and covering it exactly) before anything is mapped, so a
    header that declares a 10^18-element tensor is refused from its arithmetic, never allocated."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    file_size(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            table = {}
            for name in handle.keys():
                piece = handle.get_slice(name)
                table[name] = TensorInfo(piece.get_dtype(), tuple(piece.get_shape()))
            return table, handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a valid safetensors file ({first_line(exc)})", REDOWNLOAD) from None
    except (RuntimeError, MemoryError) as exc:
        if isinstance(exc, RuntimeError) and "mmap" not in str(exc):
            raise
        return parse_safetensors_header(path)  # larger than the memory the kernel will map at once


# bytes per element of each safetensors dtype
DTYPE_BYTES = {"C64": 8, "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}  # fmt: skip
HEADER_LIMIT = 100_000_000  # the safetensors library's own limit on the JSON header


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor table of a safetensors file too large for the library to map (it maps the whole file to read
    the header: a 28 GB FLUX checkpoint on a 24 GB machine), read from the header alone with the library's checks:
    the size limit, known dtypes, sizes that match the shapes, offsets that cover the data exactly."""
    import json
    import math
    import struct

    size = file_size(path)

    def bad(problem):
        return CheckpointError(path, f"not a valid safetensors file ({problem})", REDOWNLOAD)

    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise bad("shorter than its header length")
        (length,) = struct.unpack("<Q", start)
        if length > HEADER_LIMIT or 8 + length > size:
            raise bad(f"header length {length} exceeds the limit or the file")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ is not a map of strings")
    table, spans = {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (first, last) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has no dtype, shape and two data offsets") from None
        if dtype not in DTYPE_BYTES or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r} has dtype {dtype!r} and shape {shape}")
        if not (type(first) is int and type(last) is int) or last - first != count * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {name!r}: offsets {first}..{last} do not hold {shape} x {dtype}")
        table[name] = TensorInfo(dtype, tuple(shape))
        spans.append((first, last))
    end = 0
    for first, last in sorted(spans):
        if first != end:
            raise bad(f"tensor data does not cover the file exactly (gap or overlap at byte {first})")
        end = last
    if 8 + length + end != size:
        raise bad(f"tensor data ends at byte {8 + length + end}, the file at {size}")
    return table, metadata


def load_pickle(path: Path, mmap: bool = False):
    """torch.load with `weights_only=True`: tensors and plain containers only; anything else is refused unrun."""
    import torch

    path = Path(path)
    file_size(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is None:  # the weights-only unpickler met bytes that are no pickle opcode: damage, not code
            detail = next((line for line in lines if "Unsupported" in line or "error" in line), first_line(exc))
            raise CheckpointError(path, f"corrupt pickle checkpoint ({detail})", REDOWNLOAD) from None
        raise UnsafeCheckpointError(
            path,
            f"pickle checkpoint carries code or objects other than tensors and was refused without running it "
            f"({refused})",
            "Use the .safetensors version of this file",
        ) from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # legacy (non-zip) pickle format cannot be memory-mapped
            return load_pickle(path, mmap=False)
        raise CheckpointError(path, f"cannot read pickle checkpoint ({first_line(exc)})", REDOWNLOAD) from None
    except Exception as exc:  # torch.load on damaged bytes raises many types (IndexError, EOFError, KeyError...)
        raise CheckpointError(
            path, f"cannot read pickle checkpoint ({type(exc).__name__}: {first_line(exc)})", REDOWNLOAD
        ) from None


def flatten_state_dict(obj, prefix: str = "") -> dict:
    """{"image_proj": {"proj.weight": t}} -> {"image_proj.proj.weight": t}; non-tensor leaves are dropped."""
    import torch

    flat = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            flat.update(flatten_state_dict(value, f"{prefix}{key}."))
    elif isinstance(obj, torch.Tensor):
        flat[prefix[:-1]] = obj
    return flat


def read_tensor_table(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Names, dtypes and shapes of a checkpoint's tensors, plus safetensors metadata (empty for pickles).
    Pickles are memory-mapped, so their data is not read either."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors_header(path)
    if path.suffix == ".gguf":
        return read_gguf_table(path)
    if path.suffix in PICKLE_SUFFIXES:
        flat = flatten_state_dict(load_pickle(path, mmap=True))
        return {k: TensorInfo(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in flat.items()}, {}
    raise CheckpointError(path, f"unknown checkpoint extension {path.suffix!r}, expected one of {WEIGHT_SUFFIXES}")


# GGUF metadata a table keeps (the rest, e.g. a language model's vocabulary, is not about tensors' storage)
GGUF_METADATA = ("general.architecture", "general.file_type", "general.quantization_version")
# city96's files keep a tensor's shape here when they stored it reshaped (GGUF holds at most 4 dimensions)
GGUF_ORIGINAL_SHAPE = "comfy.gguf.orig_shape."


def read_gguf_table(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensor table of a GGUF file: dtype is the GGML type's name ("Q8_0", "Q4_K", "F16", ...), shape the
    tensor's logical (dequantized) shape in torch's order (GGUF lists dimensions innermost first); metadata the
    architecture and file type, as strings. The file is memory-mapped; no tensor data is read."""
    import gguf

    file_size(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:  # bad magic, truncated header, ...
        raise CheckpointError(path, f"not a valid GGUF file ({first_line(exc)})", REDOWNLOAD) from None
    metadata, shapes = {}, {}
    for name, field in reader.fields.items():
        if name in GGUF_METADATA:
            metadata[name] = str(field.contents())
        elif name.startswith(GGUF_ORIGINAL_SHAPE):
            shapes[name.removeprefix(GGUF_ORIGINAL_SHAPE)] = tuple(int(d) for d in field.contents())
    table = {}
    for tensor in reader.tensors:
        shape = shapes.get(tensor.name) or tuple(int(d) for d in reversed(tensor.shape.tolist()))
        table[tensor.name] = TensorInfo(tensor.tensor_type.name, shape)
    return table, metadata


# storage types that hold weights as they are computed with; any other is a quantization
PLAIN_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "float32", "float16", "bfloat16")
FP8_DTYPES = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2", "float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2"}


def quantization(path: Path, table: dict[str, TensorInfo], metadata: dict[str, str]) -> str:
    """How a file's weights are stored: "" (fp32 / fp16 / bf16), "fp8_e4m3fn" / "fp8_e5m2", "scaled_fp8"
    (ComfyUI's: fp8 weights with a `<layer>.scale_weight` each, marked by a `scaled_fp8` tensor), or for GGUF
    "gguf_<type>": the file type its header declares ("gguf_Q8_0", "gguf_Q4_K_S"), else its commonest quantized
    tensor type (its commonest type when none is quantized: "gguf_F16")."""
    if Path(path).suffix == ".gguf":
        declared = _gguf_file_type(metadata.get("general.file_type"))
        if declared:
            return f"gguf_{declared}"
        counts: dict[str, int] = {}
        for info in table.values():
            counts[info.dtype] = counts.get(info.dtype, 0) + 1
        quantized = {t: n for t, n in counts.items() if t not in PLAIN_DTYPES} or counts
        return f"gguf_{max(sorted(quantized), key=quantized.get)}" if quantized else ""
    if "scaled_fp8" in table or any(k.endswith(".scale_weight") for k in table):
        return "scaled_fp8"
    found = [FP8_DTYPES[info.dtype] for info in table.values() if info.dtype in FP8_DTYPES]
    return max(sorted(set(found)), key=found.count) if found else ""


def _gguf_file_type(value: str | None) -> str:
    """llama.cpp's file-type number as its type's name ("7" -> "Q8_0", "1" -> "F16"); "" if absent or unknown."""
    import gguf

    try:
        name = gguf.LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return ""
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def read_tensors_under(path: Path, prefix: str) -> dict:
    """The tensors of a `.safetensors` file whose names start with `prefix`, read one by one (the rest is not)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}


def read_tensors(path: Path, dtype=None) -> dict:
    """All tensors of a checkpoint file, converted tensor by tensor to `dtype` (None: as stored)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.suffix == ".gguf":
        return read_gguf_tensors(path, dtype)
    tensors = {}
    if path.suffix == ".safetensors":
        read_safetensors_header(path)  # a damaged header is a CheckpointError before any tensor is read
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = _converted(f.get_tensor(key), dtype)
        else:
            for key, tensor in flatten_state_dict(load_pickle(path)).items():
                tensors[key] = _converted(tensor, dtype)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read tensors ({first_line(exc)})", "Download the file again") from None
    return tensors


def read_gguf_tensors(path: Path, dtype=None) -> dict:
    """All tensors of a GGUF file, dequantized (`gguf.quants.dequantize`) to float32, then to `dtype`, in their
    logical shapes: what the quantized weights stand for (a reference; loading keeps them quantized)."""
    import gguf
    import torch

    table, _ = read_gguf_table(path)
    tensors = {}
    try:
        for tensor in gguf.GGUFReader(path, "r").tensors:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            tensors[tensor.name] = _converted(torch.from_numpy(values.copy()).reshape(table[tensor.name].shape), dtype)
    except (ValueError, NotImplementedError, RuntimeError, OSError) as exc:
        raise CheckpointError(path, f"cannot read GGUF tensors ({first_line(exc)})", REDOWNLOAD) from None
    return tensors


def _converted(tensor, dtype):
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def file_size(path: Path) -> int:
    """The size of a regular file; anything else (folder, FIFO, device) is refused before it is opened."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(path, "is a directory, expected a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "is not a regular file (a pipe, socket or device?); expected a checkpoint file")
    return st.st_size


def filled(module, tensors: dict, path, what: str, fix: str):
    """`module` (built on the meta device) with `tensors` assigned, each named and none left out: a file whose
    tensors do not fit it is a `CheckpointError` naming `what` it should have been, the tensors missing, unexpected
    or of another shape (the first few of each), and the fix."""
    if problems := tensor_mismatch(module.state_dict(), tensors):
        raise CheckpointError(path, f"cannot build this {what}: {problems}", fix)
    try:
        module.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"cannot build this {what} ({first_line(exc)})", fix) from None
    return module


def tensor_mismatch(expected: dict, tensors: dict, shown: int = 3) -> str:
    """What keeps `tensors` from loading strictly where `expected` (a state dict) is wanted, in words: the tensors
    missing, the ones unexpected, the ones of another shape (at most `shown` of each named), or "" when none."""

    def listed(names: list[str]) -> str:
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    resized = [f"{k} {list(tensors[k].shape)} (expected {list(expected[k].shape)})" for k in expected
               if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]  # fmt: skip
    parts = [f"{label} {listed(names)}" for label, names in (("missing", missing), ("unexpected", unexpected),
                                                             ("of another shape:", resized)) if names]  # fmt: skip
    return "; ".join(parts)


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (library messages can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
