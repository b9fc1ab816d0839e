"""The rest of an A1111 / ComfyUI models tree, recognised from tensor names: LoRAs, VAEs, embeddings, ControlNets...

A user's tree holds far more than pipelines, IP-Adapters and image encoders. Each file is told from its tensor
names and shapes (the key patterns A1111, ComfyUI, spandrel and diffusers use to tell them apart), never from its
name or folder, so `imprompt models` lists it as what it is; only a file that cannot be read is "unreadable".
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError
from ..loading.tensors import REDOWNLOAD, TensorInfo, quantization
from . import catalog
from .specs import (
    FLUX_UNION_TYPES,
    AdapterSpec,
    UNION_TYPES,
    ControlNetSpec,
    EncoderSpec,
    LoraSpec,
    OtherModelSpec,
    TextEncoderSpec,
    TextualInversionSpec,
    VaeSpec,
)

WRAPPERS = ("state_dict.", "params_ema.", "params.", "module.", "first_stage_model.")  # a whole file nested once
KOHYA_PARTS = {"lora_unet_": "unet", "lora_transformer_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
               "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}  # fmt: skip
MAX_VECTORS = 75  # a textual inversion fills at most one 75-token chunk


def unwrapped(table: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The table without a prefix every key shares (`state_dict.` in .ckpt files, `params_ema.` in upscalers)."""
    for prefix in WRAPPERS:
        if table and all(k.startswith(prefix) for k in table):
            return unwrapped({k[len(prefix) :]: v for k, v in table.items()})
    return table


def recognise(path, table: dict[str, TensorInfo]):
    """A spec for what `table` is, or an `OtherModelSpec` of kind "unknown" (readable, but not something known)."""
    table = unwrapped(table)
    keys = list(table)
    for test in (redux, pulid, eva_clip, lora, vae, textual_inversion, controlnet, t2i_adapter, upscaler, face_restorer, text_encoder,
                 diffusion_model):  # fmt: skip
        spec = test(str(path), table, keys)
        if spec is not None:
            return spec
    shown = ", ".join(sorted(keys)[:3]) or "no tensors"
    return OtherModelSpec(str(path), "unknown", f"{len(keys)} tensors not of a kind imprompt knows (first: {shown})")


# ------------------------------------------------------------------------------------------------- FLUX Redux


REDUX_KEYS = ("redux_up.weight", "redux_down.weight")


def redux(path, table, keys):
    """BFL's FLUX.1 Redux (`flux1-redux-dev.safetensors`, ComfyUI's `style_models/`; diffusers' `ReduxImageEncoder`
    has the same names): `redux_up` [3 x T5 width, SigLIP width] then SiLU then `redux_down` [T5 width, 3 x T5
    width], turning each SigLIP patch into a token appended to the prompt's T5 tokens. A spec that pairs like an
    IP-Adapter's: it consumes SigLIP's last hidden state (after its final norm, as `FluxPriorReduxPipeline` reads
    it), and fits FLUX models whose T5 is as wide as its output (`conditioning/redux.py`)."""
    if not any(k.startswith(("redux_up.", "redux_down.")) for k in table):
        return None
    up, down = (table.get(k) for k in REDUX_KEYS)
    if up is None or down is None or len(up.shape) != 2 or len(down.shape) != 2 or down.shape[1] != up.shape[0]:
        raise CheckpointError(path, f"not a valid FLUX Redux file: redux_up.weight {up and up.shape} and "
                                    f"redux_down.weight {down and down.shape} are not [hidden, in] and [out, hidden]",
                              REDOWNLOAD)  # fmt: skip
    for name, shape in (("redux_up.bias", up.shape[0]), ("redux_down.bias", down.shape[0])):
        if name in table and tuple(table[name].shape) != (shape,):
            raise CheckpointError(path, f"not a valid FLUX Redux file: {name} is {table[name].shape}, not [{shape}]",
                                  REDOWNLOAD)  # fmt: skip
    return AdapterSpec(str(path), "redux", "last_hidden_state", up.shape[1], 0, down.shape[0], (),
                       architecture="flux", encoder_type="siglip", redux_hidden=up.shape[0])  # fmt: skip


