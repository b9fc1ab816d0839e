"""`make bench-flux` (`python -m tools.bench_flux_formats`): what FLUX.1-dev's transformer costs to load and to run
as users keep it (bf16, fp8 e4m3fn, GGUF Q8_0 in ComfyUI's split layout), imprompt beside diffusers' own loaders.

Real size, random weights (load time, memory and speed do not depend on the values): the transformer in Black
Forest Labs' names as `flux1-dev.safetensors` has them (19 double- and 38 single-stream blocks, 3072 wide, 24 heads
of 128, T5 4096, CLIP 768, guidance embedding: diffusers' `FluxTransformer2DModel` default config), written one
tensor at a time (never the whole model in memory) as (a) bf16 safetensors, (b) fp8 e4m3fn safetensors (every
tensor cast, as the fp8 files users download were made), (c) GGUF in city96's layout (arch "flux", the same names,
bare; Q8_0 for the 2-D weights whose last dimension divides by 32, F32 for the 1-D ones, F16 for the rest). The
values are slices of one normal pool at seeded offsets (12 billion fresh normals would take minutes here).
The files sit in a models folder in ComfyUI's layout (`diffusion_models/`, `vae/ae.safetensors`,
`text_encoders/clip_l.safetensors`, `text_encoders/t5xxl_fp16.safetensors`, T5's tokenizer in
`comfy/text_encoders/t5_tokenizer/`), one format at a time (each is deleted after its measurement: 24 + 12 + 13 GB).

Parts (`--parts`):
1. `load` (the CPU): per format, loading the transformer in a fresh process each, with a memory cap (the process is
   killed above it, and is the OOM killer's first choice): (a) imprompt: `Engine(models, device="cpu",
   dtype="bfloat16").preload(model)` of the split model (its VAE, CLIP-L and T5 tiny here: the transformer is what
   is measured); (b) diffusers: `FluxTransformer2DModel.from_single_file(file, config=..., torch_dtype=bfloat16)`
   (for GGUF with `GGUFQuantizationConfig(compute_dtype=bfloat16)`; for fp8 that upcasts to bf16, as diffusers
   does unless told a storage dtype). Seconds, peak RSS (`ru_maxrss`), RSS and anonymous memory after the load,
   the bytes and dtypes of the transformer's tensors.
2. `plan` (the CPU, nothing loaded): the memory plan imprompt chooses (`loading/memory_plan.choose_plan` from the
   files' tensor tables, as `EngineState.memory_plan` does on CUDA) for a simulated 16 GB and 24 GB GPU, per format,
   with real-size T5-XXL, CLIP-L and VAE tables (their files written sparse: headers only).
3. `steps` (`--gpu`, one CUDA device, or `--size tiny` on the CPU to prove the path): per format, seconds per step at
   1024x1024 (after a warm-up) and peak device memory (`torch.cuda.max_memory_allocated`), imprompt (offload
   "none") against diffusers' `FluxPipeline` built from the same files with the same settings (all on the device,
   bf16, 28-step schedule's first steps, guidance 3.5); then imprompt with offload "auto" under a simulated 16 GB
   and 24 GB device (imprompt is told the size, and the caching allocator is capped at it with
   `set_per_process_memory_fraction`): the plan it chose and its peak, which must stay under the budget.
Writes `docs/flux-formats-benchmark.json` (raw numbers, the machine) and `docs/flux-formats-benchmark.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# FLUX.1-dev's transformer (diffusers' FluxTransformer2DModel defaults, guidance_embeds=True as dev's config has it)
FLUX_DEV = {"width": 3072, "heads": 24, "double": 19, "single": 38, "t5": 4096, "clip": 768, "channels": 64}
# tiny: as wide as FLUX.1 (diffusers' single-file converter splits the single blocks' fused projection at 3072
# whatever the file's width), one block of each kind, tiny text widths
TINY = {**FLUX_DEV, "double": 1, "single": 1, "t5": 32, "clip": 32}
FORMATS = {"bf16": "flux1-dev.safetensors", "fp8_e4m3fn": "flux1-dev-fp8-e4m3fn.safetensors",
           "gguf_Q8_0": "flux1-dev-Q8_0.gguf"}  # fmt: skip
PARTS = ("load", "plan")
GIB = 2**30
ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


# ------------------------------------------------------------------------------------------------ the files


def flux_table(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a FLUX.1 transformer in Black Forest Labs' names (guidance-distilled: dev)."""
    w, mlp, head, channels = shape["width"], 4 * shape["width"], shape["width"] // shape["heads"], shape["channels"]
    table: list[tuple[str, tuple[int, ...]]] = []

    def linear(name: str, out: int, into: int) -> None:
        table.extend([(f"{name}.weight", (out, into)), (f"{name}.bias", (out,))])

    def qk_norms(prefix: str) -> None:
        table.extend([(f"{prefix}norm.query_norm.scale", (head,)), (f"{prefix}norm.key_norm.scale", (head,))])

    linear("img_in", w, channels)
    for name, into in (("time_in", 256), ("vector_in", shape["clip"]), ("guidance_in", 256)):
        linear(f"{name}.in_layer", w, into)
        linear(f"{name}.out_layer", w, w)
    linear("txt_in", w, shape["t5"])
    for block in range(shape["double"]):
        for side in ("img", "txt"):
            prefix = f"double_blocks.{block}.{side}_"
            linear(prefix + "mod.lin", 6 * w, w)
            linear(prefix + "attn.qkv", 3 * w, w)
            qk_norms(prefix + "attn.")
            linear(prefix + "attn.proj", w, w)
            linear(prefix + "mlp.0", mlp, w)
            linear(prefix + "mlp.2", w, mlp)
    for block in range(shape["single"]):
        prefix = f"single_blocks.{block}."
        linear(prefix + "linear1", 3 * w + mlp, w)
        linear(prefix + "linear2", w, w + mlp)
        qk_norms(prefix)
        linear(prefix + "modulation.lin", 3 * w, w)
    linear("final_layer.adaLN_modulation.1", 2 * w, w)
    linear("final_layer.linear", channels, w)
    return table


