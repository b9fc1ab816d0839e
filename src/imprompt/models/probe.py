"""Checkpoint -> spec, read from the tensor table (and, for FaceID's two tensor-identical variants, the file name).

A tensor table (a safetensors header is a few KB of JSON) says everything compatibility needs: which IP-Adapter
variant a file is, which encoder output it consumes and how wide, how many tokens it adds, which UNet width it
targets; an encoder's widths; a pipeline's cross-attention layout. Nothing here reads tensor data.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from ..errors import CheckpointError
from ..loading.tensors import REDOWNLOAD, TensorInfo, first_line, read_tensor_table
from . import catalog
from .recognise import controlnet_spec, recognise, redux, refused_controlnet
from .single_file import (
    is_single_file_checkpoint,
    single_file_spec,
    transformer_alone_architecture,
    transformer_alone_spec,
    wrong_input_channels,
)
from .specs import (
    EMBEDDINGS_FORMAT,
    MODEL_DEFAULTS,
    ARCHITECTURES,
    SUPPORTED_PIPELINES,
    AdapterSpec,
    ControlNetSpec,
    EmbeddingsSpec,
    EncoderSpec,
    OtherModelSpec,
    PipelineSpec,
    Spec,
    VaeSpec,
    unet_layer_order,
)


def probe(path) -> Spec:
    """What is at `path`: a pipeline, an IP-Adapter, an image encoder, saved embeddings, or another model file of
    a user's tree (LoRA, VAE, textual inversion, ControlNet, upscaler, ...; see `recognise.py`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return probe_pipeline_folder(path)
        if (path / "config.json").is_file():
            return probe_config_folder(path)
        raise CheckpointError(
            path,
            "is a folder, but neither a diffusers pipeline (model_index.json) nor a model with its config.json",
            "Point at the checkpoint file itself, or at a folder with its config",
        )
    table, metadata = read_tensor_table(path)
    if not table:
        raise CheckpointError(path, "holds no tensors: it is not a model file", "Remove it from the models folder")
    if metadata.get("format") == EMBEDDINGS_FORMAT:
        return embeddings_spec(path, table, metadata)
    if any(k.startswith("ip_adapter_proj_model.") for k in table):  # XLabs' FLUX adapter, under its own names
        return flux_adapter_spec(path, xlabs_names(table))
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in table):
        return adapter_spec(path, table)
    if "embeddings.class_embedding" not in table:  # (a CLIP file without the prefix is not read as one)
        table = with_vision_prefix(table)
    if "vision_model.embeddings.patch_embedding.weight" in table:
        return vision_tower_spec(path, table, _config_from_metadata(metadata))
    if is_single_file_checkpoint(table):
        return single_file_spec(path, table, metadata)
    if transformer_alone_architecture(table) is not None:  # ComfyUI's split layout: paired with its parts later
        return transformer_alone_spec(path, table, metadata)
    return recognise(path, table)


