"""FLUX / SD 3.5 pipelines assembled from their parts' files: ComfyUI's split layout, quantized files, or both.

A transformer alone (`diffusion_models/flux1-dev.safetensors`, `.gguf`) runs with a VAE and text encoders from
other files (`models/parts.py` chose them). Their tensor tables are merged under the all-in-one file's prefixes,
so the config folder is written by the same code as for all-in-one files (`write_transformer_config_folder`); then
each component is loaded by diffusers' own functions on its tensors (`from_single_file` on a state dict,
`create_diffusers_clip_model_from_ldm`, `create_diffusers_t5_model_from_checkpoint`), quantized files as
`loading/quantized.py` reads them, and the pipeline takes its tokenizers and scheduler from the folder. An
all-in-one file with fp8 or scaled-fp8 weights is loaded the same way, each part from its prefix in the one file.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, MissingTokenizerError, UnsupportedError
from ..models.single_file import (
    COMFY_T5_TOKENIZER,
    DIT_SUBFOLDERS,
    DIT_TEXT_ENCODERS,
    T5_TOKENIZER_FIX,
    UNET,
    VAE,
    t5_tokenizer_folder,
    write_transformer_config_folder,
)
from .quantized import (fp8_storage, gguf_table, is_gguf_quantized, keeps_fp8, load_keeping_fp8, quantization_of, read_gguf,
                        read_part)  # fmt: skip
from .tensors import REDOWNLOAD, TensorInfo, read_tensor_table

# part -> its prefix in an all-in-one file (and in the merged table)
PREFIXES = {"transformer": UNET, "vae": VAE, **DIT_TEXT_ENCODERS}
FLUX1_WIDTH = 3072  # the width diffusers' FLUX single-file converter is written for
T5_SKIP = (r"\.wo$",)  # T5's feed-forward output: transformers reads its weight's dtype before calling it


@dataclass(frozen=True)
class PartFile:
    """Where one part's tensors are: a file, and the prefix of their names in it ("" for a part's own file)."""

    path: Path
    prefix: str = ""


def part_files(spec, parts) -> dict[str, PartFile]:
    """part -> where its tensors are: the transformer's file and the chosen parts' files for a split model; the
    prefixes of the one file for an all-in-one model."""
    if parts.files:
        return {"transformer": PartFile(Path(spec.path)),
                **{role: PartFile(Path(entry.path)) for role, entry in parts.files.items()}}  # fmt: skip
    table = part_table(PartFile(Path(spec.path)))
    return {part: PartFile(Path(spec.path), prefix) for part, prefix in PREFIXES.items()
            if any(k.startswith(prefix) for k in table)}  # fmt: skip


def part_table(part: PartFile) -> dict[str, TensorInfo]:
    """A part's tensor table, names without its prefix (GGUF files too: logical shapes)."""
    table = gguf_table(part.path)[0] if part.path.suffix == ".gguf" else read_tensor_table(part.path)[0]
    return {k[len(part.prefix) :]: info for k, info in table.items() if k.startswith(part.prefix)}


def merged_table(files: dict[str, PartFile]) -> dict[str, TensorInfo]:
    """Every part's table under the all-in-one prefixes, as `write_transformer_config_folder` reads one file."""
    return {PREFIXES[part] + name: info for part, where in files.items() for name, info in part_table(where).items()}


def needs_components(spec, parts) -> bool:
    """Whether a pipeline is built part by part here: a split model, or an all-in-one file whose transformer or
    T5 is fp8 / scaled fp8 (kept fp8, or dequantized, which diffusers' whole-file loader does not do)."""
    if parts.files:
        return True
    if not Path(spec.path).is_file() or spec.architecture not in ("flux", "sd3"):
        return False
    table = read_tensor_table(Path(spec.path))[0]
    return any(quantization_of({k: v for k, v in table.items() if k.startswith(PREFIXES[p])}) for p in ("transformer", "t5xxl"))


