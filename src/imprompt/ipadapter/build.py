"""An IP-Adapter file -> its modules (image projection, to_k_ip/to_v_ip per layer), built once.

Built once per file and kept in the engine's adapter cache; `attach.py` puts a set of them on a UNet. diffusers'
`load_ip_adapter` rebuilds every attention processor from the state dict on each call and replaces all adapters
at once; imprompt builds each adapter once, with diffusers' own image-projection converter, and switching sets
later costs no tensor copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..loading.tensors import read_tensors
from ..models.probe import xlabs_names
from ..models.specs import AdapterSpec
from ..util.cache import module_bytes


@dataclass
class BuiltAdapter:
    """One adapter file as diffusers modules, ready to attach to any UNet of the layout it was built for."""

    spec: AdapterSpec
    image_projection: torch.nn.Module
    to_k_ip: list[torch.nn.Linear]
    to_v_ip: list[torch.nn.Linear]

    @property
    def nbytes(self) -> int:
        layers = torch.nn.ModuleList(self.to_k_ip + self.to_v_ip)
        return module_bytes(self.image_projection) + module_bytes(layers)


def build_adapter(spec: AdapterSpec, state_dict: dict, unet) -> BuiltAdapter:
    """The image projection comes from diffusers' converter (the code `load_ip_adapter` runs); the per-layer
    `to_k_ip`/`to_v_ip` are plain bias-free Linear layers, the h94 keys 1, 3, 5, ... in UNet processor order.
    They are built straight from the tensors because diffusers' attention converter numbers layers by walking the
    UNet's live processors, which an attached Plus adapter's Resampler would shift. The UNet is not modified."""
    device, dtype = unet.device, unet.dtype
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(state_dict["image_proj"], low_cpu_mem_usage=True)
    attn = state_dict["ip_adapter"]
    key_ids = sorted(int(k.split(".")[0]) for k in attn if k.endswith(".to_k_ip.weight"))

    def linear(weight: torch.Tensor) -> torch.nn.Linear:
        with torch.device("meta"):
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        layer.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        return layer

    return BuiltAdapter(
        spec=spec,
        image_projection=projection.to(device=device, dtype=dtype).eval().requires_grad_(False),
        to_k_ip=[linear(attn[f"{i}.to_k_ip.weight"]) for i in key_ids],
        to_v_ip=[linear(attn[f"{i}.to_v_ip.weight"]) for i in key_ids],
    )


def load_adapter_state_dict(spec: AdapterSpec) -> dict[str, dict[str, torch.Tensor]]:
    """h94 format, either flat safetensors or a nested pickle -> {"image_proj": {...}, "ip_adapter": {...}}; XLabs'
    FLUX names are renamed to those first, as diffusers' FLUX loader does."""
    state = {"image_proj": {}, "ip_adapter": {}}
    for key, tensor in xlabs_names(read_tensors(Path(spec.path))).items():
        group, _, name = key.partition(".")
        if group in state:
            state[group][name] = tensor
    return state
