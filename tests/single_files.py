"""A1111 / SD.Next single-file checkpoints written from diffusers pipelines (original LDM key names), for the tests
of single-file loading: the inverse of diffusers' `from_single_file` conversion, which reads them back."""

from __future__ import annotations

import json
import struct
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


# ------------------------------------------------------------------ SD 3.x / FLUX.1 all-in-one (ComfyUI's layout)


def write_transformer_single_file(pipeline, path: Path, with_t5: bool = True, dtype: torch.dtype = torch.float16) -> Path:
    """Save a diffusers SD 3 / FLUX pipeline as one all-in-one file, as ComfyUI's `checkpoints/` hold them: the
    transformer in its original names under `model.diffusion_model.`, the VAE under `first_stage_model.`, the text
    encoders under `text_encoders.clip_l.` / `clip_g.` / `t5xxl.transformer.`."""
    from safetensors.torch import save_file

    tensors = transformer_single_file_tensors(pipeline, with_t5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).clone() for k, v in tensors.items()}, path, metadata={"format": "pt"})  # T5 ties two
    return path


def transformer_single_file_tensors(pipeline, with_t5: bool = True) -> dict[str, torch.Tensor]:
    flux = type(pipeline.transformer).__name__ == "FluxTransformer2DModel"
    state = pipeline.transformer.state_dict()
    original = flux_original_names(state) if flux else sd3_original_names(state, pipeline.transformer.config.num_layers)
    tensors = {"model.diffusion_model." + k: v for k, v in original.items()}
    levels = len(pipeline.vae.config.block_out_channels)
    for key, tensor in pipeline.vae.state_dict().items():
        ldm, tensor = _ldm_vae_key(key, tensor, levels)
        tensors["first_stage_model." + ldm] = tensor
    encoders = {"clip_l": pipeline.text_encoder}
    if flux:
        encoders["t5xxl"] = pipeline.text_encoder_2
    else:
        encoders.update(clip_g=pipeline.text_encoder_2, t5xxl=pipeline.text_encoder_3)
    for name, encoder in encoders.items():
        if encoder is None or (name == "t5xxl" and not with_t5):
            continue
        for key, tensor in encoder.state_dict().items():
            if key.endswith("position_ids"):
                continue
            if name != "t5xxl" and not key.startswith(("text_model.", "text_projection")):
                key = "text_model." + key  # transformers 5 saves CLIPTextModel without its text_model wrapper
            tensors[f"text_encoders.{name}.transformer.{key}"] = tensor
    return tensors


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """The original AdaLN order (shift, scale) <-> diffusers' (scale, shift): the same swap both ways."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_original_names(state: dict, layers: int) -> dict:
    """SD 3's transformer in Stability's names: the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_
    diffusers`."""
    s = dict(state)
    out = {"pos_embed": s.pop("pos_embed.pos_embed")}
    renames = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}  # fmt: skip
    for i in range(layers):
        b, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{o}x_block.attn.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn.to_{p}.{kind}") for p in "qkv"])
            out[f"{o}context_block.attn.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn.add_{p}_proj.{kind}") for p in "qkv"])
            if f"{b}attn2.to_q.{kind}" in s:
                out[f"{o}x_block.attn2.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn2.to_{p}.{kind}") for p in "qkv"])
            context_norm = s.pop(f"{b}norm1_context.linear.{kind}")
            out[f"{o}context_block.adaLN_modulation.1.{kind}"] = _swap_halves(context_norm) if i == layers - 1 else context_norm
        renames.update({f"{b}attn.to_out.0": f"{o}x_block.attn.proj", f"{b}attn.to_add_out": f"{o}context_block.attn.proj",
                        f"{b}attn2.to_out.0": f"{o}x_block.attn2.proj", f"{b}norm1.linear": f"{o}x_block.adaLN_modulation.1",
                        f"{b}ff.net.0.proj": f"{o}x_block.mlp.fc1", f"{b}ff.net.2": f"{o}x_block.mlp.fc2",
                        f"{b}ff_context.net.0.proj": f"{o}context_block.mlp.fc1", f"{b}ff_context.net.2": f"{o}context_block.mlp.fc2",
                        f"{b}attn.norm_q": f"{o}x_block.attn.ln_q", f"{b}attn.norm_k": f"{o}x_block.attn.ln_k",
                        f"{b}attn.norm_added_q": f"{o}context_block.attn.ln_q", f"{b}attn.norm_added_k": f"{o}context_block.attn.ln_k",
                        f"{b}attn2.norm_q": f"{o}x_block.attn2.ln_q", f"{b}attn2.norm_k": f"{o}x_block.attn2.ln_k"})  # fmt: skip
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(s.pop(f"norm_out.linear.{kind}"))
    return {**out, **_renamed(s, renames)}


def flux_original_names(state: dict) -> dict:
    """FLUX.1's transformer in Black Forest Labs' names: the inverse of diffusers' `convert_flux_transformer_
    checkpoint_to_diffusers` (at any width)."""
    s = dict(state)
    out = {}
    renames = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
               "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
               "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
               "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
               "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
               "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
               "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}  # fmt: skip
    doubles = sorted({int(k.split(".")[1]) for k in s if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in s if k.startswith("single_transformer_blocks.")})
    for i in doubles:
        b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{o}img_attn.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn.to_{p}.{kind}") for p in "qkv"])
            out[f"{o}txt_attn.qkv.{kind}"] = torch.cat([s.pop(f"{b}attn.add_{p}_proj.{kind}") for p in "qkv"])
        renames.update({f"{b}norm1.linear": f"{o}img_mod.lin", f"{b}norm1_context.linear": f"{o}txt_mod.lin",
                        f"{b}ff.net.0.proj": f"{o}img_mlp.0", f"{b}ff.net.2": f"{o}img_mlp.2",
                        f"{b}ff_context.net.0.proj": f"{o}txt_mlp.0", f"{b}ff_context.net.2": f"{o}txt_mlp.2",
                        f"{b}attn.to_out.0": f"{o}img_attn.proj", f"{b}attn.to_add_out": f"{o}txt_attn.proj"})  # fmt: skip
        for norm, name in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                           ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):  # fmt: skip
            out[f"{o}{name}.scale"] = s.pop(f"{b}attn.{norm}.weight")
    for i in singles:
        b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            parts = [s.pop(f"{b}attn.to_{p}.{kind}") for p in "qkv"] + [s.pop(f"{b}proj_mlp.{kind}")]
            out[f"{o}linear1.{kind}"] = torch.cat(parts)
        out[f"{o}norm.query_norm.scale"] = s.pop(f"{b}attn.norm_q.weight")
        out[f"{o}norm.key_norm.scale"] = s.pop(f"{b}attn.norm_k.weight")
        renames.update({f"{b}norm.linear": f"{o}modulation.lin", f"{b}proj_out": f"{o}linear2"})
    for kind in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(s.pop(f"norm_out.linear.{kind}"))
    return {**out, **_renamed(s, renames)}


def _renamed(state: dict, renames: dict) -> dict:
    """Each remaining tensor under its module's original name; every tensor must have one."""
    out = {}
    for key, tensor in state.items():
        module, kind = key.rsplit(".", 1)
        if module not in renames:
            raise ValueError(f"no original name for transformer tensor {key}")
        out[f"{renames[module]}.{kind}"] = tensor
    return out


def sparse_checkpoint(path: Path, tensors: dict) -> Path:
    """A safetensors file with the real header and no data (a sparse file): probing reads only the header."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        size = tensor.numel() * 2
        header[name] = {"dtype": "F16", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path