def adapter_spec(path: Path, table: dict[str, TensorInfo]) -> AdapterSpec:
    """Read variant, consumed output, token count and UNet layout from an h94-format tensor table."""
    proj = {k.removeprefix("image_proj."): v.shape for k, v in table.items() if k.startswith("image_proj.")}
    attn = {k.removeprefix("ip_adapter."): v.shape for k, v in table.items() if k.startswith("ip_adapter.")}

    def bad(problem):
        return CheckpointError(path, f"not a valid IP-Adapter: {problem}", REDOWNLOAD)

    if not proj or not attn:
        raise bad("needs both image_proj.* and ip_adapter.* tensors")
    key_ids = sorted({int(k.split(".")[0]) for k in attn if k.split(".")[0].isdigit() and ".to_k_ip." in k})
    if not key_ids:
        raise bad("no ip_adapter.<n>.to_k_ip.weight tensors")
    widths, cross = [], set()
    for key_id in key_ids:
        k, v = attn.get(f"{key_id}.to_k_ip.weight"), attn.get(f"{key_id}.to_v_ip.weight")
        if k is None or v is None or len(k) != 2 or k != v:
            raise bad(f"ip_adapter.{key_id}: to_k_ip/to_v_ip missing or of different shapes ({k} vs {v})")
        widths.append(k[0])
        cross.add(k[1])
    if len(cross) != 1:
        raise bad(f"to_k_ip input widths differ across layers: {sorted(cross)}")
    (cross_attention_dim,) = cross

    if "time_embedding.linear_1.weight" in proj:  # InstantX SD 3.5: a Resampler conditioned on the timestep
        return sd3_adapter_spec(path, proj, attn, cross_attention_dim, tuple(widths), bad)
    if f"{key_ids[0]}.to_k_ip.bias" in attn:  # FLUX (XLabs) in diffusers' names: h94's to_k_ip have no bias
        return flux_adapter_spec(path, table)

    if "proj.weight" in proj:  # ImageProjection: Base, Light, Base ViT-G, SDXL base
        variant, consumes = "base", "image_embeds"
        out_dim, embed_dim = _shape2(proj, "proj.weight", bad)
        if out_dim % cross_attention_dim:
            raise bad(f"proj.weight rows {out_dim} are not a multiple of the UNet width {cross_attention_dim}")
        tokens = out_dim // cross_attention_dim
    elif "latents" in proj and "proj_in.weight" in proj:  # Resampler: Plus, Plus Face, composition; InstantID
        variant, consumes = "plus", "hidden_states"
        latents = proj["latents"]
        if len(latents) != 3:
            raise bad(f"latents has shape {latents}, expected [1, tokens, dim]")
        tokens = latents[1]
        embed_dim = _shape2(proj, "proj_in.weight", bad)[1]
        if embed_dim == FACE_EMBED_WIDTH:  # InstantX's InstantID: the same Resampler, fed one ArcFace embedding
            variant, consumes = "instantid", "face_embeds"
        if _shape2(proj, "proj_out.weight", bad)[0] != cross_attention_dim:
            raise bad(f"proj_out rows {proj['proj_out.weight'][0]} differ from UNet width {cross_attention_dim}")
    elif "proj.3.weight" in proj and "proj.0.weight" in proj:  # MLP over all encoder tokens: Full Face
        variant, consumes = "full-face", "hidden_states"
        embed_dim = _shape2(proj, "proj.0.weight", bad)[1]
        tokens = 257  # one per encoder token (256 patches + CLS at 224 px / patch 14), as diffusers assumes
        if proj["proj.3.weight"][0] != cross_attention_dim:
            raise bad(f"proj.3 width {proj['proj.3.weight'][0]} differs from UNet width {cross_attention_dim}")
    elif "norm.weight" in proj and "proj.2.weight" in proj:  # FaceID: an MLP over the face embedding
        return faceid_spec(path, proj, attn, cross_attention_dim, tuple(widths), bad)
    else:
        raise bad(f"unknown image_proj layout (tensors: {sorted(proj)[:6]})")
    encoder_type = "antelopev2" if variant == "instantid" else "clip"
    return AdapterSpec(str(path), variant, consumes, embed_dim, tokens, cross_attention_dim, tuple(widths),
                       encoder_type=encoder_type)  # fmt: skip


# InsightFace's ArcFace embedding width. An h94 Plus Resampler and InstantX's InstantID Resampler have the same
# tensors (latents [1, 16, dim], 4 PerceiverAttention + FeedForward layers, proj_out to the UNet width) but for
# proj_in's input: CLIP / SigLIP hidden states (ViT-L 1024, ViT-H 1280, bigG 1664, SigLIP 1152, even ViT-B 768) vs
# the 512-d face embedding. No vision tower any adapter reads is 512 wide, and FaceID's 512-d MLP (proj.0 / proj.2 /
# norm) has no `latents`: a Resampler whose proj_in reads 512 is InstantID's.
FACE_EMBED_WIDTH = 512


