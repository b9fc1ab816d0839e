"""Per-block weights (InstantStyle): presets, strict checks, one weight per cross-attention layer.

The dictionary form is diffusers' `set_ip_adapter_scale` form: `{"down": {"block_2": [0.0, 1.0]}, "mid": 0.5,
"up": {"block_0": [0.0, 1.0, 0.0]}}`, a number for a whole level or block, or a list with one weight per
attention block of a block. Layers not named get 0. Unlike diffusers, a block that does not exist (or has no
attention) is an error, not a silent zero. Weights multiply the unit's `scale`, and each lies in the range of a
scale (`SCALE_RANGE`): a NaN or a 1e300 would give a black image and a bare NaN in the answer's JSON.
"""

from __future__ import annotations

import copy
import re

from ..errors import RequestError, shown
from ..models.specs import PipelineSpec
from ..request import SCALE_RANGE

# InstantStyle (Wang et al. 2024) for SDXL: up_blocks.0.attentions.1 carries style, down_blocks.2.attentions.1
# carries layout. For SD 1.5, the blocks ComfyUI_IPAdapter_plus uses for "style transfer" and "composition".
PRESETS = {
    "SDXL": {
        "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
        "composition": {"down": {"block_2": [0.0, 1.0]}},
    },
    "SD 1.5": {
        "style": {"down": {"block_0": 1.0, "block_1": 1.0}, "mid": 1.0, "up": {"block_2": 1.0, "block_3": 1.0}},
        "composition": {"down": {"block_2": [0.25, 1.0]}},
    },
}
_LAYER = re.compile(r"^(down|up)_blocks\.(\d+)\.attentions\.(\d+)\.|^mid_block\.attentions\.(\d+)\.")


def preset(name: str, family: str) -> dict:
    """"style", "composition" or "style+composition" for the model's family."""
    presets = PRESETS.get(family)
    if presets is None:
        raise RequestError(f"layers preset {shown(name)}: no presets for {family} models; give per-block weights instead")
    parts = [p.strip() for p in name.lower().split("+")]
    unknown = [p for p in parts if p not in presets]
    if unknown or not parts:
        raise RequestError(f"unknown layers preset {shown(name)}; use one of style, composition, style+composition")
    merged: dict = {}
    for part in parts:
        for level, value in presets[part].items():
            if isinstance(value, dict):
                merged.setdefault(level, {}).update(copy.deepcopy(value))
            else:
                merged[level] = value
    return merged


def layer_weights(layers, pipeline: PipelineSpec, where: str = "layers") -> tuple[float, ...]:
    """One weight per cross-attention layer of `pipeline`, in processor order. None: 1.0 everywhere."""
    names = pipeline.layer_names
    if layers is None:
        return (1.0,) * len(names)
    if pipeline.architecture != "unet":
        return _per_block(layers, pipeline, where)
    if isinstance(layers, list):
        raise RequestError(f"{where}: a list of per-block weights is for SD 3.5 / FLUX models; {pipeline.family} "
                           f"models take a preset name or {{down/mid/up: ...}}")  # fmt: skip
    if isinstance(layers, str):
        layers = preset(layers, pipeline.family)
    if not isinstance(layers, dict):
        raise RequestError(f"{where}: expected a preset name or a dictionary of per-block weights")
    structure = _structure(names)  # (level, block) -> number of attention blocks in it
    weights: dict[tuple, float] = {}
    for level, value in layers.items():
        if level == "mid":
            if ("mid", 0) not in structure:
                raise RequestError(f"{where}.mid: this model's mid block has no attention")
            weights[("mid", 0, 0)] = _single(value, f"{where}.mid")
        elif level in ("down", "up"):
            blocks = value if isinstance(value, dict) else {f"block_{b}": value for (lv, b) in structure if lv == level}
            if not isinstance(blocks, dict):
                raise RequestError(f"{where}.{level}: expected a number or {{block_N: ...}}")
            for block_name, block_value in blocks.items():
                match = re.fullmatch(r"block_(\d+)", str(block_name))
                key = (level, int(match.group(1))) if match else None
                if key not in structure:
                    valid = ", ".join(f"block_{b}" for (lv, b) in sorted(structure) if lv == level)
                    raise RequestError(
                        f"{where}.{level}.{label(block_name)}: no such {level} block with attention in this model "
                        f"(valid: {valid})"
                    )
                for i, w in enumerate(_per_attention(block_value, structure[key], f"{where}.{level}.{block_name}")):
                    weights[(level, key[1], i)] = w
        else:
            raise RequestError(f"{where}: unknown level {shown(level)}; use down, mid and up")
    return tuple(weights.get(_position(name), 0.0) for name in names)


def _per_block(layers, pipeline: PipelineSpec, where: str) -> tuple[float, ...]:
    """SD 3.5 / FLUX: one weight per block an adapter attaches to (SD3's joint blocks, FLUX's double-stream blocks),
    as diffusers' FLUX `set_ip_adapter_scale([...])` takes them. UNet presets (style, composition) name UNet blocks."""
    count = len(pipeline.layer_names)
    if not isinstance(layers, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in layers):
        raise RequestError(f"{where}: {pipeline.family} models take a list of {count} per-block weights (the UNet "
                           f"presets and down/mid/up name UNet blocks)")  # fmt: skip
    if len(layers) != count:
        raise RequestError(f"{where}: {len(layers)} weights, but this {pipeline.family} model's adapters attach to "
                           f"{count} blocks; give {count}")  # fmt: skip
    return tuple(_weight(w, f"{where}[{i}]") for i, w in enumerate(layers))


def _structure(names) -> dict[tuple[str, int], int]:
    structure: dict[tuple[str, int], int] = {}
    for name in names:
        level, block, attention = _position(name)
        structure[(level, block)] = max(structure.get((level, block), 0), attention + 1)
    return structure


def _position(name: str) -> tuple[str, int, int]:
    """"up_blocks.0.attentions.1.transformer_blocks.3" -> ("up", 0, 1); the mid block is ("mid", 0, 0)."""
    match = _LAYER.match(name + ".")
    if match is None:
        raise ValueError(f"unexpected cross-attention layer name {name!r}")
    if match.group(1):
        return match.group(1), int(match.group(2)), int(match.group(3))
    return "mid", 0, 0


def _single(value, where: str) -> float:
    if isinstance(value, list):
        if len(value) != 1:
            raise RequestError(f"{where}: expected one weight, got {len(value)}")
        value = value[0]
    return _weight(value, where)


def _weight(value, where: str) -> float:
    """One weight: a number in SCALE_RANGE (NaN and infinities fail the comparison, huge integers too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}: weight {shown(value)} is not a number")
    low, high = SCALE_RANGE
    if not low <= value <= high:
        raise RequestError(f"{where}: weight {shown(value)} is outside {low}..{high} (the range of a unit's scale); "
                           f"use a weight in that range")  # fmt: skip
    return float(value)


def _per_attention(value, count: int, where: str) -> list[float]:
    if not isinstance(value, list):
        return [_single(value, where)] * count
    if len(value) == 1:
        return [_single(value, where)] * count
    if len(value) != count:
        raise RequestError(f"{where}: this block has {count} attention blocks, got {len(value)} weights")
    return [_single(v, f"{where}[{i}]") for i, v in enumerate(value)]


def label(key) -> str:
    """A block name a client sent, as a message names it: as written when it is a short name, else quoted and cut."""
    return str(key) if re.fullmatch(r"\w{1,40}", str(key)) else shown(key)
