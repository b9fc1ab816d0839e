"""A set of built adapters on a UNet (processor shells, per-step scales, masks), and each family's attachment.

`attachment` gives a loaded pipeline its attachment: this one for UNets, `dit.py`'s for SD 3.5 and FLUX
transformers.

Attaching only creates light `IPAdapterAttnProcessor2_0` shells that point at the built adapters' modules (no
tensor is copied), so the UNet carries exactly the request's adapters, in the request's order, and switching costs
a few `set_processor` calls. diffusers' processors then do the attention, masks included.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from ..errors import CheckpointError
from .build import BuiltAdapter, build_adapter
from .dit import AttachedTransformerAdapters
from .shells import KeptShells

SHELL_SETS = 8  # adapter sets whose processor shells are kept


class FaceCropProjection(torch.nn.Module):
    """One unit's view of a FaceID Plus projection. diffusers keeps the face crop's hidden states (`clip_embeds`)
    and the v2 shortcut on the projection module itself, so one file could serve one face per call; imprompt gives
    each unit its own wrapper holding its crop, so the same Plus file serves two units with two faces in one
    request. The weights stay the built adapter's; diffusers' module does all the computing."""

    def __init__(self, projection: torch.nn.Module):
        super().__init__()
        self.projection = projection
        self.clip_embeds: torch.Tensor | None = None
        self.shortcut, self.shortcut_scale = False, 1.0

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        inner = self.projection
        inner.clip_embeds, inner.shortcut, inner.shortcut_scale = self.clip_embeds, self.shortcut, self.shortcut_scale
        try:
            return inner(id_embeds)
        finally:
            inner.clip_embeds = None


class AttachedAdapters(KeptShells):
    """The IP-Adapter state of one UNet: which built adapters are attached, in which order, at which scales."""

    compiles_units = False  # its processors hold Python state (`slots.SlotAttachment` is a compiled UNet's)
    current = None  # a compiled UNet's attachment keeps the call's tensors here; this one has none

    def __init__(self, unet):
        self.unet = unet
        layers = cross_attention_layers(unet)
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
        self._shells[keys] = self._new_shells(adapters)
        while len(self._shells) > SHELL_SETS:
            self._shells.popitem(last=False)
        return self._shells[keys]

    def _new_shells(self, adapters: list[BuiltAdapter]) -> tuple[list, MultiIPAdapterImageProjection]:
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
        projections = [FaceCropProjection(a.image_projection) if a.spec.clip_width else a.image_projection
                       for a in adapters]  # fmt: skip
        return processors, MultiIPAdapterImageProjection(projections)

    def shells(self, adapters: list[BuiltAdapter], keys: tuple) -> tuple[list, MultiIPAdapterImageProjection]:
        """The shells of a set, for `swapped`: the kept ones (their order among the kept left as it is), or new ones
        that are not kept (a batch runs a request alone without changing what the next request finds)."""
        return self._shells[keys] if keys in self._shells else self._new_shells(adapters)

    def per_row_shells(self, adapters: list[BuiltAdapter], scales: RowScales):
        """Shells for a batch's slots (every unit of every request in it, in order), each slot scaled per batch row
        by `scales`; made for the batch and not kept."""
        processors, projection = self._new_shells(adapters)
        for j, processor in enumerate(processors):
            processor.scale = [scales.at(slot, j) for slot in range(len(adapters))]
        return processors, projection

    def swapped(self, processors: list | None, projection) -> Callable[[], None]:
        """Put these processors (None: the plain ones) and projection on the UNet for one call, leaving what is
        attached and kept as it is; returns the undo that puts back what was on it."""
        unet = self.unet
        before = ([m.processor for m in self.cross_attention], unet.encoder_hid_proj,
                  unet.config.encoder_hid_dim_type, self._processors)  # fmt: skip
        for module, processor in zip(self.cross_attention, processors or self.plain_processors):
            module.set_processor(processor)
        unet.encoder_hid_proj = projection
        unet.config.encoder_hid_dim_type = "ip_image_proj" if processors else None
        self._processors = processors or []

        def undo() -> None:
            for module, processor in zip(self.cross_attention, before[0]):
                module.set_processor(processor)
            unet.encoder_hid_proj, unet.config.encoder_hid_dim_type, self._processors = before[1:]

        return undo

    def alone(self, units: RequestUnits) -> Callable[[], None]:
        """A batch's request run alone (`batching.run_alone`): its own adapter set's shells swapped in for the call
        (what is attached and kept stays as the requests left it); returns the undo."""
        return self.swapped(*self.shells(units.built, units.keys)) if units.built else self.swapped(None, None)

    def merged(self, units: list[RequestUnits], owner: list[int], cfg: bool, kwargs: list[dict], width: int,
               height: int):  # fmt: skip
        """Several requests' units as one call (`batching.run_merged`): every unit of every request is a slot of one
        processor set, scaled per row by `RowScales`, each unit's embeddings as alone (diffusers repeats them for
        every row; the other rows scale them by 0). Returns the call's kwargs, the per-step scale update and the
        undo."""
        built = [adapter for u in units for adapter in u.built]
        if not built:
            return {}, lambda: None, self.swapped(None, None)
        scales = RowScales([r for r, u in enumerate(units) for _ in u.built], owner, cfg)
        call = {"ip_adapter_image_embeds": [e for k in kwargs for e in k.get("ip_adapter_image_embeds", [])]}
        masks = [m for u, k in zip(units, kwargs)
                 for m in k.get("cross_attention_kwargs", {}).get("ip_adapter_masks", [None] * len(u.built))]  # fmt: skip
        if any(m is not None for m in masks):
            call["cross_attention_kwargs"] = {"ip_adapter_masks": masks}

        def update() -> None:
            scales.update([s for u in units for s in u.scales], [w for u in units for w in u.weights])

        update()
        return call, update, self.swapped(*self.per_row_shells(built, scales))

    def build(self, spec, state_dict: dict) -> BuiltAdapter:
        """An adapter file's modules for this UNet's layout (the UNet is not modified)."""
        return build_adapter(spec, state_dict, self.unet)

    def pipeline_kwargs(self, embeddings: list, masks: list, cfg_scale: float, width: int, height: int) -> dict:
        """What diffusers' UNet pipelines take: one `ip_adapter_image_embeds` element per unit, cat([negative,
        positive]) under classifier-free guidance (diffusers applies it above 1), and the units' masks. (The size,
        which a compiled UNet's attachment needs, diffusers reads from the masks.)"""
        if not embeddings:
            return {}
        device, dtype = self.unet.device, self.unet.dtype
        kwargs = {"ip_adapter_image_embeds": [e.for_pipeline(cfg_scale > 1.0).to(device=device, dtype=dtype)
                                              for e in embeddings]}  # fmt: skip
        if any(m is not None for m in masks):
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
        return kwargs

    def end_call(self) -> None:
        """A request's call ended: what it set for the call only (the face crops) goes."""
        self.set_face_crops([])

    def set_face_crops(self, crops: list[tuple]) -> None:
        """FaceID Plus units: (hidden states of the face crops as the pipeline batches them, v2 shortcut on?,
        shortcut scale) per attached unit, None for other units; `[]` clears them after a request."""
        projection = self.unet.encoder_hid_proj
        layers = projection.image_projection_layers if isinstance(projection, MultiIPAdapterImageProjection) else []
        for i, layer in enumerate(layers):
            if isinstance(layer, FaceCropProjection):
                clip, shortcut, scale = crops[i] if crops else (None, False, 1.0)
                layer.clip_embeds, layer.shortcut, layer.shortcut_scale = clip, shortcut, scale

    def set_scales(self, scales: list[float], layer_weights: list[tuple[float, ...]]) -> None:
        """Unit u's scale at cross-attention layer j: scales[u] * layer_weights[u][j] (InstantStyle weights)."""
        for j, processor in enumerate(self._processors):
            processor.scale = [scale * weights[j] for scale, weights in zip(scales, layer_weights)]


