"""IP-Adapter units on a compiled UNet: one processor per cross-attention layer, installed once, fed only tensors.

imprompt beyond diffusers: `torch.compile` guards on what a forward reads besides tensors, so diffusers' way of
attaching IP-Adapters (new `IPAdapterAttnProcessor2_0` objects per adapter set, Python-float scales that a window
sets to 0, `encoder_hid_proj` and the `encoder_hid_dim_type` config swapped, a list of embeddings per unit) makes a
compiled UNet compile again on nearly every switch (docs/research/compile-across-switches.md). Here nothing a
request changes is read as Python state:

    processors      one `SlotProcessor` per cross-attention layer, put there when the model loads, never replaced
    adapters        each unit's image projection runs once per call, outside the UNet, and each layer's to_k_ip /
                    to_v_ip too (the tokens do not change over the steps): the UNet reads per-layer key and value
                    tensors, [slots, rows, tokens, width], not the adapters' modules
    slots           SLOTS at least, more in steps of SLOTS: a unit is a slot (a unit with masks: one slot per
                    image, as diffusers attends to each masked image on its own); an unused slot is one zero token
                    at scale 0; shorter units padded, the padding masked out of the attention
    scales          a [layers, slots, rows] tensor, rewritten in place at each step (windows, InstantStyle layer
                    weights); a slot at 0 adds 0, so no branch depends on a scale
    masks           per layer [slots, rows, queries, 1], downsampled outside with diffusers' own
                    `IPAdapterMaskProcessor.downsample`; 1 where a unit has no mask

Each row reads its own request's slots, so several requests batch into one call (`merged_inputs`) with as many
slots as the request that has most, not their sum. The arithmetic per slot is IPAdapterAttnProcessor2_0's (a scale
times the attention output times the mask, added in unit order), so the images are diffusers' within rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import MultiIPAdapterImageProjection

from .attach import FaceCropProjection, check_layers, cross_attention_layers
from .build import BuiltAdapter, build_adapter
from .text_attention import finished, merge_heads, split_heads, text_attention

SLOTS = 4  # slots every call passes (a request with more units passes the next multiple: one graph more each)


class SlotProcessor:
    """diffusers' AttnProcessor2_0 for the text, then each slot's IP attention as IPAdapterAttnProcessor2_0 does it,
    from the tensors in `ip_hidden_states` (None: a request without image prompts, the text attention only)."""

    def __init__(self, layer: int):
        self.layer = layer  # this processor's index among the cross-attention layers (fixed: never replaced)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, ip_hidden_states: tuple | None = None):  # fmt: skip
        text = text_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        out = text.out
        if ip_hidden_states is not None:
            keys, values, keep, masks, scales = ip_hidden_states
            keys, values, masks = keys[self.layer], values[self.layer], masks[self.layer]
            for slot in range(keys.shape[0]):  # the slot count is the tensors' shape: fixed per graph
                ip_key, ip_value = split_heads(attn, text, keys[slot]), split_heads(attn, text, values[slot])
                ip = F.scaled_dot_product_attention(text.query, ip_key, ip_value, attn_mask=keep[slot], dropout_p=0.0)
                ip = merge_heads(attn, text, ip)
                # a Python scale times a tensor, as diffusers multiplies: in float32, rounded to the tensor's dtype
                out = out + (scales[self.layer, slot] * (ip * masks[slot])).to(out.dtype)
        return finished(attn, text, out)


@dataclass
class RequestSlots:
    """One request's image prompts as slots: per slot the adapter, the projected tokens ([1 or 2 (negative,
    positive)], tokens, width]), its mask image ([1, height, width] or None) and the unit it belongs to."""

    adapters: list[BuiltAdapter] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)  # per unit, now
    weights: list[tuple[float, ...]] = field(default_factory=list)  # per unit, per layer


def request_slots(adapters: list[BuiltAdapter], embeddings: list, masks: list, cfg: bool, crops: list,
                  device, dtype) -> RequestSlots:  # fmt: skip
    """Each unit projected as the UNet's `encoder_hid_proj` projects it (diffusers' MultiIPAdapterImageProjection
    over the unit's projection, the FaceID Plus crop set), once for the whole call."""
    slots = RequestSlots()
    for u, (adapter, embedding, mask) in enumerate(zip(adapters, embeddings, masks)):
        projection = adapter.image_projection
        if adapter.spec.clip_width:  # FaceID Plus: the crop's hidden states beside the face embedding
            projection = FaceCropProjection(projection)
            projection.clip_embeds, projection.shortcut, projection.shortcut_scale = (
                crops[u] if crops and crops[u] is not None else (None, False, 1.0))
        with torch.no_grad():
            tokens = MultiIPAdapterImageProjection([projection])([embedding.for_pipeline(cfg).to(device, dtype)])[0]
        rows, images = tokens.shape[0], tokens.shape[1]
        if mask is None:  # diffusers attends to all images' tokens at once
            slots.adapters.append(adapter)
            slots.tokens.append(tokens.reshape(rows, -1, tokens.shape[-1]))
            slots.masks.append(None)
            slots.units.append(u)
            continue
        for i in range(images):  # with masks: each image on its own, times its mask
            slots.adapters.append(adapter)
            slots.tokens.append(tokens[:, i])
            slots.masks.append(mask[0, i : i + 1])
            slots.units.append(u)
    return slots


