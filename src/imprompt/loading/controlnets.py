"""ControlNet specs -> diffusers ControlNet modules, on the CPU, in eval mode, offline.

diffusers' ControlNetModel, ControlNetUnionModel, SD3ControlNetModel and FluxControlNetModel.

Diffusers folders load with their class's `from_pretrained` (local files only). Single files carry no config:
original (LDM) names are first renamed by diffusers' own converter (`convert_controlnet_checkpoint`; SDXL's
`label_emb` it leaves out, so it is renamed here), then every width of the config is read from the tensors
(channels, transformer depth per block, conditioning embedding, SDXL's added embeddings, Union modes, a
transformer's heads), over the published model's config shipped in `models/configs/controlnet/` for what tensors
cannot say (attention heads: 8 for SD 1.5, 64-wide heads for SDXL, as the real ControlNets have them). The weights
must then fill the model exactly: a missing or extra tensor is an error naming it, never a half-random model.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import CheckpointError, UnsupportedError
from ..models.recognise import unwrapped
from ..models.specs import ControlNetSpec
from .tensors import REDOWNLOAD, read_tensors

SDXL_POOLED_WIDTH = 1280  # SDXL's pooled text embedding (OpenCLIP bigG's projection): the rest of the added
# embedding's input is 6 timestep embeddings of `addition_time_embed_dim` each (sizes and crop)
SD15_HEADS = 8  # SD 1.5 ControlNets have 8 heads in every block; SD 2.x and SDXL ones have 64-wide heads


def load_controlnet(spec: ControlNetSpec, dtype):
    """The diffusers module for `spec`, in `dtype`, on the CPU, in eval mode."""
    if spec.unsupported:
        raise UnsupportedError(spec.unsupported)
    cls = controlnet_class(spec)
    path = Path(spec.path)
    if path.is_dir():
        try:
            model = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(path, f"cannot load the {cls.__name__} folder ({str(exc).splitlines()[0]})",
                                  REDOWNLOAD) from None  # fmt: skip
    else:
        tensors = unwrapped(read_tensors(path, dtype))
        if spec.format == "ldm":
            tensors = diffusers_names(tensors)
        model = from_tensors(cls, config_from_tensors(spec, tensors), tensors, path)
        if any(p.dtype != dtype for p in model.parameters()):  # (read in `dtype` already: no copy, no warning)
            model = model.to(dtype=dtype)
    return model.eval()


def controlnet_class(spec: ControlNetSpec):
    import diffusers

    if spec.architecture == "sd3":
        return diffusers.SD3ControlNetModel
    if spec.architecture == "flux":
        return diffusers.FluxControlNetModel
    return diffusers.ControlNetUnionModel if spec.union else diffusers.ControlNetModel


def from_tensors(cls, config: dict, tensors: dict, path: Path):
    """`cls(**config)` built without initialising its weights, filled with `tensors`, which must fit exactly."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(path, f"its tensors do not fill a {cls.__name__} read from them (missing: "
                                    f"{missing[:3]}, unexpected: {unexpected[:3]})", REDOWNLOAD)  # fmt: skip
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"tensor shapes do not fit ({str(exc).splitlines()[-1].strip()})", REDOWNLOAD) from None
    return model