# ------------------------------------------------------------------------------------------------------ PuLID


def pulid(path, table, keys):
    """PuLID's files (ToTheBeginning/PuLID, guozinan/PuLID): FLUX v0.9.x holds `pulid_encoder.*` (the IDFormer) and
    `pulid_ca.N.*` (its CAs: `to_q` [CA width, FLUX hidden width]); SDXL v1.1 the same IDFormer as `id_adapter.*`
    with `id_adapter_attn_layers.N.id_to_k/v` [UNet width, 2048]. The IDFormer's mappings say what it reads: EVA's
    hidden-state width (`mapping_0.0` input), and antelopev2's 512 + EVA's cls width (`id_embedding_mapping.0`
    input). v0.9.0 and v0.9.1 have the same tensors: nothing here tells them apart."""
    flux = any(k.startswith("pulid_ca.") for k in table)
    if not flux and not any(k.startswith("id_adapter_attn_layers.") for k in table):
        return None
    e = "pulid_encoder." if flux else "id_adapter."
    need = [f"{e}latents", f"{e}proj_out", f"{e}mapping_0.0.weight", f"{e}id_embedding_mapping.0.weight"]
    need.append("pulid_ca.0.to_q.weight" if flux else "")
    missing = [k for k in need if k and (k not in table or len(table[k].shape) < 2)]
    if missing:
        raise CheckpointError(path, f"a PuLID file without {', '.join(missing)}", REDOWNLOAD)
    queries, eva_width = table[f"{e}latents"].shape[1], table[f"{e}mapping_0.0.weight"].shape[1]
    id_in, id_width = table[f"{e}id_embedding_mapping.0.weight"].shape[1], table[f"{e}proj_out"].shape[1]
    face = 512  # antelopev2's ArcFace (glintr100) embedding; the rest of the id vector is EVA's cls output
    if flux:
        cas = sorted({int(k.split(".")[1]) for k in table if k.startswith("pulid_ca.") and k.endswith(".to_q.weight")})
        width = table["pulid_ca.0.to_q.weight"].shape[1]
        return AdapterSpec(str(path), "pulid", "face_embeds", face, queries, width, tuple(width for _ in cas),
                           clip_width=eva_width, architecture="flux", encoder_type="antelopev2",
                           eva_projection=id_in - face)  # fmt: skip
    layers = sorted({int(k.split(".")[1]) for k in table if k.startswith("id_adapter_attn_layers.") and ".id_to_k." in k})
    widths = tuple(table[f"id_adapter_attn_layers.{n}.id_to_k.weight"].shape[0] for n in layers)
    return AdapterSpec(str(path), "pulid-sdxl", "face_embeds", face, queries, id_width, widths, clip_width=eva_width,
                       encoder_type="antelopev2", eva_projection=id_in - face)  # fmt: skip


def eva_clip(path, table, keys):
    """An EVA02-CLIP checkpoint (BAAI's `EVA02_CLIP_L_336_psz14_s6B.pt`, the whole CLIP; or its `visual.*` alone):
    the vision tower PuLID reads, run by imprompt's own module (`ipadapter/eva_clip.py`)."""
    if not any(k.endswith("visual.blocks.0.attn.inner_attn_ln.weight") for k in keys):
        return None
    from ..ipadapter.eva_clip import eva_shape

    shape = eva_shape(table, path)
    return EncoderSpec(str(path), shape.width, shape.projection, shape.depth, shape.image_size, shape.patch, shape.mlp,
                       shape.heads, "swiglu", shape.architecture, model_type="eva-clip")  # fmt: skip


# ------------------------------------------------------------------------------------------------------- LoRA