def faceid_spec(path: Path, proj: dict, attn: dict, cross_attention_dim: int, widths: tuple, bad) -> AdapterSpec:
    """FaceID (Base, Plus, Plus v2, Portrait): `proj.0` / `proj.2` / `norm` turn the 512-d face embedding into
    tokens; the Plus family's `perceiver_resampler` also reads CLIP hidden states of the face crop; `<n>.to_q_lora`
    ... hold the LoRA the adapter was trained with. v1 and v2 Plus files have the same tensors, so the version is
    read from the file name (`plusv2` / `v2`), as SD.Next, ComfyUI and diffusers' users do."""
    embed_dim = _shape2(proj, "proj.0.weight", bad)[1]
    out = _shape2(proj, "proj.2.weight", bad)[0]
    if out % cross_attention_dim:
        raise bad(f"proj.2 rows {out} are not a multiple of the UNet width {cross_attention_dim}")
    lora = [shape for key, shape in attn.items() if key.endswith(".to_q_lora.down.weight")]
    rank = lora[0][0] if lora else None
    stem = Path(path).stem.lower()
    if "perceiver_resampler.proj_in.weight" in proj:
        clip_width = _shape2(proj, "perceiver_resampler.proj_in.weight", bad)[1]
        v2 = "plusv2" in stem or "v2" in stem.replace("plusv2", "")
        version, decided = ("v2", "file name contains 'v2'") if v2 else ("v1", "file name has no 'v2'")
        return AdapterSpec(str(path), "faceid-plus", "faceid_embeds", embed_dim, out // cross_attention_dim,
                           cross_attention_dim, widths, rank, clip_width, version, decided)  # fmt: skip
    variant = "faceid-portrait" if out // cross_attention_dim > 4 else "faceid"
    version = decided = None
    if variant == "faceid-portrait" and "unnorm" in stem:  # trained on InsightFace's raw, unnormalised embedding
        version, decided = "unnorm", "file name contains 'unnorm'"
    return AdapterSpec(str(path), variant, "faceid_embeds", embed_dim, out // cross_attention_dim,
                       cross_attention_dim, widths, rank, None, version, decided)  # fmt: skip


def sd3_adapter_spec(path: Path, proj: dict, attn: dict, width: int, widths: tuple, bad) -> AdapterSpec:
    """InstantX's SD3.5-Large-IP-Adapter: `latents` [1, tokens, hidden], `proj_in` [hidden, SigLIP width],
    `proj_out` [block width, hidden], `time_embedding.*`; per joint block `norm_ip` (AdaLN of the time embedding) and
    to_k_ip / to_v_ip reading the projection's output (so of the blocks' own width)."""
    latents = proj.get("latents")
    if latents is None or len(latents) != 3:
        raise bad(f"SD3 image_proj.latents has shape {latents}, expected [1, tokens, dim]")
    embed_dim = _shape2(proj, "proj_in.weight", bad)[1]
    if _shape2(proj, "proj_out.weight", bad)[0] != width:
        raise bad(f"proj_out rows {proj['proj_out.weight'][0]} differ from the to_k_ip input width {width}")
    if not any(k.endswith(".norm_ip.linear.weight") for k in attn):
        raise bad("SD3 adapter without ip_adapter.<n>.norm_ip.linear.weight tensors")
    return AdapterSpec(str(path), "sd3", "hidden_states", embed_dim, latents[1], width, widths,
                       architecture="sd3", encoder_type="siglip")  # fmt: skip


def xlabs_names(table: dict) -> dict:
    """XLabs' key names -> the h94-style names diffusers converts them to (`FluxIPAdapterMixin.load_ip_adapter`);
    other names unchanged. Values (tensor infos, tensors) are passed through."""
    renamed = {}
    for key, info in table.items():
        if key.startswith("ip_adapter_proj_model."):
            key = "image_proj." + key.removeprefix("ip_adapter_proj_model.")
        elif key.startswith("double_blocks."):
            key = ("ip_adapter." + key.removeprefix("double_blocks.").replace("processor.", "")
                   .replace("ip_adapter_double_stream_k_proj", "to_k_ip").replace("ip_adapter_double_stream_v_proj", "to_v_ip"))  # fmt: skip
        renamed[key] = info
    return renamed