def t5_tokenizer(spec, files: dict[str, PartFile]) -> Path:
    """T5's tokenizer, which no file holds: from a ComfyUI install around the transformer, or around the T5 file,
    or the Hugging Face cache."""
    for where in (Path(spec.path), files["t5xxl"].path):
        found = t5_tokenizer_folder(where)
        if found is not None:
            return found
    raise MissingTokenizerError(
        f"model {Path(spec.path).stem} ({spec.path}) runs with the T5 text encoder {files['t5xxl'].path}, and T5's "
        f"tokenizer is in no checkpoint: imprompt looked for it in a ComfyUI install around both files "
        f"({COMFY_T5_TOKENIZER}/) and in the Hugging Face cache, and found none. {T5_TOKENIZER_FIX}"
    )


def load_from_parts(cls, spec, files: dict[str, PartFile], dtype: torch.dtype):
    """The pipeline built from its parts' files (see the module docstring)."""
    architecture = spec.architecture
    table = merged_table(files)
    if not any(k.startswith(VAE + "encoder.down.") for k in table):
        raise CheckpointError(files["vae"].path, "VAE is not in the original (LDM) names ae.safetensors uses "
                              "(encoder.down.N.block.M.*)", "Use ComfyUI's ae.safetensors / the model's own VAE file")  # fmt: skip
    t5 = t5_tokenizer(spec, files) if "t5xxl" in files else None
    with tempfile.TemporaryDirectory(prefix="imprompt-config-") as name:
        folder = Path(name)
        write_transformer_config_folder(Path(spec.path), table, folder, architecture, t5)
        components = {"transformer": load_transformer(files["transformer"], folder, architecture, dtype),
                      "vae": load_vae(files["vae"], folder, dtype)}  # fmt: skip
        for role, sub in DIT_SUBFOLDERS[architecture].items():
            if role in files:
                components[sub] = load_text_encoder(role, files[role], folder, sub, dtype, architecture)
            else:  # SD 3 without T5, as diffusers allows
                components.update({sub: None, "tokenizer_3": None})
        pipeline = cls.from_pretrained(str(folder), local_files_only=True, image_encoder=None, feature_extractor=None,
                                       **components)  # fmt: skip
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def load_transformer(where: PartFile, folder: Path, architecture: str, dtype: torch.dtype):
    """The transformer, by diffusers' `from_single_file` on its state dict (or its GGUF file, kept quantized
    through `GGUFQuantizationConfig`); fp8 layers kept fp8 (`quantized.load_keeping_fp8`); a FLUX of another width
    than FLUX.1's converted by imprompt's split of the fused single-stream projection, GGUF rows included."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, SD3Transformer2DModel

    cls = FluxTransformer2DModel if architecture == "flux" else SD3Transformer2DModel
    config = json.loads((folder / "transformer" / "config.json").read_text())
    load = {"config": str(folder), "subfolder": "transformer", "local_files_only": True, "torch_dtype": dtype}
    if where.path.suffix == ".gguf":
        load["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
        state = read_gguf(where.path)
    else:
        quantization = quantization_of(part_table(where))
        state = read_part(where.path, where.prefix, dtype, keep_fp8=keeps_fp8("transformer", quantization))
    any_width = architecture == "flux" and state["img_in.weight"].shape[0] != FLUX1_WIDTH
    if any_width:
        state = flux_checkpoint_at_any_width(state)
    if fp8_storage(state) is None:
        return cls.from_single_file(state, **load)
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    convert = convert_flux_transformer_checkpoint_to_diffusers if architecture == "flux" else convert_sd3_transformer_checkpoint_to_diffusers
    converted = state if any_width else convert(state, config=config)
    with init_empty_weights():
        model = cls.from_config(config)
    return load_keeping_fp8(model, converted, dtype)


def flux_checkpoint_at_any_width(checkpoint: dict) -> dict:
    """A FLUX transformer's tensors (Black Forest Labs' names) in diffusers' names at any width (imprompt goes
    beyond diffusers here). diffusers' converter splits each single-stream block's fused projection (`linear1`:
    q, k, v, then the 4x MLP) at FLUX.1's width, written into it. imprompt splits those rows at the file's width
    (GGUF blocks too: each row is quantized on its own) and hands diffusers a stand-in with as many rows as it
    expects (a broadcast zero, one column) for everything else it converts."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    checkpoint = dict(checkpoint)
    width = checkpoint["img_in.weight"].shape[0]
    fused = {}
    for key in [k for k in checkpoint if k.startswith("single_blocks.") and ".linear1." in k]:
        fused[key] = checkpoint.pop(key)
        checkpoint[key] = torch.zeros((), dtype=torch.float32).expand(7 * FLUX1_WIDTH, *[1] * (fused[key].ndim - 1))
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    for key, tensor in fused.items():
        block, kind = key.split(".")[1], key.rsplit(".", 1)[1]
        q, k, v, mlp = torch.split(tensor, (width, width, width, tensor.shape[0] - 3 * width))
        target = f"single_transformer_blocks.{block}."
        converted.update({f"{target}attn.to_q.{kind}": q, f"{target}attn.to_k.{kind}": k,
                          f"{target}attn.to_v.{kind}": v, f"{target}proj_mlp.{kind}": mlp})  # fmt: skip
    return converted