class SlotInputs:
    """The tensors one call's UNet reads (`ip_hidden_states`) for its rows: `requests[r]` owns the batch rows where
    `owner` is r (under CFG diffusers' rows are all negatives, then all positives). `layers`: each cross-attention
    layer's (query count, key width)."""

    def __init__(self, requests: list[RequestSlots], owner: list[int], cfg: bool, layers: list[tuple[int, int]],
                 device, dtype):  # fmt: skip
        self.requests = requests
        self.rows = owner * 2 if cfg else list(owner)
        branch = [0] * len(owner) + [1] * len(owner) if cfg else [0] * len(owner)  # negative / positive tokens
        count = SLOTS * math.ceil(max([len(r.adapters) for r in requests] + [1]) / SLOTS)
        width = max([t.shape[1] for r in requests for t in r.tokens] + [1])
        mine = [[b for b, o in enumerate(self.rows) if o == r] for r in range(len(requests))]
        self.keep = torch.zeros(count, len(self.rows), 1, 1, width, dtype=torch.bool, device=device)
        self.keep[:, :, 0, 0, 0] = True  # an unused slot: one zero token (no softmax over nothing), scaled by 0
        for r, request in enumerate(requests):
            for slot, tokens in enumerate(request.tokens):
                self.keep[slot, mine[r], 0, 0, : tokens.shape[1]] = True
        self.keys, self.values, self.masks = [], [], []
        with torch.no_grad():
            for j, (queries, inner) in enumerate(layers):
                key = torch.zeros(count, len(self.rows), width, inner, device=device, dtype=dtype)
                value = torch.zeros_like(key)
                mask = torch.ones(count, len(self.rows), queries, 1, device=device, dtype=dtype)
                for r, request in enumerate(requests):
                    for slot, (adapter, tokens) in enumerate(zip(request.adapters, request.tokens)):
                        k, v = adapter.to_k_ip[j](tokens), adapter.to_v_ip[j](tokens)
                        for b in mine[r]:
                            key[slot, b, : k.shape[1]] = k[branch[b]]
                            value[slot, b, : v.shape[1]] = v[branch[b]]
                    for slot, image in enumerate(request.masks):
                        if image is not None:
                            down = IPAdapterMaskProcessor.downsample(image.to(device), 1, queries, 1)[0]
                            mask[slot, mine[r]] = down.to(dtype)
                self.keys.append(key)
                self.values.append(value)
                self.masks.append(mask)
        self.scales = torch.zeros(len(layers), count, len(self.rows), 1, 1, dtype=torch.float32, device=device)
        self.mine = mine

    def tensors(self) -> tuple:
        return (tuple(self.keys), tuple(self.values), self.keep, tuple(self.masks), self.scales)

    def set_scales(self, request: int, scales: list[float], weights: list[tuple[float, ...]]) -> None:
        """Request `request`'s unit scales now and their per-layer weights (`update` writes them)."""
        self.requests[request].scales, self.requests[request].weights = list(scales), list(weights)

    def update(self) -> None:
        """Each slot's scale now, per layer and row: its unit's scale times the unit's weight at the layer (in double
        precision, as Python floats multiply, rounded to float32), 0 in rows of requests it is not one of; written
        in place, so the tensors the pipeline was given read it at the next step."""
        values = torch.zeros(self.scales.shape[:3], dtype=torch.float64)
        for r, request in enumerate(self.requests):
            for slot, unit in enumerate(request.units):
                if unit < len(request.scales):
                    layer = torch.tensor([request.scales[unit] * w for w in request.weights[unit]], dtype=torch.float64)
                    values[:, slot, self.mine[r]] = layer[:, None]
        self.scales.copy_(values.to(torch.float32)[..., None, None])


