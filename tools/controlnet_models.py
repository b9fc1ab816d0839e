"""Tiny ControlNets for the demo pack's tiny pipelines, written in the formats users' trees hold them in.

The ControlNet tests need the real loading code to run: A1111's `models/ControlNet/` LDM single files
(`control_model.*` names), diffusers folders (`config.json` + `diffusion_pytorch_model.safetensors`) of
`ControlNetModel`, `ControlNetUnionModel` (xinsir's ProMax layout: 8 control types), `SD3ControlNetModel` and
`FluxControlNetModel` (a plain one and an InstantX-style Union with `num_mode`), plus a Control-LoRA and a
T2I-Adapter in their published key layouts, which imprompt lists and refuses. Each is built from the pack's own
denoiser (so its widths are that pipeline's, read from `pack`), with random weights from a fixed seed. The layers
diffusers starts at zero (the "zero convs" and their transformer equivalents) are randomised too: a zero ControlNet
changes nothing, and a test comparing with and without one could not fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 32
# diffusers -> original (LDM) names of a ControlNet's resnet parts: the inverse of what diffusers' converter renames
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def write_controlnets(folder: Path, pack: Path) -> dict[str, Path]:
    """Write every tiny ControlNet under `folder` (skipped when written already); returns name -> path:
    sd15-ldm (A1111's ControlNet/, LDM names), sd15 (the same weights as a diffusers folder), sdxl, sdxl-union
    (ProMax), sd35, flux, flux-union, and the refused control-lora (SDXL) and t2i-adapter (SD 1.5)."""
    from diffusers import (
        ControlNetModel,
        ControlNetUnionModel,
        FluxControlNetModel,
        FluxTransformer2DModel,
        SD3ControlNetModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    folder = Path(folder)
    pipelines = Path(pack) / "diffusers"
    paths = {
        "sd15-ldm": folder / "ControlNet" / "control_tiny_sd15_canny.safetensors",
        "sd15": folder / "controlnet" / "tiny-sd15-controlnet",
        "sdxl": folder / "controlnet" / "tiny-sdxl-controlnet",
        "sdxl-union": folder / "controlnet" / "tiny-sdxl-union-promax",
        "sd35": folder / "controlnet" / "tiny-sd35-controlnet",
        "flux": folder / "controlnet" / "tiny-flux-controlnet",
        "flux-union": folder / "controlnet" / "tiny-flux-union",
        "control-lora": folder / "ControlNet" / "control-lora-tiny-sdxl.safetensors",
        "t2i-adapter": folder / "ControlNet" / "t2iadapter_tiny_sd15.safetensors",
    }
    if (folder / "done").is_file():
        return paths
    folder.mkdir(parents=True, exist_ok=True)

    unet = UNet2DConditionModel.from_pretrained(pipelines / "tiny-sd15" / "unet")
    sd15 = _randomised(ControlNetModel.from_unet(unet), SEED)
    sd15.save_pretrained(paths["sd15"])
    _safetensors(paths["sd15-ldm"], ldm_names(sd15.state_dict(), sd15.config["layers_per_block"]))

    unet_xl = UNet2DConditionModel.from_pretrained(pipelines / "tiny-sdxl" / "unet")
    _randomised(ControlNetModel.from_unet(unet_xl), SEED + 1).save_pretrained(paths["sdxl"])
    union = ControlNetUnionModel.from_unet(unet_xl)
    width = unet_xl.config.block_out_channels[0]  # what the union's control-type transformer reads
    config = {**_own(union.config), "num_control_type": 8, "num_trans_channel": width, "num_proj_channel": width}
    torch.manual_seed(SEED + 2)
    _randomised(ControlNetUnionModel.from_config(config), SEED + 2).save_pretrained(paths["sdxl-union"])

    sd3 = SD3Transformer2DModel.from_pretrained(pipelines / "tiny-sd35" / "transformer")
    torch.manual_seed(SEED + 3)
    sd3_net = SD3ControlNetModel.from_config({**_own(sd3.config), "num_layers": 2, "extra_conditioning_channels": 0})
    _randomised(sd3_net, SEED + 3).save_pretrained(paths["sd35"])

    flux = FluxTransformer2DModel.from_pretrained(pipelines / "tiny-flux" / "transformer")
    flux_config = {**_own(flux.config), "num_layers": 1, "num_single_layers": 1}
    torch.manual_seed(SEED + 4)
    _randomised(FluxControlNetModel.from_config(flux_config), SEED + 4).save_pretrained(paths["flux"])
    torch.manual_seed(SEED + 5)
    _randomised(FluxControlNetModel.from_config({**flux_config, "num_mode": 10}), SEED + 5).save_pretrained(paths["flux-union"])

    _safetensors(paths["control-lora"], control_lora_tensors(cross=2048))
    _safetensors(paths["t2i-adapter"], t2i_adapter_tensors())
    (folder / "done").write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths


def _own(config) -> dict:
    """A model's config without diffusers' bookkeeping keys (`_use_default_values` would undo the changes made)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`model` with the parameters diffusers starts at zero (zero convs, control projections) drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            zero_started = name.startswith(("controlnet_", "pos_embed_input", "spatial_ch_projs"))
            if zero_started and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.eval()


def ldm_names(state: dict, layers_per_block: int) -> dict:
    """A diffusers ControlNetModel's state dict in the original ControlNet's names (`control_model.` prefix), as
    lllyasviel's and A1111's files have them: the inverse of diffusers' `convert_controlnet_checkpoint`."""
    out = {}
    hint_blocks = len({k.split(".")[2] for k in state if k.startswith("controlnet_cond_embedding.blocks.")})
    for key, tensor in state.items():
        out["control_model." + ldm_name(key, layers_per_block, hint_blocks)] = tensor.contiguous()
    return out


def ldm_name(key: str, layers_per_block: int, hint_blocks: int) -> str:
    parts = key.split(".")
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * (hint_blocks + 1)}",
             "controlnet_mid_block": "middle_block_out.0", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}  # fmt: skip
    stem, leaf = key.rsplit(".", 1)
    if stem in fixed:
        return f"{fixed[stem]}.{leaf}"
    if parts[0] == "controlnet_cond_embedding":  # blocks.<j>
        return f"input_hint_block.{2 * (int(parts[2]) + 1)}.{leaf}"
    if parts[0] == "controlnet_down_blocks":
        return f"zero_convs.{parts[1]}.0.{leaf}"
    if parts[0] == "down_blocks":
        block, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * (layers_per_block + 1) + layers_per_block}.0.op.{leaf}"
        index = 1 + block * (layers_per_block + 1) + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        index = {"resnets": 2 * int(parts[2]), "attentions": 1}[parts[1]]
        rest = ".".join(parts[3:])
        return f"middle_block.{index}.{_resnet(rest) if parts[1] == 'resnets' else rest}"
    raise ValueError(f"no original name known for {key}")


