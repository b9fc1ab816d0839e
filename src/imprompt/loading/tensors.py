"""Checkpoint files read safely: tensor tables and tensors, safetensors or weights-only pickles.

safetensors go through the safetensors library, pickles only through `torch.load(weights_only=True)`, and every
failure is a `CheckpointError` that names the file. Two levels: the *tensor table* (names, dtypes, shapes,
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

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
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
    if path.suffix in WEIGHT_SUFFIXES:
        flat = flatten_state_dict(load_pickle(path, mmap=True))
        return {k: TensorInfo(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in flat.items()}, {}
    raise CheckpointError(path, f"unknown checkpoint extension {path.suffix!r}, expected one of {WEIGHT_SUFFIXES}")


def read_tensors(path: Path, dtype=None) -> dict:
    """All tensors of a checkpoint file, converted tensor by tensor to `dtype` (None: as stored)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
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


def first_line(exc: BaseException) -> str:
    """An exception's message, first line only (library messages can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
