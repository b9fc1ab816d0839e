"""SD 3.5 and FLUX image prompts: an adapter file -> its modules, and a set of them on a diffusion transformer.

The same two steps as `build.py` + `attach.py` for UNets, with diffusers' own modules: built once per file and
kept in the engine's adapter cache; attaching only points the transformer's processors at them. What imprompt
adds to diffusers here: several FLUX adapters attached and detached without reloading any of them (diffusers'
`load_ip_adapter` rebuilds all at every call), FLUX token counts read from the tensors (diffusers assumes 4
unless the projection has 65536 rows, which only full-width v2 files have), and per-step scales (start / end).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection
from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

from ..errors import IncompatibleError
from ..models.specs import AdapterSpec
from ..util.cache import module_bytes
from .shells import KeptShells

SHELL_SETS = 8  # FLUX adapter sets whose processor shells are kept


@dataclass
class BuiltTransformerAdapter:
    """One SD 3.5 or FLUX adapter file as diffusers modules, for transformers of the layout it was built for.
    SD3: the image projection and one `SD3IPAdapterJointAttnProcessor2_0` per joint block (processor and weights
    are one module in diffusers). FLUX: the image projection and to_k_ip / to_v_ip per double-stream block."""

    spec: AdapterSpec
    image_projection: torch.nn.Module
    to_k_ip: list[torch.nn.Linear]
    to_v_ip: list[torch.nn.Linear]
    block_processors: list | None = None  # SD3

    @property
    def nbytes(self) -> int:
        layers = torch.nn.ModuleList(self.to_k_ip + self.to_v_ip + list(self.block_processors or []))
        return module_bytes(self.image_projection) + module_bytes(layers)


def build_transformer_adapter(spec: AdapterSpec, state_dict: dict, transformer) -> BuiltTransformerAdapter:
    """SD3: diffusers' converters (the code `SD3IPAdapterMixin.load_ip_adapter` runs), which return modules and
    leave the transformer as it is. FLUX: diffusers' `ImageProjection` with the token count the probe read, and
    to_k_ip / to_v_ip as plain Linear layers with bias, the XLabs blocks in order. The transformer is not modified."""
    device, dtype = transformer.device, transformer.dtype
    if spec.architecture == "sd3":
        # diffusers numbers the joint blocks by the transformer's live attention processors, which an attached
        # adapter's image projection (it holds Attention modules) adds to: build with none attached
        attached, transformer.image_proj = getattr(transformer, "image_proj", None), None
        try:
            processors = transformer._convert_ip_adapter_attn_to_diffusers(state_dict["ip_adapter"], low_cpu_mem_usage=False)
            projection = transformer._convert_ip_adapter_image_proj_to_diffusers(state_dict["image_proj"],
                                                                                 low_cpu_mem_usage=False)  # fmt: skip
        finally:
            transformer.image_proj = attached
        blocks = [p.to(device=device, dtype=dtype).eval().requires_grad_(False) for p in processors.values()]
        return BuiltTransformerAdapter(spec, projection.to(device=device, dtype=dtype).eval().requires_grad_(False),
                                       [], [], blocks)  # fmt: skip
    projection = ImageProjection(cross_attention_dim=spec.cross_attention_dim, image_embed_dim=spec.embed_dim,
                                 num_image_text_embeds=spec.tokens)  # fmt: skip
    projection.load_state_dict({k.replace("proj", "image_embeds"): v for k, v in state_dict["image_proj"].items()})
    attn = state_dict["ip_adapter"]

    def linear(name: str) -> torch.nn.Linear:
        weight, bias = attn[f"{name}.weight"], attn[f"{name}.bias"]
        with torch.device("meta"):
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
        layer.bias = torch.nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        return layer

    blocks = range(len(spec.layer_widths))
    return BuiltTransformerAdapter(
        spec=spec,
        image_projection=projection.to(device=device, dtype=dtype).eval().requires_grad_(False),
        to_k_ip=[linear(f"{b}.to_k_ip") for b in blocks],
        to_v_ip=[linear(f"{b}.to_v_ip") for b in blocks],
    )


class AttachedTransformerAdapters(KeptShells):
    """The IP-Adapter state of one SD 3.5 or FLUX transformer: which built adapters it carries, at which scales.
    Same interface as `attach.AttachedAdapters`, so the engine treats both alike."""

    compiles_units = False  # its processors hold Python state: a compiled transformer runs units eager
    current = None

    def __init__(self, transformer, architecture: str):
        self.transformer, self.architecture = transformer, architecture
        self.plain_processors = dict(transformer.attn_processors)
        # the blocks adapters attach to: every joint block (SD3), the double-stream blocks (FLUX)
        prefix = "transformer_blocks."
        self.names = [n for n in self.plain_processors if n.startswith(prefix)]
        self.attached: tuple = ()
        self._processors: list = []
        self._shells: OrderedDict[tuple, tuple[list, MultiIPAdapterImageProjection]] = OrderedDict()

    def attach(self, adapters: list[BuiltTransformerAdapter], keys: tuple) -> bool:
        if keys == self.attached:
            return False
        # projections off first: SD3's holds Attention modules, which diffusers would count as processors
        if self.architecture == "sd3":
            self.transformer.image_proj = None
        else:
            self.transformer.encoder_hid_proj = None
            self.transformer.config.encoder_hid_dim_type = None
        processors, projection = dict(self.plain_processors), None
        if not adapters:
            self._processors = []
        elif self.architecture == "sd3":  # one adapter (the plan refuses more): its own processors
            (adapter,) = adapters
            self._processors, projection = adapter.block_processors, adapter.image_projection
        else:
            self._processors, projection = self._shells_for(adapters, keys)
        processors.update(zip(self.names, self._processors))
        self.transformer.set_attn_processor(processors)
        if projection is not None and self.architecture == "sd3":
            self.transformer.image_proj = projection
        elif projection is not None:
            self.transformer.encoder_hid_proj = projection
            self.transformer.config.encoder_hid_dim_type = "ip_image_proj"
        self.attached = keys
        return True

    def _shells_for(self, adapters: list[BuiltTransformerAdapter], keys: tuple):
        """FluxIPAdapterAttnProcessor shells pointing at the built adapters' layers (no tensor is copied)."""
        if keys in self._shells:
            self._shells.move_to_end(keys)
            return self._shells[keys]
        config = self.transformer.config
        processors = []
        for block in range(len(self.names)):
            with torch.device("meta"):
                processor = FluxIPAdapterAttnProcessor(
                    hidden_size=config.num_attention_heads * config.attention_head_dim,
                    cross_attention_dim=config.joint_attention_dim,
                    num_tokens=[a.spec.tokens for a in adapters],
                )
            processor.to_k_ip = torch.nn.ModuleList([a.to_k_ip[block] for a in adapters])
            processor.to_v_ip = torch.nn.ModuleList([a.to_v_ip[block] for a in adapters])
            processors.append(processor)
        self._shells[keys] = (processors, MultiIPAdapterImageProjection([a.image_projection for a in adapters]))
        while len(self._shells) > SHELL_SETS:
            self._shells.popitem(last=False)
        return self._shells[keys]

    def build(self, spec: AdapterSpec, state_dict: dict) -> BuiltTransformerAdapter:
        """An adapter file's modules for this transformer's layout (the transformer is not modified)."""
        return build_transformer_adapter(spec, state_dict, self.transformer)

    def pipeline_kwargs(self, embeddings: list, masks: list, cfg_scale: float, width: int, height: int) -> dict:
        """What diffusers' SD3 and FLUX pipelines take. SD3: one tensor, cat([negative, positive]) under CFG (its
        pipeline splits it), of one image. FLUX: a list per adapter, and its negative images' embeddings apart
        (read under true CFG only). Neither takes masks (the plan refuses them)."""
        if not embeddings:
            return {}
        device, dtype = self.transformer.device, self.transformer.dtype
        if self.architecture == "flux":
            return {"ip_adapter_image_embeds": [e.positive.unsqueeze(0).to(device, dtype) for e in embeddings],
                    "negative_ip_adapter_image_embeds": [e.negative.unsqueeze(0).to(device, dtype)
                                                         for e in embeddings]}  # fmt: skip
        (e,) = embeddings
        if e.positive.shape[0] != 1:  # the plan refuses more; embeddings made elsewhere (a cluster) too
            raise IncompatibleError(f"ip_adapters.0: embeddings of {e.positive.shape[0]} images, but an SD 3.5 "
                                    f"IP-Adapter reads one; average them")  # fmt: skip
        return {"ip_adapter_image_embeds": e.for_pipeline(cfg_scale > 1.0)[:, 0].to(device, dtype)}

    def end_call(self) -> None:
        """A request's call ended: nothing was set for it alone here."""

    def set_face_crops(self, crops: list) -> None:
        """No FaceID adapter exists for these families (the plan refuses the pairing)."""

    def set_scales(self, scales: list[float], layer_weights: list[tuple[float, ...]]) -> None:
        """Unit u's scale at block j: scales[u] * layer_weights[u][j]. SD3's processor takes one number, FLUX's a
        list per attached adapter."""
        for j, processor in enumerate(self._processors):
            per_unit = [scale * weights[j] for scale, weights in zip(scales, layer_weights)]
            if isinstance(processor, SD3IPAdapterJointAttnProcessor2_0):
                processor.scale = per_unit[0]
            else:
                processor.scale = per_unit