def lora(path, table, keys):
    kohya = [k for k in keys if k.startswith(tuple(KOHYA_PARTS))]
    peft = [k for k in keys if re.search(r"\.(lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.(up|down))\.", k)]
    xlabs = [k for k in keys if XLABS_LORA.search(k)]
    comfy = [k for k in keys if k.startswith("diffusion_model.") and re.search(r"\.lora_(down|up)\.weight$", k)]
    if not kohya and not peft and not xlabs and not comfy:
        return None
    architecture = _lora_architecture(table, keys)
    if kohya:
        suffixes = {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in kohya}
        if {"hada_w1_a", "hada_w1_b"} & suffixes:
            fmt = "lycoris-loha"
        elif any(s.startswith("lokr_w") for s in suffixes):
            fmt = "lycoris-lokr"
        elif {"lora_down", "lora_up"} & suffixes:
            fmt = "kohya"
        else:
            fmt = "lycoris"
        parts = sorted({part for prefix, part in KOHYA_PARTS.items() for k in kohya if k.startswith(prefix)})
    elif xlabs:
        fmt, parts = "xlabs", ["unet"]
    elif comfy or any(k.startswith("diffusion_model.") for k in peft):
        fmt = "comfyui"  # BFL / Stability's own module names under ComfyUI's `diffusion_model.`
        parts = ["unet"] + sorted({"text_encoder" for k in peft if k.startswith("text_encoders.")})
    else:
        fmt = "diffusers"
        heads = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        parts = sorted({k.split(".")[0] for k in peft if k.split(".")[0] in heads}) or ["unet"]
    if architecture != "unet":  # the denoiser part of a transformer's LoRA is named for it
        parts = sorted({"transformer" if p == "unet" else p for p in parts})
    width = _lora_width(table, keys, parts) if architecture == "unet" else _dit_lora_width(table, keys)
    if architecture == "dit":  # diffusers' names alone: the published widths tell the families apart
        architecture = DIT_WIDTHS.get(width, "dit")
    return LoraSpec(path, width, fmt, _lora_rank(table, keys), tuple(parts), architecture=architecture)


XLABS_LORA = re.compile(r"(^|\.)(double|single)_blocks\.\d+\.processor\.(qkv|proj)_lora\d*\.(down|up)\.weight$")
# the blocks' widths of the published transformers: FLUX.1 (dev, schnell), SD 3.5 Large, SD 3 / 3.5 Medium
DIT_WIDTHS = {3072: "flux", 2432: "sd3", 1536: "sd3"}


def _lora_architecture(table, keys) -> str:
    """unet | sd3 | flux | dit, from the module names the LoRA adapts (in any of the formats' spellings)."""
    names = " ".join(keys)
    if re.search(r"(double_blocks|single_blocks|single_transformer_blocks)[._]\d", names):
        return "flux"  # FLUX's double / single-stream blocks (BFL, kohya, XLabs, diffusers)
    if re.search(r"joint_blocks[._]\d", names):
        return "sd3"  # MMDiT's joint blocks (Stability's names: kohya, ComfyUI)
    if re.search(r"(^|\.|lora_)transformer[._]transformer_blocks[._]\d", names):
        return "dit"  # diffusers' names, shared by both families' double-stream / joint blocks
    return "unet"


def _dit_lora_width(table, keys) -> int | None:
    """A transformer LoRA's blocks' width: the input width of the attention projections it adapts (q, k, v or
    fused qkv, of the image or the text stream: each reads the blocks' width)."""
    for key in keys:
        if re.search(r"(to_[qkv]|add_[qkv]_proj|qkv|qkv_lora\d*|linear1)[._](lora_down|lora_A|lora\.down|down)\.weight$", key):
            if len(table[key].shape) == 2:
                return table[key].shape[1]
    return None


def _lora_width(table, keys, parts) -> int | None:
    """The cross-attention width of the models it is for: the input width of the cross-attention key projection
    it adapts (768 SD 1.5, 1024 SD 2.x, 2048 SDXL); for a LoRA of the text encoders alone, their widths added up
    (SDXL: 768 + 1280). None if nothing tells."""
    for key in keys:
        if ("attn2_to_k" in key or "attn2.to_k" in key) and key.endswith("weight"):
            down = re.search(r"(lora_down|lora_A|lora\.down|hada_w1_b|hada_w2_b|lora_linear_layer\.down)\.weight$", key)
            if down is not None and len(table[key].shape) == 2:
                return table[key].shape[1]
    widths = {}
    for key in keys:
        if re.search(r"(lora_down|lora_A)\.weight$", key) and len(table[key].shape) == 2 and "mlp" not in key:
            part = "text_encoder_2" if key.startswith(("lora_te2_", "text_encoder_2.")) else "text_encoder"
            widths.setdefault(part, set()).add(table[key].shape[1])
    if widths and all(len(w) == 1 for w in widths.values()):
        return sum(w.pop() for w in widths.values())
    return None