class RequestUnits:
    """One request's units in a batch (`batching.py`): its image prompts attach through this as they would alone,
    so the model's attached set and kept shells follow the same history as alone; it records what they attached and
    each step's scales, which the batch's `RowScales` reads while the request runs merged with others (`merged`).
    Run alone, its scales go to the attachment as usual."""

    def __init__(self, attached):
        self.attached = attached  # AttachedAdapters, or a compiled UNet's `slots.SlotAttachment`
        self.built: list[BuiltAdapter] = []
        self.keys: tuple = ()
        self.scales: list[float] = []  # per unit, now: its scale, or 0 outside its window
        self.weights: list[tuple[float, ...]] = []  # per unit, one per cross-attention layer
        self.merged = False
        self.inputs = None  # on a compiled UNet: the tensors its call reads alone (`slots.SlotInputs`)
        self.slots = None  # on a compiled UNet: its units as slots (`slots.RequestSlots`), which a merged call reads

    def attach(self, adapters: list[BuiltAdapter], keys: tuple) -> bool:
        self.built, self.keys = list(adapters), keys
        return self.attached.attach(adapters, keys)

    def pipeline_kwargs(self, embeddings: list, masks: list, cfg_scale: float, width: int, height: int) -> dict:
        kwargs = self.attached.pipeline_kwargs(embeddings, masks, cfg_scale, width, height)
        self.inputs = self.attached.current
        self.slots = self.inputs.requests[0] if self.inputs is not None else None
        return kwargs

    def set_face_crops(self, crops: list[tuple]) -> None:
        self.attached.set_face_crops(crops)

    def end_call(self) -> None:
        self.attached.end_call()

    def set_scales(self, scales: list[float], layer_weights: list[tuple[float, ...]]) -> None:
        self.scales, self.weights = list(scales), list(layer_weights)
        if self.merged:
            return
        if self.inputs is not None:  # its own tensors, whichever request applied last
            self.inputs.set_scales(0, scales, layer_weights)
            self.inputs.update()
        else:
            self.attached.set_scales(scales, layer_weights)