def flux_adapter_spec(path: Path, table: dict[str, TensorInfo]) -> AdapterSpec:
    """XLabs' flux-ip-adapter (v1: 4 tokens, v2: 16): `proj` [tokens x T5 width, CLIP ViT-L image_embeds width]
    and `norm`; per double-stream block to_k_ip / to_v_ip (with bias) from T5's width to the block's. The token
    count is the projection's rows over T5's width (diffusers assumes 4 unless the rows are 65536)."""
    proj = {k.removeprefix("image_proj."): v.shape for k, v in table.items() if k.startswith("image_proj.")}
    attn = {k.removeprefix("ip_adapter."): v.shape for k, v in table.items() if k.startswith("ip_adapter.")}

    def bad(problem):
        return CheckpointError(path, f"not a valid FLUX IP-Adapter: {problem}", REDOWNLOAD)

    blocks = sorted({int(k.split(".")[0]) for k in attn if k.split(".")[0].isdigit() and ".to_k_ip." in k})
    if not blocks or blocks != list(range(len(blocks))):
        raise bad("double-stream block tensors missing or not numbered 0..n-1")
    widths, reads = [], set()
    for block in blocks:
        for part in ("to_k_ip", "to_v_ip"):
            weight, bias = attn.get(f"{block}.{part}.weight"), attn.get(f"{block}.{part}.bias")
            if weight is None or len(weight) != 2 or bias != (weight[0],):
                raise bad(f"block {block}: {part} weight {weight} / bias {bias} missing or inconsistent")
        widths.append(attn[f"{block}.to_k_ip.weight"][0])
        reads.add(attn[f"{block}.to_k_ip.weight"][1])
    if len(reads) != 1:
        raise bad(f"to_k_ip input widths differ across blocks: {sorted(reads)}")
    (width,) = reads
    rows, embed_dim = _shape2(proj, "proj.weight", bad)
    if rows % width or proj.get("norm.weight") != (width,):
        raise bad(f"proj rows {rows} / norm {proj.get('norm.weight')} do not fit tokens of width {width}")
    return AdapterSpec(str(path), "flux", "image_embeds", embed_dim, rows // width, width, tuple(widths),
                       architecture="flux")  # fmt: skip


def embeddings_spec(path: Path, table: dict[str, TensorInfo], metadata: dict[str, str]) -> EmbeddingsSpec:
    """Saved embeddings: `positive` and `negative` of equal shape [images, width] or [images, tokens, width]."""
    positive, negative = table.get("positive"), table.get("negative")
    if positive is None or negative is None or positive.shape != negative.shape or len(positive.shape) not in (2, 3):
        raise CheckpointError(path, "saved embeddings need 'positive' and 'negative' tensors of one 2-d or 3-d shape")
    output = metadata.get("output")
    if output not in ("image_embeds", "hidden_states", "faceid_embeds") or (output != "hidden_states") != (len(positive.shape) == 2):
        raise CheckpointError(path, f"saved embeddings: output {output!r} does not match tensor shape {positive.shape}")
    clip, clip_negative = table.get("clip_positive"), table.get("clip_negative")  # FaceID: the face crop's
    if (clip is None) != (clip_negative is None) or (clip is not None and (
            clip.shape != clip_negative.shape or len(clip.shape) != 3 or clip.shape[0] != positive.shape[0])):
        raise CheckpointError(path, "saved face embeddings: 'clip_positive' and 'clip_negative' need one 3-d shape, one "
                                    "row per face")  # fmt: skip
    try:
        hashes = tuple(json.loads(metadata.get("image_hashes", "[]")))
    except ValueError:
        raise CheckpointError(path, "saved embeddings: image_hashes metadata is not JSON") from None
    return EmbeddingsSpec(
        path=str(path),
        output=output,
        width=positive.shape[-1],
        images=positive.shape[0],
        tokens=positive.shape[1] if len(positive.shape) == 3 else None,
        encoder=metadata.get("encoder", "unknown"),
        encoder_architecture=metadata.get("encoder_architecture", "unknown"),
        image_hashes=hashes,
        clip_width=clip.shape[-1] if clip is not None else None,
        face_embedding=metadata.get("face_embedding") if output == "faceid_embeds" else None,
    )


def _shape2(proj, key, bad):
    shape = proj.get(key)
    if shape is None or len(shape) != 2:
        raise bad(f"image_proj.{key} has shape {shape}, expected a 2-d weight")
    return shape