def _lora_rank(table, keys) -> int | None:
    for key in keys:
        if re.search(r"(lora_down|lora_A|lora\.down|lora_linear_layer\.down|_lora\d*\.down)\.weight$", key):
            return table[key].shape[0]
    return None


# -------------------------------------------------------------------------------------------------------- VAE


def vae(path, table, keys):
    if "quantize.embedding.weight" in table:  # RestoreFormer: VAE-like names, but a face restorer
        return None
    if "encoder.down.0.block.0.conv1.weight" in table and "decoder.conv_in.weight" in table:
        return VaeSpec(path, "ldm", table["decoder.conv_in.weight"].shape[1])
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in table and "decoder.conv_in.weight" in table:
        return VaeSpec(path, "diffusers", table["decoder.conv_in.weight"].shape[1])
    return None


# ------------------------------------------------------------------------------------------ textual inversion


def textual_inversion(path, table, keys):
    if set(keys) >= {"clip_l", "clip_g"} and len(table["clip_l"].shape) == 2 and len(table["clip_g"].shape) == 2:
        return TextualInversionSpec(path, (table["clip_l"].shape[1], table["clip_g"].shape[1]), table["clip_l"].shape[0])
    vectors = [k for k in keys if k.startswith("string_to_param.")] or (keys if len(keys) == 1 else [])
    for key in vectors:  # A1111's .pt (string_to_param), `emb_params`, or a diffusers concept's one token
        shape = table[key].shape
        rows = shape[0] if len(shape) == 2 else 1
        if len(shape) in (1, 2) and shape[-1] >= 8 and rows <= MAX_VECTORS:
            return TextualInversionSpec(path, (shape[-1],), rows)
    return None


# --------------------------------------------------------------------------------- what imprompt does not run


def controlnet(path, table, keys):
    """A ControlNet in any of the layouts users keep (see `controlnet_spec`), or None."""
    return controlnet_spec(path, table)