class RowScales:
    """imprompt beyond diffusers: an IP-Adapter scale per batch row, so that several requests, each with its own
    units, share one UNet call. Each unit of the batch is a slot of one processor set; at each layer a slot's scale
    is its unit's scale times its layer weight in its own request's rows and 0 in the other rows. diffusers'
    IPAdapterAttnProcessor2_0 does the arithmetic, reading each slot's scale as a `RowScale`."""

    def __init__(self, slot_owner: list[int], row_owner: list[int], cfg: bool):
        """`slot_owner`: the request of each slot; `row_owner`: the request of each batch row."""
        self.slot_owner, self.row_owner, self.cfg = slot_owner, row_owner, cfg
        self.values: torch.Tensor | None = None  # [slots, layers, rows, 1, 1] float32; under CFG the rows twice
        self.zero: list[list[bool]] = []  # (diffusers' negative rows, then positive); a slot is 0 at a layer in all
        self._on: dict = {}  # the values on each device the UNet computes on (moved once a step)

    def update(self, scales: list[float], weights: list[tuple[float, ...]]) -> None:
        """Each slot's scale now and its per-layer weights. The products are taken in double precision, as alone
        (Python floats), and rounded to float32 as a number multiplying a float32 tensor is."""
        product = torch.tensor(scales, dtype=torch.float64)[:, None] * torch.tensor(weights, dtype=torch.float64)
        owned = torch.tensor(self.slot_owner)[:, None] == torch.tensor(self.row_owner)[None, :]
        values = (product[:, :, None] * owned[:, None, :].to(torch.float64)).to(torch.float32)
        if self.cfg:
            values = torch.cat([values, values], dim=2)
        self.values, self._on = values[..., None, None], {}
        self.zero = (product == 0).tolist()

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = self.values.to(device)
        return self._on[device]

    def at(self, slot: int, layer: int) -> RowScale:
        return RowScale(self, slot, layer)


class RowScale:
    """A slot's scale at one layer, as diffusers' IPAdapterAttnProcessor2_0 uses a scale: `scale == 0` (the unit is
    skipped: here when it is 0 in every row) and `scale * tensor` (each row times its own scale, in float32 and
    rounded to the tensor's dtype, as a Python number multiplies a tensor), so a row's arithmetic is alone's."""

    __slots__ = ("table", "slot", "layer")

    def __init__(self, table: RowScales, slot: int, layer: int):
        self.table, self.slot, self.layer = table, slot, layer

    def __eq__(self, other):
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self.table.zero[self.slot][self.layer]
        return NotImplemented

    __hash__ = None

    def __mul__(self, tensor):
        if not isinstance(tensor, torch.Tensor):
            return NotImplemented
        return (self.table.on(tensor.device)[self.slot, self.layer] * tensor).to(tensor.dtype)

    __rmul__ = __mul__


def ip_adapter_masks(masks: list | None, width: int, height: int):
    """A unit's masks as diffusers' IPAdapterMaskProcessor makes them: [1, masks, height, width], binarised."""
    if masks is None:
        return None
    from diffusers.image_processor import IPAdapterMaskProcessor

    tensor = IPAdapterMaskProcessor().preprocess(masks, height=height, width=width)
    return tensor.reshape(1, tensor.shape[0], tensor.shape[2], tensor.shape[3])


def cross_attention_layers(unet) -> list[tuple[str, Attention]]:
    """The UNet's cross-attention layers (name, module), in processor order, as `probe.layer_names` lists them."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith(".attn2") and isinstance(m, Attention)]


def check_layers(names: list[str], spec) -> None:
    """A UNet whose layers are not those its weights file lists is refused."""
    if tuple(names) != tuple(spec.layer_names):
        raise CheckpointError(
            spec.path,
            f"the loaded UNet's cross-attention layers {names[:2]}... differ from its weights file's "
            f"{spec.layer_names[:2]}...; the pipeline folder is inconsistent",
        )


def attachment(pipeline, spec):
    """The IP-Adapter attachment of a pipeline just loaded, for its family: a UNet's cross-attention layers, or an
    SD 3.5 / FLUX transformer's blocks (a compiled UNet's: `slots.compiled_attachment`)."""
    if spec.architecture != "unet":
        return AttachedTransformerAdapters(pipeline.transformer, spec.architecture)
    attached = AttachedAdapters(pipeline.unet)
    check_layers(attached.names, spec)
    return attached