def encoder_spec(path: Path, table: dict[str, TensorInfo], config: dict) -> EncoderSpec:
    """Read a CLIP vision encoder's widths from transformers-named tensors; heads/activation from `config`."""

    def shape(key, ndim):
        return tensor_shape(path, table, key, ndim, "a CLIP vision encoder")

    hidden_size = shape("vision_model.embeddings.class_embedding", 1)[0]
    patch_size = shape("vision_model.embeddings.patch_embedding.weight", 4)[-1]
    positions = shape("vision_model.embeddings.position_embedding.weight", 2)[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise CheckpointError(path, f"{positions} position embeddings is not a square grid plus CLS", REDOWNLOAD)
    num_layers = vision_layer_count(path, table)
    intermediate = shape("vision_model.encoder.layers.0.mlp.fc1.weight", 2)[0]
    projection = table.get("visual_projection.weight")
    projection_dim = projection.shape[0] if projection is not None else None
    family = catalog.family_by_shape(hidden_size, projection_dim, num_layers, intermediate)
    heads = config.get("num_attention_heads") or (family.num_attention_heads if family else max(1, hidden_size // 64))
    act = config.get("hidden_act") or (family.hidden_act if family else "gelu")
    if hidden_size % int(heads):
        raise CheckpointError(path, f"hidden size {hidden_size} is not divisible by {heads} attention heads")
    for key, found in (("hidden_size", hidden_size), ("num_hidden_layers", num_layers)):
        if key in config and config[key] != found:
            raise CheckpointError(path, f"config says {key}={config[key]} but the tensors say {found}", REDOWNLOAD)
    return EncoderSpec(
        path=str(path),
        hidden_size=hidden_size,
        projection_dim=projection_dim,
        num_layers=num_layers,
        image_size=side * patch_size,
        patch_size=patch_size,
        intermediate_size=intermediate,
        num_attention_heads=int(heads),
        hidden_act=str(act),
        architecture=family.name if family else "custom",
    )


def tensor_shape(path: Path, table: dict[str, TensorInfo], key: str, ndim: int, what: str) -> tuple[int, ...]:
    info = table.get(key)
    if info is None or len(info.shape) != ndim:
        raise CheckpointError(path, f"not {what}: {key} missing or not {ndim}-d", REDOWNLOAD)
    return info.shape


def vision_layer_count(path: Path, table: dict[str, TensorInfo]) -> int:
    """How many `vision_model.encoder.layers.<n>` a vision tower has (numbered 0..n-1, or it is damaged)."""
    layer_ids = {int(k.split(".")[3]) for k in table if k.startswith("vision_model.encoder.layers.")}
    if not layer_ids or layer_ids != set(range(max(layer_ids) + 1)):
        raise CheckpointError(path, "vision_model.encoder.layers.* are missing or not numbered 0..n-1", REDOWNLOAD)
    return max(layer_ids) + 1


def with_vision_prefix(table: dict) -> dict:
    """A SiglipVisionModel saved by transformers 5 has no `vision_model.` prefix: give it the published names."""
    if "embeddings.patch_embedding.weight" in table:
        return {f"vision_model.{k}": v for k, v in table.items()}
    return table


def vision_tower_spec(path: Path, table: dict[str, TensorInfo], config: dict) -> EncoderSpec:
    """A CLIP vision encoder, or (no CLS token) a SigLIP one."""
    if "vision_model.embeddings.class_embedding" not in table:
        return siglip_encoder_spec(path, table, config)
    return encoder_spec(path, table, config)


def siglip_encoder_spec(path: Path, table: dict[str, TensorInfo], config: dict) -> EncoderSpec:
    """A SigLIP vision tower (transformers names; a whole SiglipModel's `vision_model.*` too): no CLS token, so the
    position embeddings are a square grid; no visual projection, so it gives hidden states only."""

    def shape(key, ndim):
        return tensor_shape(path, table, key, ndim, "a SigLIP vision tower")

    hidden_size, _, _, patch_size = shape("vision_model.embeddings.patch_embedding.weight", 4)
    positions = shape("vision_model.embeddings.position_embedding.weight", 2)[0]
    side = math.isqrt(positions)
    if side * side != positions:
        raise CheckpointError(path, f"{positions} position embeddings is not a square grid", REDOWNLOAD)
    num_layers = vision_layer_count(path, table)
    intermediate = shape("vision_model.encoder.layers.0.mlp.fc1.weight", 2)[0]
    config = config.get("vision_config", config)  # a whole SiglipModel's config nests the tower's
    family = next((f for f in catalog.SIGLIP_FAMILIES if (f.hidden_size, f.num_layers, f.intermediate_size)
                   == (hidden_size, num_layers, intermediate)), None)  # fmt: skip
    heads = config.get("num_attention_heads") or (family.num_attention_heads if family else max(1, hidden_size // 72))
    if hidden_size % int(heads):
        raise CheckpointError(path, f"hidden size {hidden_size} is not divisible by {heads} attention heads")
    return EncoderSpec(
        path=str(path),
        hidden_size=hidden_size,
        projection_dim=None,
        num_layers=num_layers,
        image_size=side * patch_size,
        patch_size=patch_size,
        intermediate_size=intermediate,
        num_attention_heads=int(heads),
        hidden_act=str(config.get("hidden_act") or (family.hidden_act if family else "gelu_pytorch_tanh")),
        architecture=family.name if family else "custom",
        model_type="siglip",
    )


ENCODER_WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")


def encoder_weights_file(folder: Path) -> Path:
    for name in ENCODER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(folder, f"image encoder folder has no weights file (looked for {ENCODER_WEIGHT_FILES})")


# a model folder's config.json (diffusers `_class_name`, transformers `model_type`) -> (kind, in words)
FOLDER_KINDS = {
    "UNet2DConditionModel": ("diffusion-model", "UNet alone (diffusers folder)"),
    "SD3Transformer2DModel": ("diffusion-model", "SD 3 transformer alone (diffusers folder)"),
    "FluxTransformer2DModel": ("diffusion-model", "FLUX transformer alone (diffusers folder)"),
    "clip_text_model": ("text-encoder", "CLIP text encoder (transformers folder)"),
    "t5": ("text-encoder", "T5 text encoder (transformers folder)"),
}


def probe_config_folder(folder: Path) -> Spec:
    """A model folder with a config.json: a CLIP vision encoder (h94's image_encoder), or another model kind."""
    config = _read_json(folder / "config.json")
    name = config.get("_class_name") or config.get("model_type")
    if name in (None, "clip_vision_model", "siglip_vision_model", "siglip"):
        return probe_encoder_folder(folder, config)
    if name == "AutoencoderKL":
        return VaeSpec(str(folder), "diffusers", int(config.get("latent_channels", 4)))
    if name == "ReduxImageEncoder":
        return probe_redux_folder(folder)
    if name in CONTROLNET_CLASSES:
        return probe_controlnet_folder(folder, name)
    kind, words = FOLDER_KINDS.get(name, ("unknown", f"a {name} folder, not a kind imprompt knows"))
    return OtherModelSpec(str(folder), kind, words)


# diffusers ControlNet classes: read from their tensors; the others are listed with the reason they cannot run
CONTROLNET_CLASSES = ("ControlNetModel", "ControlNetUnionModel", "SD3ControlNetModel", "FluxControlNetModel",
                      "ControlNetXSAdapter", "UNetControlNetXSModel", "T2IAdapter", "MultiAdapter")  # fmt: skip


def probe_controlnet_folder(folder: Path, class_name: str) -> ControlNetSpec:
    """A diffusers ControlNet folder: what its weights' tensors say (the same reading as a single file's)."""
    if class_name in ("ControlNetXSAdapter", "UNetControlNetXSModel"):
        return ControlNetSpec(str(folder), "diffusers", "unet", 0, variant="ControlNet-XS",
                              unsupported=refused_controlnet(folder.name, "a ControlNet-XS"))  # fmt: skip
    if class_name in ("T2IAdapter", "MultiAdapter"):
        return ControlNetSpec(str(folder), "diffusers", "unet", 0, variant="T2I-Adapter", kind="t2i-adapter",
                              unsupported=refused_controlnet(folder.name, "a T2I-Adapter"))  # fmt: skip
    weights = next((folder / n for n in TRANSFORMER_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(folder, f"ControlNet folder has no weights (looked for {TRANSFORMER_WEIGHT_FILES[0]} etc.)",
                              REDOWNLOAD)  # fmt: skip
    spec = controlnet_spec(str(folder), _sharded_table(weights), "diffusers")
    if spec is None:
        raise CheckpointError(weights, f"config.json says {class_name}, but its tensors are not a ControlNet's", REDOWNLOAD)
    return spec


def probe_redux_folder(folder: Path) -> AdapterSpec:
    """diffusers' `ReduxImageEncoder` folder (a prior-redux pipeline's `image_embedder/`): the same tensors as BFL's
    file, so the same spec; its path is the folder (the pipeline's `image_encoder/` sits beside it)."""
    weights = next((folder / n for n in TRANSFORMER_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(folder, f"Redux folder has no weights (looked for {TRANSFORMER_WEIGHT_FILES[0]} etc.)",
                              REDOWNLOAD)  # fmt: skip
    spec = redux(str(folder), _sharded_table(weights), [])
    if spec is None:
        raise CheckpointError(weights, "config.json says ReduxImageEncoder, but its tensors are not redux_up / redux_down",
                              REDOWNLOAD)  # fmt: skip
    return spec


def probe_encoder_folder(folder: Path, config: dict) -> EncoderSpec:
    weights = encoder_weights_file(folder)
    table, _ = read_tensor_table(weights)
    spec = vision_tower_spec(weights, with_vision_prefix(table), config)
    return EncoderSpec(**{**asdict(spec), "path": str(folder)})


UNET_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def probe_pipeline_folder(folder: Path) -> PipelineSpec:
    index = _read_json(folder / "model_index.json")
    if index.get("_class_name") == "FluxPriorReduxPipeline":  # its Redux projection; its SigLIP is listed apart
        return probe_redux_folder(folder / "image_embedder")
    if ARCHITECTURES.get(index.get("_class_name")) in ("sd3", "flux"):
        return probe_transformer_folder(folder, index)
    unet_dir = folder / "unet"
    weights = next((unet_dir / n for n in UNET_WEIGHT_FILES if (unet_dir / n).is_file()), None)
    if weights is None:
        raise CheckpointError(folder, f"pipeline has no UNet weights (looked for unet/{UNET_WEIGHT_FILES[0]} etc.)")
    table, _ = read_tensor_table(weights)
    cross_keys = sorted((k for k in table if k.endswith("attn2.to_k.weight")), key=unet_layer_order)
    if not cross_keys:
        raise CheckpointError(weights, "UNet has no cross-attention layers (no *.attn2.to_k.weight)")
    widths = tuple(table[k].shape[0] for k in cross_keys)
    cross = {table[k].shape[1] for k in cross_keys}
    if len(cross) != 1:
        raise CheckpointError(weights, f"UNet cross-attention input widths differ: {sorted(cross)}")
    unet_config = _read_json(unet_dir / "config.json") if (unet_dir / "config.json").is_file() else {}
    vae_config = _read_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else {}
    text_config = (_read_json(folder / "text_encoder" / "config.json")
                   if (folder / "text_encoder" / "config.json").is_file() else {})  # fmt: skip
    scale = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet_config.get("sample_size", 64)
    return PipelineSpec(
        path=str(folder),
        pipeline_class=index.get("_class_name", "unknown"),
        cross_attention_dim=cross.pop(),
        layer_widths=widths,
        default_size=(sample if isinstance(sample, int) else sample[0]) * scale,
        layer_names=tuple(k.removesuffix(".attn2.to_k.weight") for k in cross_keys),
        in_channels=unet_config.get("in_channels", 4),
        defaults=model_defaults(folder / "imprompt.json"),
        unsupported=folder_unsupported(folder, index.get("_class_name", "unknown"), unet_config.get("in_channels", 4)),
        text_encoder_layers=text_config.get("num_hidden_layers", 0),
    )


TRANSFORMER_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                            "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")  # fmt: skip


def probe_transformer_folder(folder: Path, index: dict) -> PipelineSpec:
    """An SD 3.5 or FLUX pipeline folder: the widths its IP-Adapters must match, from the transformer's tensors
    (sharded or not). SD3: every joint block, of width heads x head_dim, reads image tokens of that width. FLUX:
    the double-stream blocks read image tokens of T5's width (`context_embedder`'s input)."""
    pipeline_class = index["_class_name"]
    architecture = ARCHITECTURES[pipeline_class]
    t_dir = folder / "transformer"
    weights = next((t_dir / n for n in TRANSFORMER_WEIGHT_FILES if (t_dir / n).is_file()), None)
    if weights is None:
        raise CheckpointError(folder, f"pipeline has no transformer weights (looked for transformer/{TRANSFORMER_WEIGHT_FILES[0]} etc.)")
    table = _sharded_table(weights)
    blocks = sorted({int(k.split(".")[1]) for k in table if k.startswith("transformer_blocks.") and k.endswith(".attn.to_k.weight")})
    if not blocks:
        raise CheckpointError(weights, "transformer has no joint blocks (no transformer_blocks.<n>.attn.to_k.weight)")
    widths = tuple(table[f"transformer_blocks.{b}.attn.to_k.weight"].shape[0] for b in blocks)
    context = table.get("context_embedder.weight")
    if context is None or len(context.shape) != 2:
        raise CheckpointError(weights, "transformer has no context_embedder.weight")
    reads = context.shape[1] if architecture == "flux" else widths[0]
    config = _read_json(t_dir / "config.json") if (t_dir / "config.json").is_file() else {}
    vae_config = _read_json(folder / "vae" / "config.json") if (folder / "vae" / "config.json").is_file() else {}
    text_config = (_read_json(folder / "text_encoder" / "config.json")
                   if (folder / "text_encoder" / "config.json").is_file() else {})  # fmt: skip
    scale = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = config.get("sample_size", 128)  # FLUX's transformer has none: diffusers' FluxPipeline uses 128
    in_channels = config.get("in_channels", 16 if architecture == "sd3" else 64)
    return PipelineSpec(
        path=str(folder),
        pipeline_class=pipeline_class,
        cross_attention_dim=reads,
        layer_widths=widths,
        default_size=(sample if isinstance(sample, int) else sample[0]) * scale,
        layer_names=tuple(f"transformer_blocks.{b}" for b in blocks),
        in_channels=in_channels,
        defaults=model_defaults(folder / "imprompt.json"),
        unsupported=transformer_unsupported(folder, architecture, in_channels, index),
        architecture=architecture,
        single_blocks=len({k.split(".")[1] for k in table if k.startswith("single_transformer_blocks.")}),
    )


def transformer_unsupported(folder: Path, architecture: str, in_channels: int, index: dict) -> str | None:
    """SD 3.5 runs without T5 (diffusers allows it: `text_encoder_3: [null, null]`); FLUX needs its T5. Fill /
    Depth / Canny FLUX variants take more input channels than text-to-image."""
    channels = wrong_input_channels(architecture, in_channels)
    if channels:
        return f"model {folder.name} ({folder}) is not a text-to-image model (its {channels}). Choose another model"
    if architecture == "flux" and None in (index.get("text_encoder_2") or [None]):
        return (f"model {folder.name} ({folder}) has no T5 text encoder (text_encoder_2), which FLUX needs. Add "
                f"text_encoder_2/ and tokenizer_2/ from the model's repository")  # fmt: skip
    return None


def _sharded_table(weights: Path) -> dict[str, TensorInfo]:
    """The tensor table of a weights file, or of every shard an `.index.json` names."""
    if weights.name.endswith(".index.json"):
        shards = sorted(set(_read_json(weights).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(weights, "index names no shards (no weight_map)")
        table = {}
        for shard in shards:
            table.update(read_tensor_table(weights.parent / shard)[0])
        return table
    return read_tensor_table(weights)[0]


def folder_unsupported(folder: Path, pipeline_class: str, in_channels: int) -> str | None:
    """Why imprompt cannot run this pipeline folder, in words that name it (None: it can)."""
    if pipeline_class not in SUPPORTED_PIPELINES:
        return (f"model {folder.name} ({folder}) is a {pipeline_class}; imprompt runs "
                f"{' and '.join(SUPPORTED_PIPELINES)} models. Choose another model")  # fmt: skip
    if in_channels != 4:
        kind = {9: "an inpainting model", 8: "an instruct-pix2pix model"}.get(in_channels, "not a text-to-image model")
        return (f"model {folder.name} ({folder}) is {kind} (its UNet takes {in_channels} input channels, "
                f"text-to-image models take 4); imprompt runs text-to-image and image-to-image. Choose another model")  # fmt: skip
    return None


def model_defaults(path: Path) -> dict:
    """`imprompt.json` beside a model: `{"defaults": {"prompt": "", "cfg_scale": 1.5, "ip_scale": 1.0, ...}}`, the
    settings its maker suggests. A file that is not that shape is an error naming the key, so a typo shows."""
    if not path.is_file():
        return {}
    data = _read_json(path).get("defaults", {})
    if not isinstance(data, dict):
        raise CheckpointError(path, "'defaults' must be a JSON object")
    for key, value in data.items():
        kind = MODEL_DEFAULTS.get(key)
        if kind is None:
            raise CheckpointError(path, f"unknown default {key!r}; known: {', '.join(MODEL_DEFAULTS)}")
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
            raise CheckpointError(path, f"default {key!r} must be a {kind.__name__}, got {value!r}")
    return data


# ------------------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "is not a JSON object")
    return data


def _config_from_metadata(metadata: dict[str, str]) -> dict:
    """Single-file encoders may carry their transformers config as JSON under the `config` metadata key."""
    if "config" not in metadata:
        return {}
    try:
        config = json.loads(metadata["config"])
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}