def load_vae(where: PartFile, folder: Path, dtype: torch.dtype):
    """The VAE (LDM names, as ae.safetensors has them), by diffusers' `AutoencoderKL.from_single_file`."""
    from diffusers import AutoencoderKL

    state = {VAE + k: v for k, v in read_part(where.path, where.prefix, dtype, keep_fp8=False).items()}
    return AutoencoderKL.from_single_file(state, config=str(folder), subfolder="vae", local_files_only=True,
                                          torch_dtype=dtype)  # fmt: skip


def load_text_encoder(role: str, where: PartFile, folder: Path, sub: str, dtype: torch.dtype, architecture: str):
    """A CLIP tower by diffusers' `create_diffusers_clip_model_from_ldm` (given its own tensors alone, so a
    bigG as wide as CLIP-L is not mistaken for it), T5 by `create_diffusers_t5_model_from_checkpoint`, or, when
    T5's file is fp8, built here with its fp8 layers kept fp8."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if where.path.suffix == ".gguf":  # `models/parts.py` refuses it in the plan; this guards other callers
        raise UnsupportedError(f"text_encoders: {where.path} is a GGUF {role} text encoder, and imprompt reads text "
                               f"encoders from safetensors files only. Use t5xxl_fp16.safetensors or "
                               f"t5xxl_fp8_e4m3fn.safetensors (clip_l.safetensors for CLIP-L)")  # fmt: skip
    keep = keeps_fp8(role, quantization_of(part_table(where)))
    state = read_part(where.path, where.prefix, dtype, keep_fp8=keep)
    if keep and fp8_storage(state) is not None:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = T5EncoderModel(T5Config.from_pretrained(folder / sub))
        if "encoder.embed_tokens.weight" not in state:  # tied to `shared` in transformers' model
            state["encoder.embed_tokens.weight"] = state["shared.weight"]
        model = load_keeping_fp8(model, state, dtype, T5_SKIP)
        model.tie_weights()  # one embedding for `shared` and `encoder.embed_tokens`, as transformers' own loading
        if dtype == torch.float16:  # as diffusers' T5 loader: the feed-forward output in float32
            for module in model.modules():
                if type(module).__name__.endswith("DenseGatedActDense") or type(module).__name__.endswith("DenseActDense"):
                    module.wo.float()
        return model
    checkpoint = {DIT_TEXT_ENCODERS[role] + k: v for k, v in state.items()}
    if role == "t5xxl":
        model = create_diffusers_t5_model_from_checkpoint(T5EncoderModel, checkpoint, subfolder=sub, config=str(folder),
                                                          torch_dtype=dtype, local_files_only=True)  # fmt: skip
        model.tie_weights()  # diffusers' loader leaves `encoder.embed_tokens` a second copy of `shared` (T5-XXL: 0.26 GB)
        return model.eval()
    cls = CLIPTextModelWithProjection if architecture == "sd3" else CLIPTextModel  # as each pipeline's config names
    if not any(k.endswith("embeddings.position_embedding.weight") for k in checkpoint):
        raise CheckpointError(where.path, f"no CLIP text model in it for {role}", REDOWNLOAD)
    return create_diffusers_clip_model_from_ldm(cls, checkpoint, subfolder=sub, config=str(folder),
                                                torch_dtype=dtype, local_files_only=True)  # fmt: skip


def has_gguf_parameters(module: torch.nn.Module) -> bool:
    """Whether a module holds GGUF-quantized weights (kept quantized in memory)."""
    return any(is_gguf_quantized(p) for p in module.parameters())
