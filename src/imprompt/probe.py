"""Checkpoint -> spec, read from the tensor table alone.

A safetensors header (a few KB of JSON) says everything compatibility needs: which IP-Adapter variant a file is,
which encoder output it consumes and how wide, how many tokens it adds, and which UNet width it targets. Nothing
here reads tensor data, so probing a 3 GB encoder costs a millisecond. Pickles (`.bin`, `.pt`) are opened with
`weights_only=True` and memory-mapped, so their code never runs and their data is not read either.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import catalog
from .errors import CheckpointError, UnsafeCheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


# --------------------------------------------------------------------------------------------------- tensor tables


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check a safetensors header: every entry has a known dtype and lies inside the file."""
    path = Path(path)
    size = _file_size(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"truncated safetensors file ({size} bytes, no header)", _REDOWNLOAD)
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    path, f"safetensors header claims {header_len} bytes but the file has {size}", _REDOWNLOAD
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(path, f"safetensors header is not valid JSON ({_first_line(exc)})", _REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object", _REDOWNLOAD)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(path, "safetensors __metadata__ must map strings to strings", _REDOWNLOAD)
    data_len = size - 8 - header_len
    table = {}
    for name, entry in header.items():
        table[name] = _checked_entry(path, name, entry, data_len)
    return table, metadata


def _checked_entry(path, name, entry, data_len) -> TensorInfo:
    def bad(problem):
        return CheckpointError(path, f"tensor {name!r}: {problem}", _REDOWNLOAD)

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise bad(f"data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise bad(f"data [{begin}, {end}) lies outside the file's {data_len} data bytes (truncated file?)")
    if end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
        raise bad(f"shape {shape} of {dtype} needs {math.prod(shape) * _DTYPE_BYTES[dtype]} bytes, has {end - begin}")
    return TensorInfo(dtype, tuple(shape))


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        duplicated = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate keys {duplicated}")
    return dict(pairs)


def load_pickle(path: Path, mmap: bool = False):
    """torch.load with `weights_only=True`: tensors and plain containers only; anything else is refused unrun."""
    import torch

    path = Path(path)
    _file_size(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is None:  # the weights-only unpickler met bytes that are no pickle opcode: damage, not code
            detail = next((line for line in lines if "Unsupported" in line or "error" in line), _first_line(exc))
            raise CheckpointError(path, f"corrupt pickle checkpoint ({detail})", _REDOWNLOAD) from None
        raise UnsafeCheckpointError(
            path,
            f"pickle checkpoint carries code or objects other than tensors and was refused without running it "
            f"({refused})",
            "Use the .safetensors version of this file",
        ) from None
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # legacy (non-zip) pickle format cannot be memory-mapped
            return load_pickle(path, mmap=False)
        raise CheckpointError(path, f"cannot read pickle checkpoint ({_first_line(exc)})", _REDOWNLOAD) from None
    except Exception as exc:  # torch.load on damaged bytes raises many types (IndexError, EOFError, KeyError...)
        raise CheckpointError(
            path, f"cannot read pickle checkpoint ({type(exc).__name__}: {_first_line(exc)})", _REDOWNLOAD
        ) from None


def flatten_state_dict(obj, prefix: str = "") -> dict:
    """{"image_proj": {"proj.weight": t}} -> {"image_proj.proj.weight": t}; non-tensor leaves are dropped."""
    import torch

    flat = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            flat.update(flatten_state_dict(value, f"{prefix}{key}."))
    elif isinstance(obj, torch.Tensor):
        flat[prefix[:-1]] = obj
    return flat


def read_tensor_table(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Names, dtypes and shapes of a checkpoint's tensors, plus safetensors metadata (empty for pickles)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors_header(path)
    if path.suffix in WEIGHT_SUFFIXES:
        flat = flatten_state_dict(load_pickle(path, mmap=True))
        return {k: TensorInfo(str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in flat.items()}, {}
    raise CheckpointError(path, f"unknown checkpoint extension {path.suffix!r}, expected one of {WEIGHT_SUFFIXES}")


# --------------------------------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class AdapterSpec:
    """An IP-Adapter as its tensors describe it."""

    path: str
    variant: str  # base | plus | full-face | faceid | faceid-plus
    consumes: str  # image_embeds | hidden_states | faceid_embeds
    embed_dim: int  # width of the encoder output it consumes
    tokens: int  # image tokens it adds to cross-attention
    cross_attention_dim: int  # UNet width it targets
    layer_widths: tuple[int, ...] = field(repr=False)  # per cross-attention layer, in UNet processor order
    kind: str = "ip-adapter"

    @property
    def family(self) -> str:
        return catalog.unet_family(self.cross_attention_dim)

    @property
    def needs(self) -> str:
        """What it consumes, in words: `image_embeds[1024]`."""
        return f"{self.consumes}[{self.embed_dim}]"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = len(d.pop("layer_widths"))
        d["family"] = self.family
        return d


@dataclass(frozen=True)
class EncoderSpec:
    """A CLIP vision encoder as its tensors (and, for folders, its config) describe it."""

    path: str
    hidden_size: int
    projection_dim: int | None  # None: no visual projection, so no image_embeds
    num_layers: int
    image_size: int
    patch_size: int
    intermediate_size: int
    num_attention_heads: int
    hidden_act: str
    architecture: str  # ViT-L-14 | ViT-H-14 | ViT-bigG-14 | custom
    kind: str = "image-encoder"

    def produces(self, output: str) -> int | None:
        """Width of `output` ("image_embeds" | "hidden_states") this encoder gives, or None."""
        return self.projection_dim if output == "image_embeds" else self.hidden_size

    def transformers_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            projection_dim=self.projection_dim or self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PipelineSpec:
    """A diffusers pipeline folder: its class and the UNet cross-attention layout adapters must match."""

    path: str
    pipeline_class: str
    cross_attention_dim: int
    layer_widths: tuple[int, ...] = field(repr=False)
    default_size: int
    layer_names: tuple[str, ...] = field(default=(), repr=False)  # "down_blocks.2.attentions.1.transformer_blocks.0"
    kind: str = "pipeline"

    @property
    def family(self) -> str:
        return catalog.unet_family(self.cross_attention_dim)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cross_attention_layers"] = len(d.pop("layer_widths"))
        d.pop("layer_names")
        d["family"] = self.family
        return d


@dataclass(frozen=True)
class EmbeddingsSpec:
    """Saved image embeddings (`imprompt embed`): which encoder output they are, so they pair like an encoder."""

    path: str
    output: str  # image_embeds | hidden_states
    width: int
    images: int  # sets of tokens (1 when averaged)
    tokens: int | None  # hidden-state tokens per image; None for image_embeds
    encoder: str
    encoder_architecture: str
    image_hashes: tuple[str, ...]
    kind: str = "ip-embeddings"

    @property
    def gives(self) -> str:
        return f"{self.output}[{self.width}]"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_hashes"] = list(self.image_hashes)
        return d


EMBEDDINGS_FORMAT = "imprompt.ip-embeddings.v1"

Spec = AdapterSpec | EncoderSpec | PipelineSpec | EmbeddingsSpec


def probe(path) -> Spec:
    """What is at `path`: an IP-Adapter file, an image encoder (file or folder), or a pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return probe_pipeline_folder(path)
        if (path / "config.json").is_file():
            return probe_encoder_folder(path)
        raise CheckpointError(
            path,
            "is a folder, but neither a diffusers pipeline (model_index.json) nor an image encoder (config.json)",
            "Point at the checkpoint file itself, or at a folder with its config",
        )
    table, metadata = read_tensor_table(path)
    if metadata.get("format") == EMBEDDINGS_FORMAT:
        return embeddings_spec(path, table, metadata)
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in table):
        return adapter_spec(path, table)
    if "vision_model.embeddings.patch_embedding.weight" in table:
        return encoder_spec(path, table, _config_from_metadata(metadata))
    from .single_file import is_single_file_checkpoint, single_file_spec

    if is_single_file_checkpoint(table):
        return single_file_spec(path, table)
    raise CheckpointError(
        path,
        f"is not an IP-Adapter (image_proj.* / ip_adapter.*), a CLIP vision encoder (vision_model.*) or a "
        f"Stable Diffusion checkpoint (model.diffusion_model.*); first tensors: {sorted(table)[:3]}",
    )


def adapter_spec(path: Path, table: dict[str, TensorInfo]) -> AdapterSpec:
    """Read variant, consumed output, token count and UNet layout from an h94-format tensor table."""
    proj = {k.removeprefix("image_proj."): v.shape for k, v in table.items() if k.startswith("image_proj.")}
    attn = {k.removeprefix("ip_adapter."): v.shape for k, v in table.items() if k.startswith("ip_adapter.")}

    def bad(problem):
        return CheckpointError(path, f"not a valid IP-Adapter: {problem}", _REDOWNLOAD)

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

    if "proj.weight" in proj:  # ImageProjection: Base, Light, Base ViT-G, SDXL base
        variant, consumes = "base", "image_embeds"
        out_dim, embed_dim = _shape2(proj, "proj.weight", bad)
        if out_dim % cross_attention_dim:
            raise bad(f"proj.weight rows {out_dim} are not a multiple of the UNet width {cross_attention_dim}")
        tokens = out_dim // cross_attention_dim
    elif "latents" in proj and "proj_in.weight" in proj:  # Resampler: Plus, Plus Face, composition
        variant, consumes = "plus", "hidden_states"
        latents = proj["latents"]
        if len(latents) != 3:
            raise bad(f"latents has shape {latents}, expected [1, tokens, dim]")
        tokens = latents[1]
        embed_dim = _shape2(proj, "proj_in.weight", bad)[1]
        if _shape2(proj, "proj_out.weight", bad)[0] != cross_attention_dim:
            raise bad(f"proj_out rows {proj['proj_out.weight'][0]} differ from UNet width {cross_attention_dim}")
    elif "proj.3.weight" in proj and "proj.0.weight" in proj:  # MLP over all encoder tokens: Full Face
        variant, consumes = "full-face", "hidden_states"
        embed_dim = _shape2(proj, "proj.0.weight", bad)[1]
        tokens = 257  # one per encoder token (256 patches + CLS at 224 px / patch 14), as diffusers assumes
        if proj["proj.3.weight"][0] != cross_attention_dim:
            raise bad(f"proj.3 width {proj['proj.3.weight'][0]} differs from UNet width {cross_attention_dim}")
    elif "perceiver_resampler.proj_in.weight" in proj:
        variant, consumes = "faceid-plus", "faceid_embeds"
        embed_dim = _shape2(proj, "proj.0.weight", bad)[1]
        tokens = 4
    elif "norm.weight" in proj and "proj.2.weight" in proj:
        variant, consumes = "faceid", "faceid_embeds"
        embed_dim = _shape2(proj, "proj.0.weight", bad)[1]
        tokens = _shape2(proj, "proj.2.weight", bad)[0] // cross_attention_dim
    else:
        raise bad(f"unknown image_proj layout (tensors: {sorted(proj)[:6]})")
    return AdapterSpec(str(path), variant, consumes, embed_dim, tokens, cross_attention_dim, tuple(widths))


def embeddings_spec(path: Path, table: dict[str, TensorInfo], metadata: dict[str, str]) -> EmbeddingsSpec:
    """Saved embeddings: `positive` and `negative` of equal shape [images, width] or [images, tokens, width]."""
    positive, negative = table.get("positive"), table.get("negative")
    if positive is None or negative is None or positive.shape != negative.shape or len(positive.shape) not in (2, 3):
        raise CheckpointError(path, "saved embeddings need 'positive' and 'negative' tensors of one 2-d or 3-d shape")
    output = metadata.get("output")
    if output not in ("image_embeds", "hidden_states") or (output == "image_embeds") != (len(positive.shape) == 2):
        raise CheckpointError(path, f"saved embeddings: output {output!r} does not match tensor shape {positive.shape}")
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
    )


def _shape2(proj, key, bad):
    shape = proj.get(key)
    if shape is None or len(shape) != 2:
        raise bad(f"image_proj.{key} has shape {shape}, expected a 2-d weight")
    return shape


def encoder_spec(path: Path, table: dict[str, TensorInfo], config: dict) -> EncoderSpec:
    """Read a CLIP vision encoder's widths from transformers-named tensors; heads/activation from `config`."""

    def shape(key, ndim):
        info = table.get(key)
        if info is None or len(info.shape) != ndim:
            raise CheckpointError(path, f"not a CLIP vision encoder: {key} missing or not {ndim}-d", _REDOWNLOAD)
        return info.shape

    hidden_size = shape("vision_model.embeddings.class_embedding", 1)[0]
    patch_size = shape("vision_model.embeddings.patch_embedding.weight", 4)[-1]
    positions = shape("vision_model.embeddings.position_embedding.weight", 2)[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise CheckpointError(path, f"{positions} position embeddings is not a square grid plus CLS", _REDOWNLOAD)
    layer_ids = {int(k.split(".")[3]) for k in table if k.startswith("vision_model.encoder.layers.")}
    if not layer_ids or layer_ids != set(range(max(layer_ids) + 1)):
        raise CheckpointError(path, "vision_model.encoder.layers.* are missing or not numbered 0..n-1", _REDOWNLOAD)
    intermediate = shape("vision_model.encoder.layers.0.mlp.fc1.weight", 2)[0]
    projection = table.get("visual_projection.weight")
    projection_dim = projection.shape[0] if projection is not None else None
    num_layers = max(layer_ids) + 1
    family = catalog.family_by_shape(hidden_size, projection_dim, num_layers, intermediate)
    heads = config.get("num_attention_heads") or (family.num_attention_heads if family else max(1, hidden_size // 64))
    act = config.get("hidden_act") or (family.hidden_act if family else "gelu")
    if hidden_size % int(heads):
        raise CheckpointError(path, f"hidden size {hidden_size} is not divisible by {heads} attention heads")
    for key, found in (("hidden_size", hidden_size), ("num_hidden_layers", num_layers)):
        if key in config and config[key] != found:
            raise CheckpointError(path, f"config says {key}={config[key]} but the tensors say {found}", _REDOWNLOAD)
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


ENCODER_WEIGHT_FILES = ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")


def encoder_weights_file(folder: Path) -> Path:
    for name in ENCODER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(folder, f"image encoder folder has no weights file (looked for {ENCODER_WEIGHT_FILES})")


def probe_encoder_folder(folder: Path) -> EncoderSpec:
    config = _read_json(folder / "config.json")
    if config.get("model_type") not in ("clip_vision_model", None):
        raise CheckpointError(folder, f"config.json model_type is {config.get('model_type')!r}, not clip_vision_model")
    weights = encoder_weights_file(folder)
    table, _ = read_tensor_table(weights)
    spec = encoder_spec(weights, table, config)
    return EncoderSpec(**{**asdict(spec), "path": str(folder)})


UNET_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def probe_pipeline_folder(folder: Path) -> PipelineSpec:
    index = _read_json(folder / "model_index.json")
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
    scale = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet_config.get("sample_size", 64)
    return PipelineSpec(
        path=str(folder),
        pipeline_class=index.get("_class_name", "unknown"),
        cross_attention_dim=cross.pop(),
        layer_widths=widths,
        default_size=(sample if isinstance(sample, int) else sample[0]) * scale,
        layer_names=tuple(k.removesuffix(".attn2.to_k.weight") for k in cross_keys),
    )


def unet_layer_order(name: str):
    """Sort key matching `UNet2DConditionModel.attn_processors` order: down blocks, up blocks, then mid block."""
    parts = name.split(".")
    group = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}.get(parts[0], 3)
    return group, tuple(int(p) for p in parts if p.isdigit())


# ------------------------------------------------------------------------------------------------------- helpers

_REDOWNLOAD = "Download the file again, or remove it from the models folder"


def _file_size(path: Path) -> int:
    """The size of a regular file; anything else (folder, FIFO, device) is refused before it is opened."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(path, "is a directory, expected a checkpoint file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(path, "is not a regular file (a pipe, socket or device?); expected a checkpoint file")
    return st.st_size


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(path, f"cannot read JSON ({_first_line(exc)})") from None
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
