"""IP-Adapter modules on a UNet: build them once per file, attach a set of them by swapping processors.

diffusers' `load_ip_adapter` rebuilds every attention processor from the state dict on each call and replaces
all adapters at once. Here diffusers' own converters build each adapter's modules once (its image projection and
one `to_k_ip`/`to_v_ip` pair per cross-attention layer); attaching a set of adapters then only creates light
`IPAdapterAttnProcessor2_0` shells that point at those modules. The UNet never holds more than the request's set,
and switching costs no tensor copies.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from .probe import AdapterSpec


@dataclass
class BuiltAdapter:
    """One adapter file as diffusers modules, ready to attach to any UNet of the layout it was built for."""

    spec: AdapterSpec
    image_projection: torch.nn.Module
    to_k_ip: list[torch.nn.Linear]
    to_v_ip: list[torch.nn.Linear]

    @property
    def nbytes(self) -> int:
        from .cache import module_bytes

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


SHELL_SETS = 8  # adapter sets whose processor shells are kept


class AdapterSlots:
    """The IP-Adapter state of one UNet: which built adapters are attached, in which order, at which scales."""

    def __init__(self, unet):
        self.unet = unet
        layers = [(n, m) for n, m in unet.named_modules() if n.endswith(".attn2") and isinstance(m, Attention)]
        self.names = [name.removesuffix(".attn2") for name, _ in layers]  # processor order, as probe.layer_names
        self.cross_attention: list[Attention] = [module for _, module in layers]
        self.plain_processors = [module.processor for module in self.cross_attention]
        self.attached: tuple = ()
        self._processors: list[IPAdapterAttnProcessor2_0] = []
        # processor shells and projection per adapter set, so switching back to a set is only set_processor calls
        self._shells: OrderedDict[tuple, tuple[list, MultiIPAdapterImageProjection]] = OrderedDict()

    def attach(self, adapters: list[BuiltAdapter], keys: tuple) -> bool:
        """Make the UNet carry exactly `adapters` (in order). `keys` identify them; if they equal what is
        attached already, nothing changes. Returns whether anything was swapped."""
        if keys == self.attached:
            return False
        if not adapters:
            for module, plain in zip(self.cross_attention, self.plain_processors):
                module.set_processor(plain)
            self.unet.encoder_hid_proj = None
            self.unet.config.encoder_hid_dim_type = None
            self._processors = []
        else:
            processors, projection = self._shells_for(adapters, keys)
            for module, processor in zip(self.cross_attention, processors):
                module.set_processor(processor)
            self._processors = processors
            self.unet.encoder_hid_proj = projection
            self.unet.config.encoder_hid_dim_type = "ip_image_proj"
        self.attached = keys
        return True

    def _shells_for(self, adapters: list[BuiltAdapter], keys: tuple):
        """IPAdapterAttnProcessor2_0 shells pointing at the built adapters' modules (no tensor is copied).
        Keys carry the files' fingerprints, so a changed file never reuses an old shell."""
        if keys in self._shells:
            self._shells.move_to_end(keys)
            return self._shells[keys]
        tokens = [a.spec.tokens for a in adapters]
        processors = []
        for j, module in enumerate(self.cross_attention):
            with torch.device("meta"):  # shells only: the weights are the built adapters' own modules
                processor = IPAdapterAttnProcessor2_0(
                    hidden_size=module.inner_dim, cross_attention_dim=module.cross_attention_dim, num_tokens=tokens
                )
            processor.to_k_ip = torch.nn.ModuleList([a.to_k_ip[j] for a in adapters])
            processor.to_v_ip = torch.nn.ModuleList([a.to_v_ip[j] for a in adapters])
            processors.append(processor)
        self._shells[keys] = (processors, MultiIPAdapterImageProjection([a.image_projection for a in adapters]))
        while len(self._shells) > SHELL_SETS:
            self._shells.popitem(last=False)
        return self._shells[keys]

    def forget_shells(self) -> None:
        """Drop the kept shells (they hold references to built adapters; see Engine.clear_cache)."""
        self._shells.clear()

    def set_scales(self, scales: list[float], layer_weights: list[tuple[float, ...]]) -> None:
        """Unit u's scale at cross-attention layer j: scales[u] * layer_weights[u][j] (InstantStyle weights)."""
        for j, processor in enumerate(self._processors):
            processor.scale = [scale * weights[j] for scale, weights in zip(scales, layer_weights)]


def h94_state_dict(adapter: BuiltAdapter, state_of=lambda module: module.state_dict()) -> dict[str, torch.Tensor]:
    """The inverse of `build_adapter` for Base and Plus adapters: the modules' tensors under the flat h94 key
    names (`image_proj.*`, `ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`), for saving trained adapters.
    `state_of(module)` gives a module's tensors (training passes one that keeps low-rank weights as factors)."""
    tensors = {f"image_proj.{k}": v.detach() for k, v in h94_image_proj(state_of(adapter.image_projection)).items()}
    for j, (k, v) in enumerate(zip(adapter.to_k_ip, adapter.to_v_ip)):
        for name, layer in (("to_k_ip", k), ("to_v_ip", v)):
            tensors |= {f"ip_adapter.{2 * j + 1}.{name}.{key}": t.detach() for key, t in state_of(layer).items()}
    return tensors


def h94_image_proj(projection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' image-projection state dict (ImageProjection or IPAdapterPlusImageProjection) under h94's names,
    undoing `_convert_ip_adapter_image_proj_to_diffusers`."""
    if any(k.startswith("image_embeds.") for k in projection):  # ImageProjection: h94's "proj" renamed
        return {k.replace("image_embeds.", "proj.", 1): v for k, v in projection.items()}
    if "latents" not in projection:
        raise ValueError(f"only Base and Plus projections can be saved in the h94 layout, not {sorted(projection)[:4]}")
    renamed = {
        "ln0.weight": "0.norm1.weight", "ln0.bias": "0.norm1.bias", "ln1.weight": "0.norm2.weight",
        "ln1.bias": "0.norm2.bias", "attn.to_q.weight": "0.to_q.weight", "attn.to_out.0.weight": "0.to_out.weight",
        "ff.0.weight": "1.0.weight", "ff.0.bias": "1.0.bias", "ff.1.net.0.proj.weight": "1.1.weight",
        "ff.1.net.2.weight": "1.3.weight",
    }  # fmt: skip
    proj = {}
    for key, value in projection.items():
        parts = key.split(".")
        if parts[0] != "layers":
            proj[key] = value
            continue
        layer, rest = f"layers.{parts[1]}", ".".join(parts[2:])
        if rest == "attn.to_k.weight":  # h94's Resampler has one to_kv; diffusers splits it
            proj[f"{layer}.0.to_kv.weight"] = torch.cat([value, projection[f"{layer}.attn.to_v.weight"]])
        elif rest != "attn.to_v.weight":
            proj[f"{layer}.{renamed[rest]}"] = value
    return proj
