"""Devices, dtypes and memory budgets: where models live, in which precision, and how much of it each cache gets.

Budgets are sized from the memory of the device the models live on (system RAM on the CPU, the GPU's own memory on
CUDA, from `torch.cuda.mem_get_info`), and every one can be set by the user.
"""

from __future__ import annotations

import gc
import os

import torch

from ..errors import RequestError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip

# Share of the device's memory each cache may hold by default. On the CPU the encoders keep half the RAM (both
# SDXL-era encoders in fp32 on a 32 GB machine), as before budgets were per device; on a GPU the pipeline needs
# most of it, so the encoders and adapters get less.
# Base models kept loaded ("pipelines"): 40 % of the RAM on the CPU (SD 1.5 in fp32 is 4.3 GB, SDXL 10 GB in
# fp32), half a GPU (SDXL in fp16 is 7 GB); "offload": the RAM where pipelines pushed off a GPU wait.
SHARES = {
    "cpu": {"encoders": 0.5, "adapters": 0.125, "embeddings": 0.02, "loras": 0.1, "vaes": 0.02, "pipelines": 0.4,
            "offload": 0.3},
    "cuda": {"encoders": 0.3, "adapters": 0.1, "embeddings": 0.02, "loras": 0.1, "vaes": 0.02, "pipelines": 0.5},
}  # fmt: skip
# enough for every adapter, LoRA (dozens of rank-32 SD 1.5 LoRAs are 150 MB each), VAE and reference a server sees
CAPS = {"adapters": 4 * 2**30, "embeddings": 512 * 2**20, "loras": 4 * 2**30, "vaes": 2 * 2**30}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """"auto" (or None) is float16 on CUDA and float32 on the CPU. float16 on the CPU is refused: PyTorch runs many
    of its CPU kernels in float16 slowly or not at all; bfloat16 is the CPU's half precision."""
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif str(dtype).lower() in DTYPES:
        resolved = DTYPES[str(dtype).lower()]
    else:
        raise RequestError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16 or auto")
    if resolved == torch.float16 and device.type == "cpu":
        raise RequestError(
            "float16 on the CPU: PyTorch's CPU kernels run float16 slowly or not at all. Use bfloat16 (half the "
            "memory of float32, fast on CPUs with bf16 instructions) or float32, or run on a GPU (--device cuda)"
        )
    return resolved


def device_memory(device: torch.device) -> int:
    """Bytes of memory on the device: the GPU's own on CUDA, the machine's RAM on the CPU."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def default_budget(cache: str, device: torch.device) -> int:
    """The default byte budget of one of the engine's caches (a key of SHARES) on `device`."""
    shares = SHARES["cuda" if device.type == "cuda" else "cpu"]
    budget = int(device_memory(device) * shares[cache])
    return min(budget, CAPS[cache]) if cache in CAPS else budget


def release_memory(device: torch.device) -> None:
    """After evictions and model switches: collect what was dropped and give freed GPU memory back to the driver,
    so that other processes (and `nvidia-smi`) see it free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