class SlotAttachment:
    """The IP-Adapter state of a compiled UNet, with the methods `AttachedAdapters` has (the conditionings and the
    batch call it the same way): attaching records the adapters; the call's tensors are made in `pipeline_kwargs`."""

    compiles_units = True  # nothing a request's units change reaches the compiled graph but tensors

    def __init__(self, unet, vae_scale: int):
        self.unet = unet
        self.vae_scale = vae_scale
        layers = cross_attention_layers(unet)
        self.names = [name.removesuffix(".attn2") for name, _ in layers]
        self.cross_attention = [module for _, module in layers]
        for j, module in enumerate(self.cross_attention):
            module.set_processor(SlotProcessor(j))
        self.levels = [layer_level(name, unet) for name in self.names]
        self.attached: tuple = ()
        self.built: list[BuiltAdapter] = []
        self.crops: list = []
        self.current: SlotInputs | None = None  # the inputs of the call being applied or run

    def attach(self, adapters: list[BuiltAdapter], keys: tuple) -> bool:
        changed = keys != self.attached
        self.built, self.attached = list(adapters), keys
        return changed

    def build(self, spec, state_dict: dict) -> BuiltAdapter:
        return build_adapter(spec, state_dict, self.unet)

    def set_face_crops(self, crops: list) -> None:
        self.crops = list(crops)

    def end_call(self) -> None:
        """A request's call ended: its crops and tensors go (a batch's requests keep theirs in `RequestUnits`)."""
        self.crops, self.current = [], None

    def layers(self, width: int, height: int) -> list[tuple[int, int]]:
        """Each cross-attention layer's (query count at this image size, key width): a stride-2 convolution halves
        a side, rounding up, per level."""
        sides = [(math.ceil(height / self.vae_scale), math.ceil(width / self.vae_scale))]
        for _ in range(max(self.levels)):
            h, w = sides[-1]
            sides.append((math.ceil(h / 2), math.ceil(w / 2)))
        return [(sides[level][0] * sides[level][1], module.inner_dim)
                for level, module in zip(self.levels, self.cross_attention)]  # fmt: skip

    def request(self, embeddings: list, masks: list, cfg_scale: float) -> RequestSlots:
        return request_slots(self.built, embeddings, masks, cfg_scale > 1.0, self.crops, self.unet.device,
                             self.unet.dtype)  # fmt: skip

    def pipeline_kwargs(self, embeddings: list, masks: list, cfg_scale: float, width: int, height: int,
                        rows: int = 1) -> dict:  # fmt: skip
        if not embeddings:
            self.current = None
            return {}
        slots = self.request(embeddings, masks, cfg_scale)
        self.current = SlotInputs([slots], [0] * rows, cfg_scale > 1.0, self.layers(width, height),
                                  self.unet.device, self.unet.dtype)  # fmt: skip
        return {"cross_attention_kwargs": {"ip_hidden_states": self.current.tensors()}}

    def set_scales(self, scales: list[float], layer_weights: list[tuple[float, ...]]) -> None:
        if self.current is not None:
            self.current.set_scales(0, scales, layer_weights)
            self.current.update()

    def alone(self, units) -> Callable[[], None]:
        """A batch's request run alone (`batching.run_alone`): its call's kwargs carry its own tensors, and its
        scales go to them (`units.inputs`); nothing on the UNet changes."""
        return lambda: None

    def merged(self, units: list, owner: list[int], cfg: bool, kwargs: list[dict], width: int, height: int):
        """Several requests' units as one call's tensors, each row reading its own request's slots: the kwargs,
        the per-step scale update, and the undo (none: nothing on the UNet changed)."""
        slots = [u.slots if u.slots is not None else RequestSlots() for u in units]  # None: a request without units
        if not any(s.adapters for s in slots):
            return {}, lambda: None, lambda: None
        inputs = SlotInputs(slots, owner, cfg, self.layers(width, height), self.unet.device,
                            self.unet.dtype)  # fmt: skip

        def update() -> None:
            for r, u in enumerate(units):
                inputs.set_scales(r, u.scales, u.weights)
            inputs.update()

        update()
        return {"cross_attention_kwargs": {"ip_hidden_states": inputs.tensors()}}, update, lambda: None

    def forget_shells(self) -> None:
        self.forget(self.attached)

    def forget(self, keys) -> None:
        """Adapters evicted from the engine's cache: no reference to them is kept here."""
        if set(keys) & set(self.attached):
            self.built, self.attached, self.current = [], (), None


def slot_rows(tensors: tuple, picks: list[int]) -> tuple:
    """`SlotInputs.tensors()` for other rows: row i of the result is the given tensors' row `picks[i]` (a prompt's
    AND parts and its negative run as rows of their own, `prompting.conds.ConditionedUNet`). Read at each call, so
    the scales are the step's."""
    keys, values, keep, masks, scales = tensors
    index = torch.tensor(picks, device=keep.device)
    return (tuple(k.index_select(1, index) for k in keys), tuple(v.index_select(1, index) for v in values),
            keep.index_select(1, index), tuple(m.index_select(1, index) for m in masks), scales.index_select(2, index))


def layer_level(name: str, unet) -> int:
    """The resolution level of a cross-attention layer from its name (`down_blocks.1...` is level 1; the mid block
    the deepest; `up_blocks.k` the mirror of the down block k)."""
    depth = len(unet.config.down_block_types) - 1
    if name.startswith("down_blocks."):
        return int(name.split(".")[1])
    if name.startswith("up_blocks."):
        return depth - int(name.split(".")[1])
    return depth


def compiled_attachment(pipeline, spec) -> SlotAttachment:
    """A compiled UNet's attachment (layers checked against the weights file, as `attach.attachment` does)."""
    attached = SlotAttachment(pipeline.unet, pipeline.vae_scale_factor)
    check_layers(attached.names, spec)
    return attached