def _resnet(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return f"{RESNET_NAMES.get(head, head)}.{tail}"


def control_lora_tensors(cross: int, rank: int = 4) -> dict:
    """Stability AI's Control-LoRA layout: a `lora_controlnet` marker, the hint block and zero convs in full, the
    UNet copy as low-rank `.up` / `.down` pairs (original names, no prefix)."""
    generator = torch.Generator().manual_seed(SEED + 6)

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    name = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    return {"lora_controlnet": torch.tensor([]), "input_hint_block.0.weight": randn(16, 3, 3, 3),
            "zero_convs.0.0.weight": randn(32, 32, 1, 1), f"{name}.up": randn(64, rank),
            f"{name}.down": randn(rank, cross)}  # fmt: skip


def t2i_adapter_tensors() -> dict:
    """TencentARC's original T2I-Adapter layout (`t2iadapter_*_sd14v1.pth`): conv_in, body.<n>.block1/2, skep."""
    generator = torch.Generator().manual_seed(SEED + 7)
    return {"conv_in.weight": torch.randn((32, 192, 3, 3), generator=generator),
            "body.0.block1.weight": torch.randn((32, 32, 3, 3), generator=generator),
            "body.0.block2.weight": torch.randn((32, 32, 3, 3), generator=generator)}  # fmt: skip


def _safetensors(path: Path, tensors: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
