"""The memory plan: where a pipeline's weights live when the device cannot hold them all, chosen before it loads.

Four plans, in order of preference (each slower than the one before, each holding less on the device):
- "none": every component on the device (the fastest; what a model that fits gets).
- "encoders": the text encoders stay in CPU memory and encode the prompt there; only the embeddings move to the
  device (SD 3.x / FLUX, whose T5 is 9.5 GB in bf16 and runs once a request). Costs the text encoding on the CPU
  (seconds for T5-XXL) and nothing per step.
- "model": diffusers' `enable_model_cpu_offload`: each component moves whole to the device when it runs and back
  after. Costs the transfer of the denoiser (24 GB for FLUX dev in bf16: about a second over PCIe 4) per image.
- "group": diffusers' `enable_group_offload`, block by block (with CUDA streams: the next block is copied while
  this one computes). Holds a few blocks at a time; costs the transfer of every block at every step.
The choice is pure (`choose_plan`): from the device's total memory (never the memory free at the moment, which
depends on what else is resident: see `EngineState.memory_plan`), the components' sizes as they will sit in memory
(read from the files' tensor tables before anything loads: `estimate_sizes`), and the activations' margin. diffusers
has the offloading mechanisms; choosing among them from the files' sizes is imprompt's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RequestError, UnsupportedError
from .quantized import FP8 as FP8_DTYPES
from .quantized import fp8_kept, keeps_fp8, quantization_of
from .split_files import (
    FLUX1_WIDTH,
    T5_SKIP,
    flux_checkpoint_at_any_width,
    merged_table,
    needs_components,
    part_files,
    part_table,
)
from .tensors import read_tensor_table

MODES = ("none", "encoders", "model", "group")
CHOICES = ("auto", *MODES)
TRANSFORMERS = ("sd3", "flux")  # the families whose pipelines take finished prompt embeddings from imprompt's CPU


@dataclass(frozen=True)
class MemoryPlan:
    """A pipeline's memory plan: the mode, why it was chosen, and the weights it holds on the device at its peak
    (all of them for "none"; the denoiser and VAE for "encoders"; the largest component for "model"; a few blocks
    of each for "group")."""

    mode: str
    why: str
    on_device_bytes: int
    sizes: dict = field(default_factory=dict, compare=False)  # component -> bytes, as planned from

    @property
    def encoders_on_cpu(self) -> bool:
        """Whether prompts are encoded in CPU memory (the text encoders stay there): "encoders" keeps them there;
        "model" and "group" bring them to the device themselves when they run."""
        return self.mode == "encoders"

    def describe(self) -> dict:
        return {"plan": self.mode, "why": self.why, "on_device_bytes": self.on_device_bytes}


NO_PLAN = MemoryPlan("none", "every component on the device", 0)


def check_mode(mode: str | None) -> str:
    """An `offload` setting: auto (or None) or one of MODES."""
    mode = "auto" if mode in (None, "") else str(mode).lower()
    if mode not in CHOICES:
        raise RequestError(f"offload: {mode!r} is not a memory plan; use one of {', '.join(CHOICES)}")
    return mode


def is_encoder(component: str) -> bool:
    return component.startswith("text_encoder")


def gib(nbytes: int) -> str:
    """Bytes as the plan's reasons say them: GiB, or MiB under one."""
    return f"{nbytes / 2**30:.2f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def choose_plan(free_bytes: int, sizes: dict[str, int], forced: str = "auto", *, activation_bytes: int = 0,
                group_bytes: dict[str, int] | None = None, device_type: str = "cuda",
                encoders_apart: bool = True) -> MemoryPlan:  # fmt: skip
    """The plan for a pipeline whose components take `sizes` (component -> bytes as held in memory) on a device
    with `free_bytes` for it, keeping `activation_bytes` for a generation's activations. `group_bytes`: what each
    component holds on the device at once under group offload (default: an eighth of it). `encoders_apart`: whether
    the family can encode on the CPU and move the embeddings (SD 3.x / FLUX); `forced`: the user's `offload`.
    On the CPU the plan is "none" unless forced: the weights are in the machine's memory already. A forced "encoders"
    on SD 1.5 / SDXL (which cannot encode apart) runs "none", saying why. `free_bytes` is the device's total memory
    (`EngineState.memory_plan`), not what is free now, so the choice depends on the request alone."""
    forced = check_mode(forced)
    total = sum(sizes.values())
    encoders = sum(v for k, v in sizes.items() if is_encoder(k))
    group_bytes = group_bytes or {}
    need = {
        "none": total,
        "encoders": total - encoders,
        "model": max(sizes.values(), default=0),
        "group": sum(group_bytes.get(k, v // 8) for k, v in sizes.items()),
    }
    room = free_bytes - activation_bytes
    if forced == "encoders" and not encoders_apart:  # an engine-wide setting must not refuse whole families
        return MemoryPlan("none", "offload=encoders is for SD 3.x and FLUX models, whose prompts imprompt can encode "
                                  "apart; this model encodes its prompt with A1111's reading on the device, so every "
                                  f"component stays there ({gib(total)})", total, dict(sizes))  # fmt: skip
    if forced != "auto":
        fits = "fits" if need[forced] <= room else "does not fit"
        why = (f"forced (offload={forced}): {gib(need[forced])} on the device at its peak, which {fits} the "
               f"{gib(max(room, 0))} left for the model")  # fmt: skip
        return MemoryPlan(forced, why, need[forced], dict(sizes))
    if device_type == "cpu":
        return MemoryPlan("none", "the device is the CPU: the weights are in the machine's memory already, there is "
                                  "no faster memory to keep them out of", total, dict(sizes))  # fmt: skip
    margin = f"{gib(free_bytes)} on the device less {gib(activation_bytes)} for activations"
    if need["none"] <= room:
        return MemoryPlan("none", f"all {gib(total)} fits ({margin})", total, dict(sizes))
    if encoders and encoders_apart and need["encoders"] <= room:
        why = (f"all of it ({gib(total)}) does not fit ({margin}); without its text encoders ({gib(encoders)}, kept "
               f"on the CPU, which encodes the prompt) it is {gib(need['encoders'])}")  # fmt: skip
        return MemoryPlan("encoders", why, need["encoders"], dict(sizes))
    if need["model"] <= room:
        largest = max(sizes, key=sizes.get)
        why = (f"all of it ({gib(total)}) does not fit ({margin}), nor without its text encoders; its largest "
               f"component ({largest}, {gib(need['model'])}) does, so each moves to the device as it runs")  # fmt: skip
        return MemoryPlan("model", why, need["model"], dict(sizes))
    fits = "fits" if need["group"] <= room else "still does not fit: expect running out of device memory"
    why = (f"not even its largest component ({gib(need['model'])}) fits ({margin}); block by block it holds "
           f"{gib(need['group'])} at once, which {fits}")  # fmt: skip
    return MemoryPlan("group", why, need["group"], dict(sizes))


# ------------------------------------------------------------------------------------------ sizes before loading

FLOATS = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
FP8 = {"F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2"}
INTEGERS = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "int64": 8, "int32": 4, "int16": 2,
            "int8": 1, "uint8": 1, "bool": 1}  # fmt: skip
# single-file prefixes -> component; a transformer-alone file (ComfyUI's diffusion_models/) is bare: the denoiser
PREFIXES = (("model.diffusion_model.", "denoiser"), ("first_stage_model.", "vae"), ("vae.", "vae"),
            ("cond_stage_model.", "text_encoder"), ("conditioner.embedders.0.", "text_encoder"),
            ("conditioner.embedders.1.", "text_encoder_2"), ("text_encoders.clip_l.", "text_encoder.clip_l"),
            ("text_encoders.clip_g.", "text_encoder.clip_g"), ("text_encoders.t5xxl.", "text_encoder.t5xxl"))  # fmt: skip
TIED = "encoder.embed_tokens.weight"
T5_WO = re.compile(r"\.wo\.weight$")  # T5's feed-forward output (`DenseReluDense.wo`)
BLOCK = re.compile(r"^(.*?\.\d+)\.")  # the first numbered module of a name: a block group offload moves at once


def tensor_bytes(dtype: str, numel: int, held: torch.dtype, fp8_kept: bool) -> int:
    """Bytes a tensor takes as it will be held: floating point in the compute dtype `held`; fp8 as stored where the
    loader keeps it fp8 (`fp8_kept`), else in `held`; GGUF's quantized blocks as stored (diffusers keeps them so);
    integers as stored."""
    element = torch.empty((), dtype=held).element_size()
    if dtype in FLOATS:
        return numel * element
    if dtype in FP8:
        return numel * (1 if fp8_kept else element)
    if dtype in INTEGERS:
        return numel * INTEGERS[dtype]
    try:  # a GGML type name ("Q8_0", "Q4_K"): blocks of `block` values in `size` bytes
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[dtype]]
        return -(-numel // block) * size
    except (ImportError, KeyError):
        return numel * element


@dataclass
class Sizes:
    """What each component holds in memory, and what it holds at once under group offload (its largest block
    twice, as a stream copies the next while one runs, plus what sits outside the blocks)."""

    total: dict = field(default_factory=dict)
    blocks: dict = field(default_factory=dict)  # component -> block name -> bytes

    def add(self, component: str, name: str, nbytes: int) -> None:
        self.total[component] = self.total.get(component, 0) + nbytes
        found = BLOCK.match(name)
        block = found.group(1) if found else ""
        held = self.blocks.setdefault(component, {})
        held[block] = held.get(block, 0) + nbytes

    def group(self, streams: bool) -> dict:
        result = {}
        for component, held in self.blocks.items():
            if component == "vae":  # kept whole on the device (`place`)
                result[component] = self.total[component]
                continue
            outside = held.get("", 0)
            largest = max((v for k, v in held.items() if k), default=0)
            result[component] = min(self.total[component], outside + largest * (2 if streams else 1))
        return result


def weight_files(folder: Path) -> list[Path]:
    """A component folder's weights as diffusers loads them: safetensors over pickles, the plain ones over
    variants (`.fp16.safetensors`) where both are there."""
    for suffix in (".safetensors", ".bin"):
        files = sorted(f for f in folder.glob(f"*{suffix}") if f.is_file())
        plain = [f for f in files if "." not in f.name[: -len(suffix)]]
        if plain or files:
            return plain or files
    return []


def add_file(sizes: Sizes, path: Path, held: torch.dtype, component: str | None, done: dict | None = None) -> None:
    """One file's tensors into `sizes`: all of it as `component`, or by the single-file prefixes (None). Components
    in `done` (sized by `fp8_held`) are left out. fp8 tensors count upcast: only `fp8_held`'s parts stay fp8."""
    try:
        table, _ = read_tensor_table(path)
    except Exception:  # a format the table reader does not know yet: its size on disk is the best estimate
        sizes.add(component or "denoiser", "", path.stat().st_size)
        return
    for name, info in table.items():
        if name.endswith(TIED) and name[: -len(TIED)] + "shared.weight" in table:
            continue  # T5's token embedding, saved twice in some files, is one tensor in memory
        where, local = component, name
        if where is None:
            where = "denoiser"
            for prefix, named in PREFIXES:
                if name.startswith(prefix):
                    where, local = named, name[len(prefix):]
                    break
        if where in (done or {}):
            continue
        nbytes = tensor_bytes(info.dtype, numel_of(info.shape), held, False)
        if held == torch.float16 and T5_WO.search(local):
            nbytes *= 2  # T5's feed-forward output in float32 (transformers' `_keep_in_fp32_modules`, diffusers' loader)
        sizes.add(where, local, nbytes)


def numel_of(shape) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel


def fp8_held(spec, parts, held: torch.dtype) -> dict[str, dict[str, int]]:
    """The parts loaded with fp8 layers kept fp8 (the transformer, T5: `quantized.keeps_fp8`), each tensor's bytes
    as the loader holds them: the parts' tensors in the names the loader fills (diffusers' converter run on meta
    tensors), and the model built on the meta device, asked which layers stay fp8 by the loader's own rule
    (`quantized.fp8_kept`: diffusers' skip patterns upcast FLUX's AdaLN layers and T5's `wo`). component -> name ->
    bytes; {} where no part keeps fp8 (the other parts are counted from their tables)."""
    if not Path(spec.path).is_file() or spec.architecture not in TRANSFORMERS or not needs_components(spec, parts):
        return {}
    files = part_files(spec, parts)
    tables = {role: part_table(where) for role, where in files.items() if where.path.suffix != ".gguf"}
    keep = [role for role in ("transformer", "t5xxl") if role in tables and keeps_fp8(role, quantization_of(tables[role]))]
    if not keep:
        return {}
    import tempfile

    from accelerate import init_empty_weights

    from ..models.single_file import DIT_SUBFOLDERS, write_transformer_config_folder

    result = {}
    with tempfile.TemporaryDirectory(prefix="imprompt-plan-") as name:
        folder = Path(name)
        write_transformer_config_folder(Path(spec.path), merged_table(files), folder, spec.architecture, None)
        for role in keep:
            state = {k: torch.empty(info.shape, dtype=FP8_DTYPES.get(info.dtype, held), device="meta")
                     for k, info in tables[role].items() if info.dtype in FP8_DTYPES or info.dtype in FLOATS}  # fmt: skip
            others = {k: tensor_bytes(info.dtype, numel_of(info.shape), held, False) for k, info in tables[role].items()
                      if k not in state}  # fmt: skip
            with init_empty_weights():
                if role == "transformer":
                    model, state = meta_transformer(spec.architecture, folder, state)
                    skip = ()
                else:
                    from transformers import T5Config, T5EncoderModel

                    model = T5EncoderModel(T5Config.from_pretrained(folder / DIT_SUBFOLDERS[spec.architecture][role]))
                    state.pop(TIED, None)  # tied to `shared` as the loader ties it: one tensor
                    skip = T5_SKIP
            kept = fp8_kept(model, {k: t.dtype for k, t in state.items()}, skip)
            element = torch.empty((), dtype=held).element_size()
            sizes = {k: t.numel() * (1 if k in kept else element) for k, t in state.items()}
            if role == "t5xxl" and held == torch.float16:  # the loader keeps T5's feed-forward output in float32
                sizes.update({k: t.numel() * 4 for k, t in state.items() if T5_WO.search(k)})
            result["denoiser" if role == "transformer" else f"text_encoder.{role}"] = {**sizes, **others}
    return result


def meta_transformer(architecture: str, folder: Path, state: dict):
    """A transformer built on the meta device from the config the loader writes, and `state` (meta tensors in
    the file's names) converted to its names by the converter the loader uses."""
    import json

    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    config = json.loads((folder / "transformer" / "config.json").read_text())
    cls = FluxTransformer2DModel if architecture == "flux" else SD3Transformer2DModel
    if architecture == "flux" and state["img_in.weight"].shape[0] != FLUX1_WIDTH:
        converted = flux_checkpoint_at_any_width(state)
    elif architecture == "flux":
        converted = convert_flux_transformer_checkpoint_to_diffusers(state, config=config)
    else:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(state, config=config)
    return cls.from_config(config), converted


def estimate_sizes(spec, parts, dtype: torch.dtype) -> Sizes:
    """Each component's bytes as it will sit in memory, from the files' tensor tables (nothing is loaded): a folder's
    component folders, a single file's tensors by their prefixes, a transformer alone's parts (`models/parts.py`).
    fp8 layers count at one byte a weight where the loader keeps them fp8 (`fp8_held`), GGUF at its blocks, T5's
    feed-forward output in float32 under float16 (as transformers and diffusers load it)."""
    path = Path(spec.path)
    sizes = Sizes()
    done = fp8_held(spec, parts, dtype)
    for component, held in done.items():
        for name, nbytes in held.items():
            sizes.add(component, name, nbytes)
    if path.is_dir():  # diffusers' `from_pretrained` upcasts every tensor to the compute dtype
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            name = "denoiser" if folder.name in ("unet", "transformer") else folder.name
            for file in weight_files(folder):
                add_file(sizes, file, dtype, name)
    elif path.is_file():
        add_file(sizes, path, dtype, None, done)
    for role, entry in getattr(parts, "files", {}).items():
        add_file(sizes, Path(entry.path), dtype, "vae" if role == "vae" else f"text_encoder.{role}", done)
    denoiser = "unet" if spec.architecture == "unet" else "transformer"
    rename = {"denoiser": denoiser}
    sizes.total = {rename.get(k, k): v for k, v in sizes.total.items()}
    sizes.blocks = {rename.get(k, k): v for k, v in sizes.blocks.items()}
    return sizes


# ------------------------------------------------------------------------------------------ applying a plan


def place(pipeline, plan: MemoryPlan, device: torch.device, hooked: bool) -> bool:
    """Put a loaded pipeline where its plan says; returns whether diffusers' offload hooks are on it. "model" and
    "group" install them once (`hooked`: already there): a pipeline under them is never moved whole with
    `.to(device)`, the hooks move its parts as they run."""
    modules = {n: m for n, m in pipeline.components.items() if isinstance(m, torch.nn.Module)}
    if plan.mode == "none":
        pipeline.to(device)
    elif plan.mode == "encoders":
        for name, module in modules.items():
            module.to(torch.device("cpu") if is_encoder(name) else device)
    elif plan.mode == "model" and not hooked:
        try:  # given the device, diffusers offloads to it even where it is the CPU (no accelerator needed)
            pipeline.enable_model_cpu_offload(device=device)
        except (RuntimeError, ValueError, ImportError) as exc:
            raise UnsupportedError(f"offload=model: diffusers' model CPU offload refused this pipeline on {device} "
                                   f"({exc}); use offload=group or none") from None  # fmt: skip
    elif plan.mode == "group" and hooked:
        if "vae" in modules:  # back from CPU memory (`leave_device`)
            modules["vae"].to(device)
    elif plan.mode == "group":
        vae = ["vae"] if "vae" in modules else []  # small, and decoded at once: kept on the device
        pipeline.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                      offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=device.type == "cuda", exclude_modules=vae)  # fmt: skip
    return plan.mode in ("model", "group")


def leave_device(pipeline, plan: MemoryPlan) -> None:
    """Move a pipeline to CPU memory (pushed out by another model): under group offload only what the hooks do not
    move (its VAE); diffusers refuses to move group-offloaded modules with `.to`."""
    if plan.mode == "group":
        vae = pipeline.components.get("vae")
        if isinstance(vae, torch.nn.Module):
            vae.to("cpu")
    else:
        pipeline.to("cpu")