def controlnet_spec(path, table, fmt: str | None = None) -> ControlNetSpec | None:
    """What a ControlNet-like tensor table is: the denoiser it feeds and the width it was trained for (read from
    its cross-attention / context tensors), its Union modes; the kinds imprompt cannot run (Control-LoRA, LLLite,
    ControlNet-XS, XLabs' FLUX format) with the reason. `fmt` forces the format word (folders: "diffusers")."""
    keys = list(table)
    name = Path(path).name
    if "lora_controlnet" in table:  # Stability AI's marker tensor
        downs = [table[k].shape[1] for k in keys if k.endswith("attn2.to_k.down") and len(table[k].shape) == 2]
        return ControlNetSpec(path, "ldm", "unet", downs[0] if downs else 0, variant="Control-LoRA",
                              unsupported=refused_controlnet(name, "a Control-LoRA (Stability AI's low-rank ControlNet)"))  # fmt: skip
    if any(k.startswith("lllite_") or "lllite" in k.split(".")[0] for k in keys):
        return ControlNetSpec(path, "ldm", "unet", 0, variant="ControlNet-LLLite",
                              unsupported=refused_controlnet(name, "a ControlNet-LLLite (kohya's light ControlNet)"))  # fmt: skip
    if any("ctrl_to_base" in k or "base_to_ctrl" in k or "control_to_base" in k for k in keys):
        return ControlNetSpec(path, fmt or "diffusers", "unet", _cross_width(table), variant="ControlNet-XS",
                              unsupported=refused_controlnet(name, "a ControlNet-XS"))  # fmt: skip
    bare = {k.removeprefix("control_model."): v for k, v in table.items()}
    if "input_hint_block.0.weight" in bare and any(k.startswith(("zero_convs.", "input_blocks.", "middle_block_out."))
                                                   for k in bare):  # fmt: skip
        width = _cross_width(bare)
        return ControlNetSpec(path, "ldm", "unet", width, variant=f"{_family_word(width)} ControlNet")
    if "controlnet_cond_embedding.conv_in.weight" in table and "conv_in.weight" in table:
        width = _cross_width(table)
        variant = f"{_family_word(width)} ControlNet"
        if "task_embedding" in table:  # xinsir's Union: one embedding per control type (6; ProMax: 8)
            modes = table["task_embedding"].shape[0]
            variant += " Union ProMax" if modes == len(UNION_TYPES) else " Union"
            return ControlNetSpec(path, fmt or "diffusers", "unet", width, True, _modes(UNION_TYPES, modes), variant)
        return ControlNetSpec(path, fmt or "diffusers", "unet", width, variant=variant)
    if "pos_embed_input.proj.weight" in table and "controlnet_blocks.0.weight" in table:  # SD3ControlNetModel
        width = table["controlnet_blocks.0.weight"].shape[0]  # the blocks' width, which the model's must equal
        return ControlNetSpec(path, fmt or "diffusers", "sd3", width, variant="SD 3.5 ControlNet")
    if "controlnet_x_embedder.weight" in table and "context_embedder.weight" in table:  # FluxControlNetModel
        width = table["context_embedder.weight"].shape[1]  # the context (T5) width, as the model's
        if "controlnet_mode_embedder.weight" in table:  # InstantX / Shakker-Labs Union: num_mode embeddings
            modes = table["controlnet_mode_embedder.weight"].shape[0]
            return ControlNetSpec(path, fmt or "diffusers", "flux", width, True, _modes(FLUX_UNION_TYPES, modes),
                                  "FLUX ControlNet Union")  # fmt: skip
        return ControlNetSpec(path, fmt or "diffusers", "flux", width, variant="FLUX ControlNet")
    if "controlnet_blocks.0.weight" in table and any(k.startswith("double_blocks.") for k in keys):
        width = table["txt_in.weight"].shape[1] if "txt_in.weight" in table else 0
        return ControlNetSpec(path, "xlabs", "flux", width, variant="FLUX ControlNet (XLabs)",
                              unsupported=refused_controlnet(name, "a FLUX ControlNet in XLabs' own format",
                                                   "a diffusers-format FLUX ControlNet (InstantX, Shakker-Labs)"))  # fmt: skip
    return None


def refused_controlnet(name: str, what: str, instead: str = "a full ControlNet of the same control type") -> str:
    return (f"ControlNet model {name} is {what}, which imprompt does not run (diffusers' ControlNet pipelines "
            f"take full ControlNets). Use {instead}")  # fmt: skip


def _cross_width(table) -> int:
    """The cross-attention width a UNet ControlNet was trained for (attn2.to_k's input); 0 if it has none."""
    widths = {table[k].shape[1] for k in table if k.endswith("attn2.to_k.weight") and len(table[k].shape) == 2}
    return widths.pop() if len(widths) == 1 else 0


def _family_word(width: int) -> str:
    return catalog.UNET_FAMILIES.get(width, f"{width}-wide" if width else "unknown family")


def _modes(names: tuple[str, ...], count: int) -> tuple[str, ...]:
    """The first `count` mode names; modes past the published ones by their index ("mode 7")."""
    return tuple(names[i] if i < len(names) else f"mode {i}" for i in range(count))


def t2i_adapter(path, table, keys):
    if ("conv_in.weight" in table and "body.0.block2.weight" in table) or "body.0.in_conv.weight" in table \
            or "style_embedding" in table or "adapter.body.0.resnets.0.block1.weight" in table:  # fmt: skip
        return ControlNetSpec(str(path), "ldm" if "conv_in.weight" in table else "diffusers", "unet", 0,
                              variant="T2I-Adapter", kind="t2i-adapter",
                              unsupported=refused_controlnet(Path(path).name, "a T2I-Adapter"))  # fmt: skip
    return None


def upscaler(path, table, keys):
    arch = None
    if "model.0.weight" in table and any(k.startswith("model.1.sub.0.RDB1.") for k in keys):
        arch = "ESRGAN"
    elif "conv_first.weight" in table and ("body.0.rdb1.conv1.weight" in table or "RRDB_trunk.0.RDB1.conv1.weight" in table):
        arch = "ESRGAN (RRDBNet)"
    elif any(k.startswith("layers.0.residual_group.blocks.0.") for k in keys):
        arch = "SwinIR / HAT"
    elif "before_RG.1.weight" in table:
        arch = "DAT"
    elif "body.0.weight" in table and all(re.fullmatch(r"body\.\d+\.(weight|bias)", k) for k in keys):
        arch = "Real-ESRGAN compact (SRVGG)"
    return OtherModelSpec(path, "upscaler", arch) if arch else None


