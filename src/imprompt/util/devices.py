"""Devices, dtypes and memory budgets: where models live, in which precision, and how much of it each cache gets.

Budgets are sized from the memory of the device the models live on (system RAM on the CPU, the GPU's own memory on
CUDA, from `torch.cuda.mem_get_info`), and every one can be set by the user. The default shares of one memory add
up to at most what it can give, less a share reserved for what no cache holds (`RESERVED`):
- the device (`SHARES["cpu"]`, `SHARES["cuda"]`): the caches' shares add up to 79 % (with InsightFace's fixed
  64 MiB of faces, under 80 % of any device of 8 GiB or more), so 20 % is left for a generation's activations (on
  the CPU, for the process too). `python -m tools.activation_memory` counts them for
  SDXL: one UNet step at 1024x1024 (float16, classifier-free guidance) holds 0.31 GiB, the VAE decode of that image
  3.0 GiB in float32 (diffusers upcasts SDXL's VAE; 1.5 GiB in float16), 0.75 GiB at 512x512; the allocator adds
  about a quarter. 20 % of a 24 GiB GPU (4.8 GiB) holds a 1024x1024 SDXL image's decode; the engine makes a batch
  one image at a time, so a batch needs no more. A larger image whose decode would not fit (`activation_budget`)
  is decoded tile by tile (`loading/vaes.py`).
- on a GPU machine, the host RAM (`SHARES["host"]`): only the offload tier (pipelines pushed off the GPU) is kept
  there; half of the RAM stays free for a model being loaded (in CPU memory until it joins the GPU) and the
  process. On the CPU device there is no offload tier: everything is in `SHARES["cpu"]`.
"loras" is counted once: one budget for the LoRAs of all resident pipelines. "inversions" (textual inversions) is
the same share as "embeddings", which the engine sizes them from.
"""

from __future__ import annotations

import gc
import os

import torch

from ..errors import RequestError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip

# Share of a memory each cache may hold by default (see above for what is left). On the CPU the encoders keep 30 %
# of the RAM (both SDXL-era encoders in fp32, 9.3 GiB, on a 32 GiB machine); on a GPU the pipelines need more and
# the encoders get 20 % (both in fp16, 4.6 GiB, on a 24 GiB GPU). Base models kept loaded ("pipelines"): 32 % of the
# RAM on the CPU (SD 1.5 in fp32 is 4.3 GB, SDXL 14 GB in fp32), 42 % of a GPU (SDXL in fp16 is 7 GB); ControlNet
# models 8 % (an SD 1.5 ControlNet is 1.4 GB in fp32, an SDXL one 2.5 GB in fp16); "offload":
# the RAM where pipelines pushed off a GPU wait.
SHARES = {
    "cpu": {"pipelines": 0.32, "controlnets": 0.08, "encoders": 0.3, "adapters": 0.04, "loras": 0.03, "vaes": 0.01,
            "embeddings": 0.005, "inversions": 0.005},
    "cuda": {"pipelines": 0.42, "controlnets": 0.08, "encoders": 0.2, "adapters": 0.04, "loras": 0.03, "vaes": 0.01,
             "embeddings": 0.005, "inversions": 0.005},
    "host": {"offload": 0.3},
}  # fmt: skip
RESERVED = {"cpu": 0.2, "cuda": 0.2, "host": 0.5}  # left by the caches: activations (device), loading (host)
# enough for every adapter, LoRA (dozens of rank-32 SD 1.5 LoRAs are 150 MB each), VAE and reference a server sees
CAPS = {"adapters": 4 * 2**30, "embeddings": 512 * 2**20, "inversions": 512 * 2**20, "loras": 4 * 2**30,
        "vaes": 2 * 2**30}


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


# Families trained in bfloat16 (diffusers' examples run them so): on CUDA "auto" gives them bfloat16 where the GPU has
# it; float16's narrower range overflows in their activations. SD 1.5 / SDXL: float16 (diffusers upcasts SDXL's VAE
# to float32 for its decode, as its configuration's `force_upcast` asks).
BF16_FAMILIES = ("sd3", "flux")


def model_dtype(dtype, device: torch.device, architecture: str, bf16_supported: bool | None = None) -> torch.dtype:
    """A model's dtype: the user's where given; for "auto" on CUDA bfloat16 for SD 3.x / FLUX (`architecture`
    "sd3" / "flux") where the GPU supports it (`bf16_supported`, default: asked of CUDA), else float16; float32 on
    the CPU."""
    if dtype in (None, "auto") and device.type == "cuda" and architecture in BF16_FAMILIES:
        supported = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        return torch.bfloat16 if supported else torch.float16
    return resolve_dtype(dtype, device)


def device_memory(device: torch.device) -> int:
    """Bytes of memory on the device: the GPU's own on CUDA, the machine's RAM on the CPU."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


def free_memory(device: torch.device) -> int:
    """Bytes of the device's memory free now (CUDA's own count); on the CPU, its whole memory (the memory plan does
    not offload there)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return device_memory(device)


def default_budget(cache: str, device: torch.device) -> int:
    """The default byte budget of one of the engine's caches (a key of SHARES) on `device`; "offload" is always a
    share of the RAM, where a GPU's pipelines wait."""
    if cache in SHARES["host"]:
        budget = int(device_memory(torch.device("cpu")) * SHARES["host"][cache])
    else:
        budget = int(device_memory(device) * SHARES["cuda" if device.type == "cuda" else "cpu"][cache])
    return min(budget, CAPS[cache]) if cache in CAPS else budget


def activation_budget(device: torch.device) -> int:
    """The device memory the caches leave for a generation's activations (`RESERVED`): what decides whether a large
    image's VAE decode goes tile by tile (`loading/vaes.py`)."""
    return int(device_memory(device) * RESERVED["cuda" if device.type == "cuda" else "cpu"])


def release_memory(device: torch.device) -> None:
    """After evictions and model switches: collect what was dropped and give freed GPU memory back to the driver,
    so that other processes (and `nvidia-smi`) see it free."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
