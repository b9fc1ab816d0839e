"""A1111 / SD.Next single-file checkpoints written from diffusers pipelines (original LDM key names), for the tests
of single-file loading: the inverse of diffusers' `from_single_file` conversion, which reads them back."""

from __future__ import annotations

from pathlib import Path

import torch


def write_single_file(pipeline, path: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Save a diffusers SD 1.5 / SDXL pipeline as an A1111-style single checkpoint (original LDM key names), the
    way users download base models. The inverse of diffusers' `from_single_file` conversion, which reads it."""
    from safetensors.torch import save_file

    tensors = single_file_tensors(pipeline)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    return path


def single_file_tensors(pipeline) -> dict[str, torch.Tensor]:
    """The pipeline's tensors under their A1111/LDM names (works on meta tensors too: names and shapes only)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    unet_config = pipeline.unet.config
    tensors = {}
    fixed = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    state = pipeline.unet.state_dict()
    with_attention = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    for key, tensor in state.items():
        tensors["model.diffusion_model." + (fixed.get(key) or _ldm_unet_key(key, unet_config.layers_per_block, with_attention))] = tensor
    for key, tensor in pipeline.vae.state_dict().items():
        ldm, tensor = _ldm_vae_key(key, tensor, len(pipeline.vae.config.block_out_channels))
        tensors["first_stage_model." + ldm] = tensor
    if hasattr(pipeline, "text_encoder_2"):
        prefixes = ("conditioner.embedders.0.transformer.",)
        tensors.update(_open_clip_tensors(pipeline.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        prefixes = ("cond_stage_model.transformer.",)
    for key, tensor in pipeline.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            tensors[prefixes[0] + ("" if key.startswith("text_model.") else "text_model.") + key] = tensor
    return tensors


_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


def _ldm_unet_key(key: str, layers_per_block: int, up_with_attention: set[int]) -> str:
    parts = key.split(".")
    step = layers_per_block + 1

    def resnet(rest):
        return ".".join([_RESNET_TO_LDM[rest[0]], *rest[1:]])

    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.i.downsamplers.0.conv.weight
            return f"input_blocks.{step * (i + 1)}.0.op.{parts[-1]}"
        j = int(parts[3])
        where = f"input_blocks.{step * i + j + 1}"
        return f"{where}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{where}.1.{'.'.join(parts[4:])}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            slot = 2 if i in up_with_attention else 1
            return f"output_blocks.{step * i + layers_per_block}.{slot}.conv.{parts[-1]}"
        j = int(parts[3])
        where = f"output_blocks.{step * i + j}"
        return f"{where}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{where}.1.{'.'.join(parts[4:])}"
    if parts[0] == "mid_block":
        if parts[1] == "attentions":
            return f"middle_block.1.{'.'.join(parts[3:])}"
        return f"middle_block.{2 * int(parts[2])}.{resnet(parts[3:])}"
    raise ValueError(f"no LDM name for UNet tensor {key}")


def _ldm_vae_key(key: str, tensor: torch.Tensor, levels: int) -> tuple[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    if key in DIFFUSERS_TO_LDM_MAPPING["vae"]:
        return DIFFUSERS_TO_LDM_MAPPING["vae"][key], tensor
    parts = key.split(".")
    side = parts[0]  # encoder | decoder
    if parts[1] in ("down_blocks", "up_blocks"):
        i = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])  # the decoder counts levels upwards
        level = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}", tensor
        rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
        return f"{level}.block.{parts[4]}.{rest}", tensor
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}", tensor
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        name = names[parts[4]]
        if name != "norm" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        return f"{side}.mid.attn_1.{name}.{parts[-1]}", tensor
    raise ValueError(f"no LDM name for VAE tensor {key}")


def _open_clip_tensors(text_encoder, prefix: str) -> dict:
    """A transformers CLIPTextModelWithProjection in OpenCLIP's names (SDXL's second text encoder)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
             for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}  # fmt: skip
    out = {}
    for key, ldm in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items():
        out[prefix + ldm] = state.pop(key).T.contiguous() if ldm == "text_projection" else state.pop(key)
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
    for n in layers:
        source, target = f"text_model.encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[target + f"attn.in_proj_{kind}"] = torch.cat(
                [state.pop(source + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for diffusers_name, ldm_name in names.items():
                out[target + f"{ldm_name}.{kind}"] = state.pop(source + f"{diffusers_name}.{kind}")
    if state:
        raise ValueError(f"text encoder tensors without an OpenCLIP name: {sorted(state)[:4]}")
    return out