def face_restorer(path, table, keys):
    if "toRGB.0.weight" in table and any(k.startswith("stylegan_decoder.") for k in keys):
        return OtherModelSpec(path, "face-restorer", "GFPGAN")
    if "quantize.embedding.weight" in table and "position_emb" in table:
        return OtherModelSpec(path, "face-restorer", "CodeFormer")
    if "quantize.embedding.weight" in table:
        return OtherModelSpec(path, "face-restorer", "RestoreFormer")
    return None


def text_encoder(path, table, keys):
    """A text encoder alone (ComfyUI's `text_encoders/`, `clip/`), in transformers' names: a CLIP text tower
    (`clip_l.safetensors`; `clip_g.safetensors` with its `text_projection`) or T5's encoder (`t5xxl_fp16`,
    `t5xxl_fp8_e4m3fn`), or T5's encoder in llama.cpp's names (city96's `t5-v1_1-xxl-encoder-Q8_0.gguf`:
    `token_embd.weight`, `enc.blk.N.*`; imprompt does not read it, and says so by name): its width pairs it with a
    transformer that runs with it."""
    prefix = "text_model." if "text_model.embeddings.token_embedding.weight" in table else ""  # transformers 4 and 5
    layers = {k.split(".")[2 + bool(prefix)] for k in keys if k.startswith(f"{prefix}encoder.layers.")}
    stored = quantization(path, table, {})
    if layers and f"{prefix}embeddings.token_embedding.weight" in table:
        width = table[f"{prefix}embeddings.token_embedding.weight"].shape[1]
        projection = table.get("text_projection.weight")
        return TextEncoderSpec(path, "clip", width, len(layers), projection.shape[0] if projection else None, stored)
    if any(k.startswith("encoder.block.0.layer.0.SelfAttention.") for k in keys):
        blocks = {k.split(".")[2] for k in keys if k.startswith("encoder.block.")}
        query = table.get("encoder.block.0.layer.0.SelfAttention.q.weight")
        width = table["shared.weight"].shape[1] if "shared.weight" in table else query.shape[1] if query else 0
        return TextEncoderSpec(path, "t5xxl", width, len(blocks), quantization=stored)
    if "token_embd.weight" in table and any(k.startswith("enc.blk.") for k in keys):  # an LLM has `blk.` alone
        blocks = {k.split(".")[2] for k in keys if k.startswith("enc.blk.")}
        return TextEncoderSpec(path, "t5xxl", table["token_embd.weight"].shape[1], len(blocks), quantization=stored)
    return None


def diffusion_model(path, table, keys):
    if "input_blocks.0.0.weight" in table and any(k.startswith("middle_block.") for k in keys):
        return OtherModelSpec(path, "diffusion-model", f"{_unet_family(table, keys)} UNet alone (original names)")
    if "conv_in.weight" in table and "time_embedding.linear_1.weight" in table:
        return OtherModelSpec(path, "diffusion-model", f"{_unet_family(table, keys)} UNet alone (diffusers names)")
    # whole transformers alone are pipelines (ComfyUI's split layout, `single_file.transformer_alone_spec`)
    runs = "blocks without the final layer a whole transformer has; not runnable"
    if any(k.startswith("double_blocks.") for k in keys):
        return OtherModelSpec(path, "diffusion-model", f"FLUX transformer alone ({runs})")
    if any(k.startswith("joint_blocks.") for k in keys):
        return OtherModelSpec(path, "diffusion-model", f"SD 3 transformer alone ({runs})")
    return None


def _unet_family(table, keys) -> str:
    widths = {table[k].shape[1] for k in keys if k.endswith("attn2.to_k.weight") and len(table[k].shape) == 2}
    return catalog.unet_family(widths.pop()) if len(widths) == 1 else "unknown family"
