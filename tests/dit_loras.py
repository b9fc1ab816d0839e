"""Tiny FLUX and SD 3.5 LoRAs in the names users' files have, written from random low-rank pairs over a tiny
transformer's modules.

One set of pairs, in diffusers' module names, is written in each format: diffusers / PEFT
(`transformer.<module>.lora_A.weight`), kohya (`lora_unet_<original module>.lora_down.weight` + alpha), ComfyUI's
BFL / Stability names (`diffusion_model.<original module>.lora_A.weight`) and XLabs' (`double_blocks.N.processor.
qkv_lora1.down.weight`). The original names come from `single_files`' inverse of diffusers' own converters, so a
fused q, k, v projection is one pair whose up projection holds the three modules' rows; the pairs of a fused group
share their down projection, so every format holds exactly the same LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from single_files import flux_original_names, sd3_original_names


def lora_pairs(transformer, seed: int, rank: int = 4, scale: float = 0.3, blocks_only: bool = True) -> dict:
    """diffusers module name -> (down [rank, in], up [out, rank]) for every Linear of the transformer's blocks; the
    modules that share an input and are one fused module in the original names share their down projection."""
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    shared: dict = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or (blocks_only and "blocks." not in name):
            continue
        group = _fused_group(name)
        if group not in shared:
            shared[group] = torch.randn(rank, module.in_features, generator=generator) * scale
        up = torch.randn(module.out_features, rank, generator=generator) * scale
        pairs[name] = (shared[group], up)
    return pairs


def _fused_group(name: str) -> str:
    """The original module a diffusers module is part of, as far as sharing its down projection goes."""
    block, _, leaf = name.partition(".attn.")
    if leaf in ("to_q", "to_k", "to_v"):
        return f"{block}.qkv" if block.startswith("single_") is False else f"{block}.linear1"
    if leaf in ("add_q_proj", "add_k_proj", "add_v_proj"):
        return f"{block}.add_qkv"
    if name.startswith("single_transformer_blocks.") and name.endswith(".proj_mlp"):
        return name.rsplit(".", 1)[0] + ".linear1"
    block2, _, leaf2 = name.partition(".attn2.")
    if leaf2 in ("to_q", "to_k", "to_v"):
        return f"{block2}.qkv2"
    return name


def original_pairs(pairs: dict, transformer) -> dict:
    """The same pairs under the original module names (BFL's for FLUX, Stability's for SD 3): fused modules' up
    projections stacked in the order the original weights stack them, AdaLN halves swapped where they are."""
    flux = type(transformer).__name__ == "FluxTransformer2DModel"
    ids = {}  # diffusers' module -> an id tensor [id, -id] that the inverse converter moves as it moves weights
    state = {}
    for index, (name, module) in enumerate(transformer.named_modules()):
        if isinstance(module, torch.nn.Linear):
            ids[index + 1] = name
            state[f"{name}.weight"] = torch.tensor([[index + 1.0], [-(index + 1.0)]])
            state[f"{name}.bias"] = torch.zeros(2)
    for key, tensor in transformer.state_dict().items():
        state.setdefault(key, tensor[:0] if tensor.dim() else tensor)
    moved = flux_original_names(state) if flux else sd3_original_names(state, transformer.config.num_layers)
    out = {}
    for key, tensor in moved.items():
        if not key.endswith(".weight") or tensor.dim() != 2 or tensor.shape[1] != 1 or tensor.shape[0] % 2:
            continue
        values = tensor[:, 0].tolist()
        names = [ids.get(int(abs(v))) for v in values[::2]]
        if None in names or not all(n in pairs for n in names):
            continue
        swapped = values[0] < 0
        ups = [pairs[n][1] for n in names]
        if swapped:  # the original AdaLN order (shift, scale) is diffusers' (scale, shift)
            first, second = ups[0].chunk(2, dim=0)
            ups = [torch.cat([second, first])]
        out[key.removesuffix(".weight")] = (pairs[names[0]][0], torch.cat(ups))
    return out


def diffusers_lora(pairs: dict) -> dict:
    return {k: v.clone() for name, (down, up) in pairs.items()
            for k, v in ((f"transformer.{name}.lora_A.weight", down), (f"transformer.{name}.lora_B.weight", up))}  # fmt: skip


def kohya_lora(original: dict, alpha: float = 2.0) -> dict:
    """kohya's names: the effect is up @ down * alpha / rank, so the up projection is written rank / alpha larger."""
    out = {}
    for name, (down, up) in original.items():
        key = "lora_unet_" + name.replace(".", "_")
        out |= {f"{key}.lora_down.weight": down.clone(), f"{key}.lora_up.weight": (up * down.shape[0] / alpha).contiguous(),
                f"{key}.alpha": torch.tensor(alpha)}  # fmt: skip
    return out


def comfy_lora(original: dict) -> dict:
    """ComfyUI's: the original module names under `diffusion_model.`, PEFT's lora_A / lora_B."""
    return {k: v.clone() for name, (down, up) in original.items()
            for k, v in ((f"diffusion_model.{name}.lora_A.weight", down), (f"diffusion_model.{name}.lora_B.weight", up))}  # fmt: skip


XLABS_MODULES = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
                 "txt_attn.proj": "proj_lora2"}  # fmt: skip


def xlabs_lora(original: dict) -> dict:
    """XLabs' (x-flux): the double blocks' attention projections only, as their trainer writes them."""
    out = {}
    for name, (down, up) in original.items():
        block, _, module = name.partition(".")[2].partition(".")
        if name.startswith("double_blocks.") and module in XLABS_MODULES:
            key = f"double_blocks.{block}.processor.{XLABS_MODULES[module]}"
            out |= {f"{key}.down.weight": down.clone(), f"{key}.up.weight": up.contiguous()}
    return out


def xlabs_pairs(pairs: dict) -> dict:
    """The diffusers pairs an XLabs file holds (its modules alone)."""
    kept = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out")  # fmt: skip
    return {n: p for n, p in pairs.items() if n.startswith("transformer_blocks.") and n.endswith(kept)}


def write(path: Path, tensors: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