def diffusers_config(shape: dict) -> dict:
    """`FluxTransformer2DModel`'s config for `shape` (FLUX.1-dev's for FLUX_DEV)."""
    head = shape["width"] // shape["heads"]
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": shape["channels"],
            "num_layers": shape["double"], "num_single_layers": shape["single"], "attention_head_dim": head,
            "num_attention_heads": shape["heads"], "joint_attention_dim": shape["t5"],
            "pooled_projection_dim": shape["clip"], "guidance_embeds": True,
            "axes_dims_rope": [head // 8, head * 7 // 16, head * 7 // 16]}  # fmt: skip


class Values:
    """Random weights for any shape, cheaply: slices (wrapping) of one normal pool (std 0.02) at seeded offsets,
    whole 32-value blocks apart; RMSNorm scales are ones, as at initialisation. `blocks` gives the same values'
    Q8_0 blocks from the pool quantized once (the slice's own quantization: its offset and length are whole blocks)."""

    def __init__(self, device: str = "cpu", pool: int = 2**25, seed: int = 0):
        generator = torch.Generator(device).manual_seed(seed)
        self.pool = (torch.randn(pool, generator=generator, device=device) * 0.02).to(torch.bfloat16)
        self.seed = seed
        self.offsets = random.Random(seed)
        self.quantized: torch.Tensor | None = None

    def restart(self) -> None:
        """The same sequence of slices again (another format of the same weights)."""
        self.offsets = random.Random(self.seed)

    def __call__(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith(".scale"):
            return torch.ones(shape, dtype=torch.bfloat16, device=self.pool.device)
        return self.wrapped(self.pool, math.prod(shape), 32).view(shape)  # offsets in whole blocks of 32 values

    def blocks(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Q8_0 bytes (rows, cols / 32 * 34) of what `self(name, shape)` gives."""
        if self.quantized is None:
            self.quantized = q8_0(self.pool)
        n = math.prod(shape) // 32
        return self.wrapped(self.quantized.view(-1, 34), n, 1).reshape(shape[0], -1)

    def wrapped(self, source: torch.Tensor, n: int, per_block: int) -> torch.Tensor:
        """`n` rows of `source` (values, or Q8_0 blocks: `per_block` rows each) from a random whole block on."""
        start = self.offsets.randrange(self.pool.numel() // 32) * per_block
        pieces, left = [], n
        while left:
            piece = source[start : start + left]
            pieces.append(piece)
            left -= piece.shape[0]
            start = 0
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def write_safetensors(path: Path, table, dtype: torch.dtype, values: Values | None) -> Path:
    """A safetensors file of `table` in `dtype`, streamed tensor by tensor; `values` None: sparse (the header and
    the right size, no data written: enough for anything that reads the tensor table alone)."""
    element = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in table:
        size = math.prod(shape) * element
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        if values is None:
            f.truncate(8 + len(raw) + offset)
        else:
            for name, shape in table:
                f.write(values(name, shape).to(dtype).cpu().contiguous().view(torch.uint8).numpy().data)
    os.replace(partial, path)
    return path


def q8_0(tensor: torch.Tensor, chunk: int = 2**20) -> torch.Tensor:
    """GGML's Q8_0 blocks of a tensor whose last dimension divides by 32, as bytes (rows, cols / 32 * 34): per 32
    values an f16 scale (max |x| / 127) and 32 int8. The arithmetic of `gguf.quants.quantize` (bit for bit: the
    tests compare), in torch and `chunk` values at a time (whole 66M-value tensors at once spend their time in
    page faults), so that it runs on the device that made the values."""
    rows = tensor.shape[0] if tensor.ndim > 1 else 1
    flat = tensor.reshape(-1, 32)
    out = torch.empty((flat.shape[0], 34), dtype=torch.uint8, device=tensor.device)
    step = max(1, chunk // 32)
    for start in range(0, flat.shape[0], step):
        blocks = flat[start : start + step].float()
        d = blocks.abs().amax(dim=1, keepdim=True).div_(127)
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        x = blocks.mul_(inverse)
        a = x.abs()
        floored = a.floor()
        q = a.sub_(floored).mul_(2).floor_().add_(floored).mul_(torch.sign(x))
        out[start : start + step, :2] = d.to(torch.float16).view(torch.uint8)
        out[start : start + step, 2:] = q.to(torch.int8).view(torch.uint8)
    return out.reshape(rows, -1)


def gguf_type(name: str, shape: tuple[int, ...]) -> str:
    """city96's choice per tensor: Q8_0 for 2-D weights whose last dimension divides by 32, F32 for 1-D, F16 else."""
    if len(shape) == 1:
        return "F32"
    return "Q8_0" if shape[-1] % 32 == 0 else "F16"


def write_gguf(path: Path, table, values: Values | None) -> Path:
    """A GGUF file in city96's FLUX layout (arch "flux", Black Forest Labs' names, bare), streamed tensor by tensor
    through `gguf.GGUFWriter` (the infos first, then each tensor's data in the same order); `values` None: sparse."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, shape in table:
        kind = gguf_type(name, shape)
        if kind == "Q8_0":
            nbytes = math.prod(shape) // 32 * 34
            writer.add_tensor_info(name, (shape[0], shape[1] // 32 * 34), np.dtype(np.uint8), nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            dtype = np.dtype(np.float32 if kind == "F32" else np.float16)
            writer.add_tensor_info(name, shape, dtype, math.prod(shape) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if values is None:
        sizes = [ti.nbytes for ti in writer.tensors[0].values()]
        out = writer.fout[0]
        out.flush()
        start = writer.ggml_pad(out.tell(), writer.data_alignment)
        out.truncate(start + sum(writer.ggml_pad(n, writer.data_alignment) for n in sizes))
        writer.tensors[0].clear()
    for name, shape in table if values is not None else ():
        kind = gguf_type(name, shape)
        if kind == "Q8_0":
            data = values.blocks(name, shape).cpu().numpy()
        else:
            data = values(name, shape).to(torch.float32 if kind == "F32" else torch.float16).cpu().numpy()
        writer.write_tensor_data(data)
    writer.close()
    os.replace(partial, path)
    return path


def write_transformer(models: Path, fmt: str, shape: dict, device: str = "cpu", sparse: bool = False) -> Path:
    """The transformer in `fmt` at `models/diffusion_models/` (kept if already there); `sparse`: its table alone."""
    path = models / "diffusion_models" / FORMATS[fmt]
    if path.is_file():
        return path
    table, values = flux_table(shape), None if sparse else Values(device)
    if fmt == "gguf_Q8_0":
        return write_gguf(path, table, values)
    return write_safetensors(path, table, torch.bfloat16 if fmt == "bf16" else torch.float8_e4m3fn, values)


def drop_transformers(models: Path, keep: str | None = None) -> None:
    """Delete the transformer files (but `keep`'s): one real-size format on the disk at a time."""
    for fmt, name in FORMATS.items():
        if fmt != keep:
            (models / "diffusion_models" / name).unlink(missing_ok=True)


# the parts: VAE (LDM names, as ae.safetensors), CLIP-L and T5-XXL (transformers' names), their configs
FLUX_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 16, "layers_per_block": 2,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip
TINY_VAE = {**FLUX_VAE, "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 16}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "is_gated_act": True}  # fmt: skip


def part_configs(size: str, shape: dict) -> dict:
    if size == "real":
        return {"vae": FLUX_VAE, "clip": CLIP_L, "t5": T5_XXL}
    clip = {"hidden_size": shape["clip"], "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "projection_dim": shape["clip"], "hidden_act": "quick_gelu"}  # fmt: skip
    t5 = {**T5_XXL, "d_model": shape["t5"], "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 128}
    return {"vae": TINY_VAE, "clip": clip, "t5": t5}


def ldm_vae_name(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL tensor's name in the LDM layout BFL's ae.safetensors uses."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    if key in DIFFUSERS_TO_LDM_MAPPING["vae"]:
        return DIFFUSERS_TO_LDM_MAPPING["vae"][key]
    parts = key.split(".")
    side = parts[0]
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])
        where = f"{side}.{'down' if side == 'encoder' else 'up'}.{level}"
        if parts[3] in ("downsamplers", "upsamplers"):
            return f"{where}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
        return f"{where}.block.{parts[4]}.{'.'.join(parts[5:]).replace('conv_shortcut', 'nin_shortcut')}"
    if parts[2] == "resnets":
        return f"{side}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
    name = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[parts[4]]
    return f"{side}.mid.attn_1.{name}.{parts[-1]}"


def ldm_vae_tensors(vae) -> dict[str, torch.Tensor]:
    levels = len(vae.config.block_out_channels)
    out = {}
    for key, tensor in vae.state_dict().items():
        name = ldm_vae_name(key, levels)
        if ".attn_1." in name and not name.endswith(("norm.weight", "norm.bias")) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        out[name] = tensor
    return out


def write_parts(models: Path, size: str, shape: dict, sparse: bool = False, device: str = "cpu") -> dict:
    """VAE, CLIP-L, T5 (fp16, as t5xxl_fp16.safetensors) and the tokenizers, in ComfyUI's places; `sparse`: the
    files' tables only (for the memory plan), no values. Returns part -> path."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from imprompt.demo.tiny_dits import write_t5_tokenizer
    from imprompt.demo.tiny_models import write_tokenizer

    configs = part_configs(size, shape)
    paths = {"vae": models / "vae" / "ae.safetensors", "clip_l": models / "text_encoders" / "clip_l.safetensors",
             "t5xxl": models / "text_encoders" / "t5xxl_fp16.safetensors"}  # fmt: skip
    tokenizers = models.parent / "comfy" / "text_encoders"
    if not (tokenizers / "t5_tokenizer" / "tokenizer.json").is_file():
        write_t5_tokenizer(tokenizers / "t5_tokenizer")
        write_tokenizer(tokenizers / "clip_tokenizer")
    if all(p.is_file() for p in paths.values()):
        return paths
    builders = {
        "vae": lambda: AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(configs["vae"]["block_out_channels"]),
                                     up_block_types=["UpDecoderBlock2D"] * len(configs["vae"]["block_out_channels"]), **configs["vae"]),
        "clip_l": lambda: CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **configs["clip"])),
        "t5xxl": lambda: T5EncoderModel(T5Config(**configs["t5"])),
    }  # fmt: skip
    for part, build in builders.items():
        if paths[part].is_file():
            continue
        torch.manual_seed(7)
        with torch.device("meta" if sparse else device):
            model = build()
        state = ldm_vae_tensors(model) if part == "vae" else {
            (k if part != "clip_l" or k.startswith("text_model.") else "text_model." + k): v
            for k, v in model.state_dict().items() if not k.endswith("position_ids")}  # fmt: skip
        if part == "t5xxl":
            state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight, which the files hold
        table = [(k, tuple(v.shape)) for k, v in state.items()]
        write_safetensors(paths[part], table, torch.float16, None if sparse else (lambda name, _s, st=state: st[name]))
        del model, state
    return paths


# ------------------------------------------------------------------------------------------ measuring memory


def rss() -> dict:
    """This process's memory now (RSS, and its anonymous part: RSS less file-backed pages) and at its peak."""
    import resource

    import psutil

    info = psutil.Process().memory_info()
    return {"rss_bytes": info.rss, "anonymous_bytes": info.rss - info.shared,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip


def run_capped(command: list[str], cap: int, poll: float = 0.05) -> dict:
    """Run `command` with its anonymous memory capped at `cap` bytes (killed above it, and the OOM killer's first
    choice meanwhile): whether it finished, was killed at the cap, or failed, and the peaks seen from outside."""
    import psutil

    def first_to_go() -> None:
        Path("/proc/self/oom_score_adj").write_text("1000")

    started = time.perf_counter()
    process = subprocess.Popen(command, preexec_fn=first_to_go, stderr=subprocess.PIPE, text=True)
    watched = psutil.Process(process.pid)
    peak_rss = peak_anonymous = 0
    killed = False
    while process.poll() is None:
        try:
            info = watched.memory_info()
        except psutil.Error:
            break
        peak_rss, peak_anonymous = max(peak_rss, info.rss), max(peak_anonymous, info.rss - info.shared)
        if info.rss - info.shared > cap:
            process.kill()
            killed = True
            break
        time.sleep(poll)
    stderr = process.communicate()[1]
    return {"returncode": process.returncode, "killed_at_cap": killed, "cap_bytes": cap,
            "seen_peak_rss_bytes": peak_rss, "seen_peak_anonymous_bytes": peak_anonymous,
            "wall_s": time.perf_counter() - started, "stderr_tail": stderr[-2000:] if process.returncode else ""}  # fmt: skip


def tensor_summary(module: torch.nn.Module) -> dict:
    """Bytes of a module's parameters and buffers as held, by dtype (GGUF's quantized parameters as their blocks)."""
    by_dtype: dict[str, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        kind = getattr(tensor, "quant_type", None)
        name = f"gguf {getattr(kind, 'name', kind)}" if kind is not None else str(tensor.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + tensor.numel() * tensor.element_size()
    return {"bytes": sum(by_dtype.values()), "by_dtype": by_dtype}


def model_name(engine, path: Path) -> str:
    """The name the engine's store lists the file under."""
    entries = engine.store.pipelines
    entries = entries() if callable(entries) else entries
    for entry in entries:
        if Path(entry.path).resolve() == path.resolve():
            return entry.name
    raise SystemExit(f"bench-flux: {path} is not listed as a model ({[e.name for e in entries]})")


def load_once(way: str, models: Path, path: Path, shape: dict) -> dict:
    """In this (fresh) process: load the transformer one way and measure it."""
    before = rss()
    started = time.perf_counter()
    if way == "imprompt":
        from imprompt import Engine

        engine = Engine([models], device="cpu", dtype="bfloat16")
        name = model_name(engine, path)  # the scan and the probe (the file's tensor table) are part of the load
        scanned = time.perf_counter() - started
        events = engine.preload(name)
        seconds = time.perf_counter() - started
        transformer = engine.state.pipelines.current.pipeline.transformer
        extra = {"scan_s": scanned, "events": events}
    else:
        transformer = diffusers_transformer(path, shape, torch.bfloat16)
        seconds = time.perf_counter() - started
        extra = {}
    return {"way": way, "seconds": seconds, "before": before, "after": rss(), "transformer": tensor_summary(transformer),
            "transformer_class": type(transformer).__name__, **extra}  # fmt: skip


def config_folder(shape: dict) -> Path:
    """A folder with `transformer/config.json` for diffusers' from_single_file (it would fetch one otherwise)."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="bench-flux-config-"))
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps(diffusers_config(shape)))
    return folder


def diffusers_transformer(path: Path, shape: dict, dtype: torch.dtype):
    """diffusers' own single-file loading of the transformer: GGUF through GGUFQuantizationConfig (kept quantized),
    safetensors in `dtype` (an fp8 file upcast)."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    folder = config_folder(shape)
    try:
        extra = {"quantization_config": GGUFQuantizationConfig(compute_dtype=dtype)} if path.suffix == ".gguf" else {}
        return FluxTransformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                       torch_dtype=dtype, local_files_only=True, **extra).eval()  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def part_load(models: Path, args) -> dict:
    """Each format written, loaded both ways in fresh capped processes, then deleted."""
    import psutil

    out: dict = {}
    for fmt in args.formats:
        drop_transformers(models, keep=fmt)
        started = time.perf_counter()
        print(f"bench-flux: writing {fmt} ...", file=sys.stderr, flush=True)
        path = write_transformer(models, fmt, args.shape)
        out[fmt] = {"file": path.name, "file_bytes": path.stat().st_size, "write_s": time.perf_counter() - started,
                    "order": list(args.ways)}  # the first finds less of the file in the page cache
        for way in args.ways:
            cap = min(int(args.memory_cap * GIB), psutil.virtual_memory().available - int(1.5 * GIB))
            result = models.parent / f"load-{fmt}-{way}.json"
            result.unlink(missing_ok=True)
            print(f"bench-flux: loading {fmt} with {way} (cap {cap / GIB:.1f} GiB) ...", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "tools.bench_flux_formats", "--load-one", way, "--file", str(path),
                       "--models", str(models), "--size", args.size, "--json-out", str(result)]  # fmt: skip
            run = run_capped(command, cap)
            out[fmt][way] = {**run, **(json.loads(result.read_text()) if result.is_file() else {})}
        if not args.keep:
            drop_transformers(models)
    return out


# ------------------------------------------------------------------------------------------- the memory plan


def part_plan(models: Path, args) -> dict:
    """The plan imprompt chooses for each format on a simulated CUDA device of each budget, from the files' tables
    (the transformer and the parts written sparse: nothing loaded)."""
    from imprompt import Engine
    from imprompt.loading.memory_plan import TRANSFORMERS, choose_plan, estimate_sizes
    from imprompt.util.devices import RESERVED

    folder = models
    write_parts(folder, "real", FLUX_DEV, sparse=True)
    out: dict = {}
    for fmt in args.formats:
        drop_transformers(folder)
        path = write_transformer(folder, fmt, FLUX_DEV, sparse=True)
        engine = Engine([folder], device="cpu", dtype="bfloat16")
        name = model_name(engine, path)
        plan = engine.plan({"model": name, "prompt": "a shape"})
        entry = engine.store.pipeline(name)
        sizes = estimate_sizes(entry.spec, plan.parts, torch.bfloat16)
        out[fmt] = {"sizes": sizes.total, "plans": {}}
        for budget in args.budgets:
            room = int(budget * 1e9)
            reserved = int(room * RESERVED["cuda"])  # what util/devices.activation_budget leaves for activations
            chosen = choose_plan(room, sizes.total, "auto", activation_bytes=reserved, group_bytes=sizes.group(streams=True),
                                 device_type="cuda", encoders_apart=entry.spec.architecture in TRANSFORMERS)  # fmt: skip
            out[fmt]["plans"][f"{budget:g} GB"] = chosen.describe()
        drop_transformers(folder)
    return out


# ----------------------------------------------------------------------------------- steps (GPU, or tiny on CPU)


def diffusers_pipeline(models: Path, path: Path, shape: dict, size: str, device: torch.device,
                       dtype: torch.dtype = torch.bfloat16):  # fmt: skip
    """diffusers' FluxPipeline from the same files: the transformer by `from_single_file` (GGUF kept quantized;
    fp8 upcast to bf16 on load and kept fp8 by `enable_layerwise_casting`, diffusers' way), the VAE by
    `AutoencoderKL.from_single_file`, CLIP-L and T5 from their state dicts, all on `device` in `dtype`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from safetensors.torch import load_file
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)  # fmt: skip

    transformer = diffusers_transformer(path, shape, dtype)
    if "fp8" in path.name:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    configs = part_configs(size, shape)
    vae_config = Path(config_folder(shape))
    (vae_config / "vae").mkdir()
    blocks = len(configs["vae"]["block_out_channels"])
    (vae_config / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks, "up_block_types": ["UpDecoderBlock2D"] * blocks, **configs["vae"]}))  # fmt: skip
    vae = AutoencoderKL.from_single_file(str(models / "vae" / "ae.safetensors"), config=str(vae_config),
                                         subfolder="vae", torch_dtype=dtype, local_files_only=True)  # fmt: skip
    shutil.rmtree(vae_config, ignore_errors=True)
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **configs["clip"]))
        t5 = T5EncoderModel(T5Config(**configs["t5"]))
    clip.load_state_dict({k.removeprefix("text_model.") if not hasattr(clip, "text_model") else k: v
                          for k, v in load_file(models / "text_encoders" / "clip_l.safetensors").items()},
                         strict=False, assign=True)  # fmt: skip
    t5_state = load_file(models / "text_encoders" / "t5xxl_fp16.safetensors")
    t5_state["encoder.embed_tokens.weight"] = t5_state["shared.weight"]
    t5.load_state_dict(t5_state, assign=True)
    for encoder in (clip, t5):
        for name, buffer in list(encoder.named_buffers()):  # position ids: not in the files
            if buffer.is_meta:
                owner = encoder.get_submodule(name.rsplit(".", 1)[0])
                owner.register_buffer(name.rsplit(".", 1)[1], torch.arange(buffer.shape[-1]).expand(buffer.shape),
                                      persistent=False)  # fmt: skip
    tokenizers = models.parent / "comfy" / "text_encoders"
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
    pipeline = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip.to(dtype).eval(),
                            tokenizer=CLIPTokenizer.from_pretrained(tokenizers / "clip_tokenizer"),
                            text_encoder_2=t5.to(dtype).eval(),
                            tokenizer_2=T5TokenizerFast.from_pretrained(tokenizers / "t5_tokenizer"),
                            transformer=transformer)  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def imprompt_steps(models: Path, path: Path, args, device: torch.device, offload: str = "none",
                   budget: float | None = None) -> dict:  # fmt: skip
    """Seconds per step and the peak device memory of imprompt's generation (the warm-up call loads the model)."""
    from imprompt import Engine

    started = time.perf_counter()
    engine = Engine([models], device=str(device), dtype=args.dtype, offload=offload)
    request = {"model": model_name(engine, path), "prompt": "a red square on a blue field", "seed": 1,
               "width": args.pixels, "height": args.pixels, "cfg_scale": 3.5}  # fmt: skip
    if args.warmup:
        warm = engine.generate({**request, "steps": args.warmup})
        events = warm.info["events"]
    else:
        events = engine.preload(request["model"])
    load_s = time.perf_counter() - started
    reset_peak(device)
    marks: list[float] = []
    def mark(step: int, total: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step's kernels done, not just queued
        marks.append(time.perf_counter())

    result = engine.generate({**request, "steps": args.steps + 1}, on_step=mark)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    plan = next((e for e in events + result.info["events"] if e.get("event") == "memory_plan"), None)
    out = {"load_and_warm_s": load_s, "step_s": steps, "peak_bytes": peak_memory(device), "memory_plan": plan,
           "engine": result.info.get("engine"),
           "transformer": tensor_summary(engine.state.pipelines.current.pipeline.transformer)}  # fmt: skip
    del engine, result
    reset_peak(device)
    return out


def diffusers_steps(models: Path, path: Path, args, device: torch.device) -> dict:
    started = time.perf_counter()
    pipeline = diffusers_pipeline(models, path, args.shape, args.size, device, getattr(torch, args.dtype))
    call = {"prompt": "a red square on a blue field", "width": args.pixels, "height": args.pixels,
            "guidance_scale": 3.5}  # fmt: skip
    if args.warmup:
        pipeline(**call, num_inference_steps=args.warmup, generator=torch.Generator("cpu").manual_seed(1))
    load_s = time.perf_counter() - started
    reset_peak(device)
    marks: list[float] = []

    def mark(pipe, step, timestep, kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return kwargs

    pipeline(**call, num_inference_steps=args.steps + 1, generator=torch.Generator("cpu").manual_seed(1),
             callback_on_step_end=mark)  # fmt: skip
    out = {"load_and_warm_s": load_s, "step_s": [b - a for a, b in zip(marks, marks[1:])],
           "peak_bytes": peak_memory(device), "transformer": tensor_summary(pipeline.transformer)}  # fmt: skip
    del pipeline
    reset_peak(device)
    return out


def simulate_device(budget_bytes: int | None, device: torch.device) -> None:
    """Make imprompt see a device of `budget_bytes` (its planner reads `device_memory` / `free_memory`; Engine has
    no setting for it), and cap the caching allocator at it, so that a plan that does not fit runs out of memory
    instead of passing. None: the real device again."""
    import imprompt.state as state
    from imprompt.util import devices

    real = SIMULATED.setdefault("real", {m: (m.device_memory, m.free_memory) for m in (state, devices)})
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if budget_bytes is None else min(1.0, budget_bytes / total), device)
    for module in (state, devices):
        if budget_bytes is None:
            module.device_memory, module.free_memory = real[module]
        else:
            module.device_memory = lambda d, b=budget_bytes: b
            module.free_memory = lambda d, b=budget_bytes: max(0, b - torch.cuda.memory_allocated(d))


SIMULATED: dict = {}


def part_steps(models: Path, args) -> dict:
    device = torch.device("cuda" if args.gpu else "cpu")
    out: dict = {}
    write_parts(models, args.size, args.shape, device=str(device))
    for fmt in args.formats:
        drop_transformers(models, keep=fmt)
        print(f"bench-flux: writing {fmt} ...", file=sys.stderr, flush=True)
        path = write_transformer(models, fmt, args.shape, device=str(device))
        out[fmt] = {}
        for way in args.ways:
            print(f"bench-flux: {fmt} steps with {way} ...", file=sys.stderr, flush=True)
            try:
                run = imprompt_steps if way == "imprompt" else diffusers_steps
                out[fmt][way] = run(models, path, args, device)
            except Exception as exc:  # one failure is a row of the report, not the end of the run
                out[fmt][way] = {"error": f"{type(exc).__name__}: {str(exc)[:1000]}"}
                reset_peak(device)
        if fmt == args.plan_format and args.budgets and "imprompt" in args.ways:
            out[fmt]["plans"] = {}
            for budget in args.budgets:
                print(f"bench-flux: {fmt} under a {budget:g} GB device ...", file=sys.stderr, flush=True)
                if device.type == "cuda":
                    simulate_device(int(budget * 1e9), device)
                try:
                    run = imprompt_steps(models, path, args, device, offload="auto")
                    run["under_budget"] = run["peak_bytes"] is None or run["peak_bytes"] < budget * 1e9
                except Exception as exc:
                    run = {"error": f"{type(exc).__name__}: {str(exc)[:1000]}"}
                    reset_peak(device)
                out[fmt]["plans"][f"{budget:g} GB"] = run
            if device.type == "cuda":
                simulate_device(None, device)
        if not args.keep:
            drop_transformers(models)
    return out


# ---------------------------------------------------------------------------------------------------- report


def machine() -> dict:
    from .bench import machine as bench_machine

    m = bench_machine()
    if torch.cuda.is_available():
        m["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return m


def p50(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def gb(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 1e9:.1f} GB"


def render(report: dict) -> str:
    m = report["machine"]
    lines = ["# FLUX.1-dev's transformer as users keep it: bf16, fp8, GGUF Q8_0", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM"
             + (f", {m['gpu']}" if m.get("gpu") else ", no GPU") + f"; Python {m['python']}, torch {m['torch']}.",
             "", f"Command: `{report['command']}`; measured {report['measured_at']}, {report['wall_s'] / 60:.1f} min in "
             f"all. {'Real' if report['args']['size'] == 'real' else 'Tiny (FLUX.1 width, one block of each kind)'} size, random weights (see tools/bench_flux_formats.py).", ""]  # fmt: skip
    results = report["results"]
    if "load" in results:
        lines += ["## Loading the transformer on the CPU (a fresh process each)", "",
                  "| format | file | loader | seconds | peak RSS | RSS after | anonymous after | transformer in memory | outcome |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for fmt, row in results["load"].items():
            order = row.get("order", ["imprompt", "diffusers"])
            for way in ("imprompt", "diffusers"):
                r = row.get(way)
                if r is None:
                    continue
                loader = f"{way} ({'first' if order.index(way) == 0 else 'second'})" if way in order else way
                if r.get("killed_at_cap"):
                    outcome = f"killed at the {gb(r['cap_bytes'])} cap"
                elif r.get("returncode"):
                    outcome = "failed: " + (r.get("stderr_tail") or "").strip().splitlines()[-1][:160] if r.get("stderr_tail") else "failed"
                else:
                    outcome = "loaded"
                held = r.get("transformer", {})
                dtypes = ", ".join(f"{k} {gb(v)}" for k, v in held.get("by_dtype", {}).items())
                after = r.get("after", {})
                seconds = f"{r['seconds']:.1f}" if "seconds" in r else f"({r['wall_s']:.1f} until stopped)"
                lines.append(f"| {fmt} | {gb(row['file_bytes'])} | {loader} | {seconds} | "
                             f"{gb(after.get('peak_rss_bytes') or r['seen_peak_rss_bytes'])} | {gb(after.get('rss_bytes'))} | "
                             f"{gb(after.get('anonymous_bytes'))} | {dtypes or '-'} | {outcome} |")  # fmt: skip
        lines += ["", "Each format's file was written, then loaded by each loader in turn (first / second: the second "
                      "finds more of the file in the page cache); `#2` rows are a second run in the other order. "
                      "Seconds: from the start to a loaded transformer (imprompt: the Engine's scan and probe of the "
                      "models folder, then `preload` of the whole split pipeline, whose VAE, CLIP-L and T5 are tiny here "
                      "at the widths the transformer pairs them by; diffusers: `from_single_file` of the transformer "
                      "alone). Peak RSS is `ru_maxrss`, which counts the file's pages mapped while reading it; "
                      "anonymous is RSS less file-backed pages. A process that passes its cap (what was free less "
                      "1.5 GiB, at most --memory-cap) is killed there: the cap is what this machine could give it.", ""]
        for fmt, row in results["load"].items():
            imp, dif = row.get("imprompt", {}), row.get("diffusers", {})
            if "seconds" in imp and "seconds" in dif:
                lines.append(f"- {fmt}: imprompt took {imp['seconds'] / dif['seconds']:.2f}x diffusers' time "
                             f"({imp['seconds']:.1f} s against {dif['seconds']:.1f} s).")
            for way, r in (("imprompt", imp), ("diffusers", dif)):
                if r.get("killed_at_cap"):
                    lines.append(f"- {fmt}, {way}: did not fit: killed at the {gb(r['cap_bytes'])} cap after "
                                 f"{r['wall_s']:.0f} s (the file is {gb(row['file_bytes'])}; held in bf16 the "
                                 f"transformer alone is 23.8 GB, more than this machine's RAM).")  # fmt: skip
        lines += [""]
    if "plan" in results:
        lines += ["## The memory plan imprompt chooses on a simulated GPU (from the files' tables)", "",
                  "| format | components (GB as held) | budget | plan | on the device | why |", "|---|---|---|---|---|---|"]
        for fmt, row in results["plan"].items():
            sizes = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in row["sizes"].items())
            for budget, plan in row["plans"].items():
                lines.append(f"| {fmt} | {sizes} | {budget} | {plan['plan']} | {gb(plan['on_device_bytes'])} | {plan['why']} |")
        lines += [""]
    if "steps" not in results:
        lines += ["## Steps on a GPU", "", "GPU part not run in this session: no GPU was lent. The prepared script, one "
                  "command for one CUDA device (estimated at 8 to 9 minutes on an H100, not yet timed; it writes up to "
                  "24 + 9.5 GB into .bench-cache/flux-formats/real/steps/, one transformer format at a time):", "",
                  "    python -m tools.bench_flux_formats --gpu        # or: make bench-flux GPU=1", "",
                  "Where one command may run 10 minutes at most, the same in two: `--gpu --formats bf16` (with the "
                  "16 / 24 GB plans) and `--gpu --formats fp8_e4m3fn,gguf_Q8_0 --budgets \"\" --out "
                  "docs/flux-formats-benchmark-gpu-2.json`, then `--merge` the two.", "",
                  "It writes docs/flux-formats-benchmark-gpu.json / .md: per format, seconds per step at 1024x1024 "
                  "(3 steps after a 1-step warm-up) and peak `torch.cuda.max_memory_allocated`, imprompt (offload "
                  "none) against diffusers' FluxPipeline from the same files (all on the device, bf16); then the bf16 "
                  "model under offload auto on a simulated 16 GB and 24 GB device (the planner told that size, the "
                  "allocator capped at it): the plan chosen, its step time and whether its peak stayed under. "
                  "`--size tiny` runs the same path on the CPU (tests/test_bench_flux_formats.py does).", ""]  # fmt: skip
    if "steps" in results:
        lines += [f"## Steps at {report['args']['pixels']}x{report['args']['pixels']} ({report['args']['size']} size)", "",
                  "| format | system | seconds per step p50 | peak device memory | load + warm-up | note |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for fmt, row in results["steps"].items():
            for way in ("imprompt", "diffusers"):
                r = row.get(way)
                if r is None:
                    continue
                if "error" in r:
                    lines.append(f"| {fmt} | {way} | - | - | - | {r['error'][:200]} |")
                    continue
                step = p50(r["step_s"])
                lines.append(f"| {fmt} | {way} | {step:.3f} s | {gb(r['peak_bytes'])} | {r['load_and_warm_s']:.1f} s | |")
            for budget, r in row.get("plans", {}).items():
                if "error" in r:
                    lines.append(f"| {fmt} | imprompt, {budget} device | - | - | - | {r['error'][:200]} |")
                    continue
                plan = (r.get("memory_plan") or {}).get("plan", "?")
                lines.append(f"| {fmt} | imprompt, {budget} device (plan {plan}) | {p50(r['step_s']):.3f} s | "
                             f"{gb(r['peak_bytes'])} | {r['load_and_warm_s']:.1f} s | "
                             f"{'under the budget' if r.get('under_budget') else 'OVER the budget'} |")  # fmt: skip
        lines += [""]
    if report.get("notes"):
        lines += [report["notes"].rstrip(), ""]
    return "\n".join(lines)


def merge(paths: list[Path], out: Path, notes: Path | None = None) -> int:
    """One report from several runs on the same machine: their results by part and format, and every command."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {**reports[-1], "command": "; ".join(r["command"] for r in reports),
              "wall_s": sum(r["wall_s"] for r in reports), "runs": [{k: r[k] for k in ("command", "measured_at", "wall_s", "args")}
                                                                    for r in reports], "results": {}}  # fmt: skip
    for report in reports:
        for part, by_format in report["results"].items():
            into = merged["results"].setdefault(part, {})
            for fmt, row in by_format.items():  # a format measured again (the other order): a row of its own
                into[fmt if fmt not in into else f"{fmt} #{sum(k.split(' #')[0] == fmt for k in into) + 1}"] = row
    if notes:
        merged["notes"] = Path(notes).read_text()
    out.write_text(json.dumps(merged, indent=2))
    text = render(merged)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_flux_formats", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("real", "tiny"), default="real")
    parser.add_argument("--gpu", action="store_true", help="the steps part on CUDA (real size)")
    parser.add_argument("--parts", default=None, help=f"comma-separated: load, plan, steps (default: {','.join(PARTS)}, "
                                                      "or steps with --gpu / --size tiny)")  # fmt: skip
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--ways", default="imprompt,diffusers")
    parser.add_argument("--cache", type=Path, default=REPO / ".bench-cache" / "flux-formats")
    parser.add_argument("--memory-cap", type=float, default=21.0, help="GiB a loading process may take (less if less is free)")
    parser.add_argument("--pixels", type=int, default=None, help="image size of the steps part (1024; tiny: 64)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps (after a 2-step warm-up)")
    parser.add_argument("--budgets", default="16,24", help="simulated GPU sizes in GB for the memory plan")
    parser.add_argument("--plan-format", default="bf16", help="the format the steps part runs under each budget")
    parser.add_argument("--warmup", type=int, default=1, help="steps of the warm-up call before the measured one (0: none)")
    parser.add_argument("--dtype", default=None, help="compute dtype of the steps part (bfloat16; tiny on the CPU: float32)")
    parser.add_argument("--keep", action="store_true", help="keep the transformer files")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine the reports of earlier runs (parts and formats "
                                                              "measured apart) into --out, each with its command")  # fmt: skip
    parser.add_argument("--notes", type=Path, help="with --merge: a markdown file of findings, kept in the report")
    parser.add_argument("--load-one", help=argparse.SUPPRESS)  # internal: load once in this process
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    args.shape = FLUX_DEV if args.size == "real" else TINY
    if args.load_one:
        args.json_out.write_text(json.dumps(load_once(args.load_one, args.models, args.file, args.shape)))
        return 0
    if args.merge:
        return merge(args.merge, args.out or REPO / "docs/flux-formats-benchmark.json", args.notes)
    from imprompt.cli import quiet_libraries

    quiet_libraries()
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("bench-flux: --gpu needs a CUDA device")
    parts = (args.parts or ("steps" if args.gpu or args.size == "tiny" else ",".join(PARTS))).split(",")
    args.formats = args.formats.split(",")
    args.ways = args.ways.split(",")
    args.budgets = [float(b) for b in args.budgets.split(",") if b]
    args.pixels = args.pixels or (1024 if args.size == "real" else 64)
    args.dtype = args.dtype or ("bfloat16" if args.gpu or args.size == "real" else "float32")  # bf16 is emulated on AVX2
    default_out = "docs/flux-formats-benchmark" + ("-gpu" if args.gpu else "-tiny" if args.size == "tiny" else "") + ".json"
    args.out = args.out or REPO / default_out
    cache = args.cache / args.size
    started = time.perf_counter()
    given = argv if argv is not None else sys.argv[1:]
    report = {"machine": machine(), "command": "python -m tools.bench_flux_formats" + (" " + " ".join(given) if given else ""),
              "args": {k: v if isinstance(v, (int, float, str, list, type(None))) else str(v) for k, v in vars(args).items()
                       if k not in ("load_one", "file", "models", "json_out", "shape")},
              "results": {}}  # fmt: skip
    for part in parts:
        folder = cache / part / "models"
        if part == "load":  # the parts tiny in depth, at the widths the transformer pairs them by
            write_parts(folder, "tiny", args.shape)
        report["results"][part] = {"load": part_load, "plan": part_plan, "steps": part_steps}[part](folder, args)
        report["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        report["wall_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))  # after each part: nothing later can lose it
    text = render(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
