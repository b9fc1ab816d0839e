"""`python -m tools.activation_memory`: the activation memory of one SDXL step and VAE decode, counted, not run.

The numbers behind the share of a device that `util/devices.py` leaves for activations. SDXL's UNet and VAE are
built from imprompt's own SDXL configs on PyTorch's `meta` device (shapes only: no weights, no compute, no GPU),
and a dispatch mode adds up the bytes of every tensor alive during the call: the peak is the activations' (weights
not counted). Attention counts as PyTorch's fused kernels hold it (flash / memory-efficient: the output only, no
tokens x tokens matrix). The allocator adds its own slack on top: a real float32 decode at 512 px on the CPU grew
the process by 0.94 GiB where this counts 0.75 GiB.
"""

from __future__ import annotations

import argparse
import json
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

CONFIGS = Path(__file__).resolve().parent.parent / "src" / "imprompt" / "models" / "configs" / "sdxl"
GiB = 2**30


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensors every op made that are still alive, and their peak (each storage counted once)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int, nbytes: int) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage._cdata in self.live:  # a view, or an in-place op's result
                continue
            self.live[storage._cdata] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(tensor, self._freed, storage._cdata, storage.nbytes())
        return out


def fused_attention(query, key, value, *args, **kwargs):
    """What a fused attention kernel keeps: its output, [..., tokens, value width]."""
    return query.new_empty(query.shape[:-1] + value.shape[-1:])


def unet_step(size: int, batch: int, dtype: torch.dtype) -> tuple[float, float]:
    """(weights GiB, activation peak GiB) of one SDXL UNet call with classifier-free guidance (2 x batch)."""
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIGS / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).to(dtype)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    rows = 2 * batch
    meta = {"device": "meta", "dtype": dtype}
    latents = torch.empty(rows, config["in_channels"], size // 8, size // 8, **meta)
    text = torch.empty(rows, 77, config["cross_attention_dim"], **meta)
    added = {"text_embeds": torch.empty(rows, 1280, **meta), "time_ids": torch.empty(rows, 6, **meta)}
    with torch.no_grad(), LiveBytes() as live:
        unet(latents, torch.tensor(10, device="meta"), text, added_cond_kwargs=added)
    return weights / GiB, live.peak / GiB


def vae_decode(size: int, batch: int, dtype: torch.dtype) -> float:
    """Activation peak GiB of SDXL's VAE decoding `batch` images of size x size at once (no slicing, no tiling)."""
    from diffusers import AutoencoderKL

    config = json.loads((CONFIGS / "vae" / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config).to(dtype)
    latents = torch.empty(batch, config["latent_channels"], size // 8, size // 8, device="meta", dtype=dtype)
    with torch.no_grad(), LiveBytes() as live:
        vae.decode(latents)
    return live.peak / GiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.activation_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    original, F.scaled_dot_product_attention = F.scaled_dot_product_attention, fused_attention
    try:
        print("| size | SDXL UNet step fp16 (weights) | VAE decode fp32 | VAE decode fp16 |")
        print("|---|---|---|---|")
        for size in args.sizes:
            weights, step = unet_step(size, args.batch, torch.float16)
            decode32, decode16 = (vae_decode(size, args.batch, dtype) for dtype in (torch.float32, torch.float16))
            print(f"| {size} px x {args.batch} | {step:.2f} GiB ({weights:.2f} GiB) | {decode32:.2f} GiB "
                  f"| {decode16:.2f} GiB |")  # fmt: skip
    finally:
        F.scaled_dot_product_attention = original
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