def diffusers_names(tensors: dict) -> dict:
    """Original ControlNet names (`control_model.*`, or bare `input_blocks.*` / `zero_convs.*`) -> diffusers'."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    bare = {k.removeprefix("control_model."): v for k, v in tensors.items()}
    layers = 0  # resnets in the first level: the input blocks before its downsampler (`input_blocks.<n>.0.op`)
    while f"input_blocks.{layers + 1}.0.in_layers.0.weight" in bare and f"input_blocks.{layers + 1}.0.op.weight" not in bare:
        layers += 1
    converted = convert_controlnet_checkpoint(bare, {"layers_per_block": layers})
    for part, index in (("linear_1", 0), ("linear_2", 2)):  # SDXL's added (text, time) embedding
        for leaf in ("weight", "bias"):
            if f"label_emb.0.{index}.{leaf}" in bare:
                converted[f"add_embedding.{part}.{leaf}"] = bare[f"label_emb.0.{index}.{leaf}"]
    return {k: v for k, v in converted.items() if v is not None}  # a tensor the file lacks is reported on loading


def shipped_config(name: str) -> dict:
    """A published ControlNet's config, shipped with imprompt (`models/configs/controlnet/<name>.json`)."""
    text = resources.files("imprompt.models").joinpath("configs", "controlnet", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def config_from_tensors(spec: ControlNetSpec, tensors: dict) -> dict:
    if spec.architecture == "sd3":
        return sd3_config(tensors)
    if spec.architecture == "flux":
        return flux_config(tensors)
    return unet_config(spec, tensors)


def _shape(tensors: dict, key: str) -> tuple[int, ...]:
    return tuple(tensors[key].shape)


def _count(tensors: dict, prefix: str) -> int:
    """How many numbered children `prefix<n>.` has."""
    return len({k[len(prefix) :].split(".")[0] for k in tensors if k.startswith(prefix)})


def unet_config(spec: ControlNetSpec, t: dict) -> dict:
    """A (Union) ControlNetModel's config, every width from the diffusers-named tensors."""
    xl = "add_embedding.linear_1.weight" in t
    config = shipped_config(("sdxl-union" if spec.union else "sdxl") if xl else "sd15")
    levels = _count(t, "down_blocks.")
    block_out = [_shape(t, f"down_blocks.{i}.resnets.0.conv2.weight")[0] for i in range(levels)]
    attention = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in t) for i in range(levels)]
    depth = [max(1, _count(t, f"down_blocks.{i}.attentions.0.transformer_blocks.")) for i in range(levels)]
    cond_in = _shape(t, "controlnet_cond_embedding.conv_in.weight")
    cond_blocks = _count(t, "controlnet_cond_embedding.blocks.")
    proj_in = next((t[k] for k in t if k.endswith("proj_in.weight")), None)
    cross = spec.cross_attention_dim or config["cross_attention_dim"]
    config.update(
        in_channels=_shape(t, "conv_in.weight")[1],
        conditioning_channels=cond_in[1],
        conditioning_embedding_out_channels=[cond_in[0]] + [
            _shape(t, f"controlnet_cond_embedding.blocks.{j}.weight")[0] for j in range(1, cond_blocks, 2)],
        block_out_channels=block_out,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        layers_per_block=_count(t, "down_blocks.0.resnets."),
        transformer_layers_per_block=depth,
        cross_attention_dim=cross,
        attention_head_dim=SD15_HEADS if cross == 768 else [max(1, c // 64) for c in block_out],
        use_linear_projection=proj_in is not None and proj_in.dim() == 2,
        mid_block_type="UNetMidBlock2DCrossAttn" if any(k.startswith("mid_block.attentions.") for k in t) else "UNetMidBlock2D",
    )  # fmt: skip
    if xl:
        added = _shape(t, "add_embedding.linear_1.weight")[1]
        time_dim = config["addition_time_embed_dim"]
        if spec.union:  # one timestep embedding per control type
            time_dim = _shape(t, "control_add_embedding.linear_1.weight")[1] // _shape(t, "task_embedding")[0]
        elif added > SDXL_POOLED_WIDTH and (added - SDXL_POOLED_WIDTH) % 6 == 0:
            time_dim = (added - SDXL_POOLED_WIDTH) // 6
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=added,
                      addition_time_embed_dim=time_dim)  # fmt: skip
    if "class_embedding.linear_1.weight" in t:
        config.update(class_embed_type="projection",
                      projection_class_embeddings_input_dim=_shape(t, "class_embedding.linear_1.weight")[1])  # fmt: skip
    if spec.union:
        modes, width = _shape(t, "task_embedding")
        config.update(num_control_type=modes, num_trans_channel=width, num_trans_layer=_count(t, "transformer_layes."),
                      num_proj_channel=_shape(t, "spatial_ch_projs.weight")[0])  # fmt: skip
    return config


def _heads(t: dict, prefix: str, inner: int, default: int) -> tuple[int, int]:
    """(heads, head width) of attention blocks under `prefix`: the width of their per-head q norm, else `default`."""
    norm = next((k for k in t if k.startswith(prefix) and k.endswith("attn.norm_q.weight")), None)
    head = _shape(t, norm)[0] if norm else default
    return inner // head, head


def sd3_config(t: dict) -> dict:
    """An SD3ControlNetModel's config from its tensors (joint blocks, or SD 3.5 Large's single blocks)."""
    inner = _shape(t, "controlnet_blocks.0.weight")[0]
    heads, head = _heads(t, "transformer_blocks.", inner, 64)
    embed = "pos_embed.proj.weight" if "pos_embed.proj.weight" in t else "pos_embed_input.proj.weight"
    in_channels, patch = _shape(t, embed)[1], _shape(t, embed)[-1]
    norm = next((k for k in t if k.endswith("attn.norm_q.weight")), None)
    config = dict(
        in_channels=in_channels, out_channels=in_channels, patch_size=patch, num_layers=_count(t, "transformer_blocks."),
        attention_head_dim=head, num_attention_heads=heads,
        pooled_projection_dim=_shape(t, "time_text_embed.text_embedder.linear_1.weight")[1],
        extra_conditioning_channels=_shape(t, "pos_embed_input.proj.weight")[1] - in_channels,
        qk_norm=None if norm is None else ("layer_norm" if norm.replace("weight", "bias") in t else "rms_norm"),
        use_pos_embed="pos_embed.proj.weight" in t,
        dual_attention_layers=sorted({int(k.split(".")[1]) for k in t if k.startswith("transformer_blocks.") and ".attn2." in k}),
    )  # fmt: skip
    if "context_embedder.weight" in t:
        caption, joint = _shape(t, "context_embedder.weight")
        config.update(joint_attention_dim=joint, caption_projection_dim=caption)
    else:
        config.update(joint_attention_dim=None)
    grid = "pos_embed.pos_embed" if "pos_embed.pos_embed" in t else "pos_embed_input.pos_embed"
    if grid in t:  # kept in the file when the position grid is bounded (pos_embed_max_size)
        config["pos_embed_max_size"] = round(_shape(t, grid)[1] ** 0.5)
    return config


def flux_config(t: dict) -> dict:
    """A FluxControlNetModel's config from its tensors; the rotary axes split its head width as FLUX.1's do
    (16 / 56 / 56 of 128)."""
    inner, in_channels = _shape(t, "x_embedder.weight")
    heads, head = _heads(t, "", inner, 128)
    config = dict(
        in_channels=in_channels, num_layers=_count(t, "transformer_blocks."),
        num_single_layers=_count(t, "single_transformer_blocks."), attention_head_dim=head, num_attention_heads=heads,
        joint_attention_dim=_shape(t, "context_embedder.weight")[1],
        pooled_projection_dim=_shape(t, "time_text_embed.text_embedder.linear_1.weight")[1],
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in t,
        axes_dims_rope=[head // 8, head * 7 // 16, head * 7 // 16],
        num_mode=_shape(t, "controlnet_mode_embedder.weight")[0] if "controlnet_mode_embedder.weight" in t else None,
    )  # fmt: skip
    if "input_hint_block.conv_out.weight" in t:
        config["conditioning_embedding_channels"] = _shape(t, "input_hint_block.conv_out.weight")[0]
    return config
