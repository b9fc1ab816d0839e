"""LoRAs on a loaded pipeline: loaded once through diffusers (PEFT adapters), then switched per request.

diffusers' `load_lora_weights` reads kohya / A1111 and diffusers LoRAs (and LyCORIS where it can) into PEFT
adapters; `set_adapters` chooses which act and how strongly. What imprompt adds: every request states its whole LoRA
set (none included), so what one request activated never reaches the next; loaded adapters stay on the pipeline
under a byte budget, so switching sets is a `set_adapters` call, not a reload from disk.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsupportedError
from ..models.store import Entry
from ..util.cache import ByteLRU
from .tensors import first_line, read_tensors

log = logging.getLogger("imprompt")


@dataclass(frozen=True)
class LoraUse:
    """A LoRA a request wants: its cache key (file identity), how users call it, its weight, and how to read it
    (a LoRA file, or the LoRA embedded in a FaceID adapter)."""

    key: tuple
    label: str
    weight: float
    read: Callable[[], dict]


def lora_file(entry: Entry, weight: float) -> LoraUse:
    return LoraUse(entry.key(), entry.name, weight, lambda: read_tensors(entry.path))


def diffusers_lora_state(state: dict, pipeline) -> dict:
    """The LoRA in names the family's `load_lora_weights` reads. diffusers reads SD 1.5 / SDXL LoRAs in every
    format imprompt lists, and FLUX's in kohya, XLabs, diffusers and ComfyUI-with-`lora_down` names; imprompt goes
    beyond diffusers for FLUX LoRAs in ComfyUI's BFL names with `lora_A` / `lora_B` (renamed to the `lora_down` /
    `lora_up` spelling diffusers converts) and SD 3.x LoRAs in Stability's MMDiT names (kohya, ComfyUI), which
    diffusers' SD 3 loader does not read (converted here to its names)."""
    kind = type(getattr(pipeline, "transformer", None)).__name__
    if kind == "FluxTransformer2DModel" and any(k.startswith("diffusion_model.") and ".lora_A." in k for k in state):
        return {k.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight"): v
                for k, v in state.items()}  # fmt: skip
    if kind == "SD3Transformer2DModel" and any(MMDIT_NAME.match(k) for k in state):
        return sd3_lora_to_diffusers(state, pipeline.transformer.config.num_layers)
    return state


# SD 3's MMDiT modules (Stability's names, dots as underscores as kohya writes them) -> diffusers' modules; a fused
# q, k, v projection becomes three, each with the same down projection and a third of the up projection's rows
SD3_BLOCK_MODULES = {
    "x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "x_block_attn_proj": ("attn.to_out.0",),
    "x_block_attn2_qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block_attn2_proj": ("attn2.to_out.0",),
    "x_block_mlp_fc1": ("ff.net.0.proj",), "x_block_mlp_fc2": ("ff.net.2",),
    "x_block_adaLN_modulation_1": ("norm1.linear",),
    "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block_attn_proj": ("attn.to_add_out",), "context_block_mlp_fc1": ("ff_context.net.0.proj",),
    "context_block_mlp_fc2": ("ff_context.net.2",), "context_block_adaLN_modulation_1": ("norm1_context.linear",),
}  # fmt: skip
SD3_TOP_MODULES = {
    "x_embedder_proj": "pos_embed.proj", "context_embedder": "context_embedder", "final_layer_linear": "proj_out",
    "t_embedder_mlp_0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder_mlp_2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder_mlp_0": "time_text_embed.text_embedder.linear_1",
    "y_embedder_mlp_2": "time_text_embed.text_embedder.linear_2",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}  # fmt: skip
SD3_TEXT_ENCODERS = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "text_encoders.clip_l.transformer.":
                     "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2"}  # fmt: skip
MMDIT_NAME = re.compile(r"(lora_unet_|diffusion_model\.)(joint_blocks|x_embedder|context_embedder|final_layer|t_embedder|y_embedder)")
PAIR = re.compile(r"^(.*?)\.(lora_down|lora_up|lora_A|lora_B)\.weight$|^(.*?)\.alpha$")


def sd3_lora_to_diffusers(state: dict, layers: int) -> dict:
    """An SD 3.x LoRA in Stability's names (kohya `lora_unet_joint_blocks_*`, `lora_te1_` / `lora_te2_`; ComfyUI
    `diffusion_model.joint_blocks.*`) in diffusers' PEFT names, each pair's alpha / rank folded into its down
    projection (diffusers' SD 3 loader reads no alphas). What matches no module is kept as it was: the load then
    counts it as a layer that does not act (T5's `lora_te3_`: diffusers loads no LoRA into SD 3's T5)."""
    pairs: dict = {}
    for key, tensor in state.items():
        match = PAIR.match(key)
        if match is None:
            pairs.setdefault(key, {})["other"] = tensor
            continue
        module = match.group(1) or match.group(3)
        role = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up"}.get(match.group(2), "alpha")
        pairs.setdefault(module, {})[role] = tensor
    out = {}
    for module, pair in pairs.items():
        targets = _sd3_targets(module, layers) if {"down", "up"} <= set(pair) else None
        if targets is None:  # not a pair, or a module diffusers has no name for: as it was
            out |= {k: v for k, v in state.items() if k == module or k.startswith(module + ".")}
            continue
        names, swapped = targets
        down, up = pair["down"], pair["up"]
        if "alpha" in pair:
            down = down * (float(pair["alpha"]) / down.shape[0])
        if swapped:  # the original AdaLN order (shift, scale) is diffusers' (scale, shift)
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first])
        for name, rows in zip(names, up.chunk(len(names), dim=0)):
            out[f"{name}.lora_A.weight"] = down
            out[f"{name}.lora_B.weight"] = rows.contiguous()
    return out


def _sd3_targets(module: str, layers: int) -> tuple[tuple[str, ...], bool] | None:
    """diffusers' module names for an SD 3 LoRA module (and whether its up projection's halves swap), or None."""
    for prefix, part in SD3_TEXT_ENCODERS.items():
        if module.startswith(prefix):
            flat = module[len(prefix) :].replace(".", "_")
            found = re.fullmatch(r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)", flat)
            if found is None:
                return None
            return (f"{part}.text_model.encoder.layers.{found[1]}.{found[2]}.{found[3]}",), False
    for prefix in ("lora_unet_", "diffusion_model."):
        if module.startswith(prefix):
            flat = module[len(prefix) :].replace(".", "_")
            break
    else:
        return None
    block = re.fullmatch(r"joint_blocks_(\d+)_(\w+)", flat)
    if block is not None:
        index, rest = int(block[1]), block[2]
        if rest not in SD3_BLOCK_MODULES:
            return None
        names = tuple(f"transformer.transformer_blocks.{index}.{n}" for n in SD3_BLOCK_MODULES[rest])
        return names, rest == "context_block_adaLN_modulation_1" and index == layers - 1
    if flat in SD3_TOP_MODULES:
        return (f"transformer.{SD3_TOP_MODULES[flat]}",), flat == "final_layer_adaLN_modulation_1"
    return None


class LoraBudget:
    """One byte budget for the LoRA layers of every resident pipeline (file LoRAs and FaceID adapters' own), least
    recently used out first, whichever pipeline holds them: these layers sit inside the pipelines' modules, so
    they are counted here and not in the pipeline budget."""

    def __init__(self, budget_bytes: int):
        self.cache = ByteLRU("loras", budget_bytes)  # (pipeline prefix, entry key) -> PEFT adapter name
        self.owners: dict[str, PipelineLoras] = {}  # pipeline prefix -> its LoRAs


class PipelineLoras:
    """The LoRAs loaded into one pipeline (PEFT adapter name per file version), and which act now."""

    def __init__(self, pipeline, budget: LoraBudget, prefix: str):
        """`prefix` makes adapter names unique across pipelines that share a text encoder (PEFT names are per
        module, and a shared module holds both pipelines' LoRA layers) and keys this pipeline's part of `budget`."""
        self.pipeline = pipeline
        self.prefix = prefix
        self.budget = budget
        budget.owners[prefix] = self
        self._names: dict = {}  # entry key -> PEFT adapter name, of the LoRAs loaded into this pipeline
        self.active: tuple = ()  # ((adapter name, weight), ...) as last set
        self.enabled: bool | None = None  # whether the LoRA layers are on (None: unknown, after a load)
        self.partial: dict = {}  # entry key -> what did not load of a LoRA that loaded only in part
        self._count = 0
        self.baker = None  # loading.compiled.LoraBaker on a compiled model: the denoiser's LoRAs baked into weights
        self.eager_reason: str | None = None  # why its compiled denoiser must run eager with the LoRAs now acting

    def activate(self, loras: list[LoraUse], events: list) -> list[str]:
        """Make exactly these LoRAs act, at these weights (none: the plain model). Returns a warning for each of
        them that loaded only in part (said on every request that uses it)."""
        needed = {lora.key for lora in loras}
        names = [self._adapter_name(lora, needed, events) for lora in loras]
        warnings = [self.partial[lora.key] for lora in loras if lora.key in self.partial]
        wanted = tuple(zip(names, (lora.weight for lora in loras)))
        if wanted == self.active and self.enabled is not None:  # after a load (even a failed one) set it again
            return warnings
        if names:
            if self.enabled is not True:  # a walk over every layer: only when they were switched off
                self.pipeline.enable_lora()
                self.enabled = True
            self.pipeline.set_adapters(names, [lora.weight for lora in loras])
        elif self.enabled is not False and (self._names or self.enabled is None):  # LoRA layers possibly acting: off
            self._switch_off()
            self.enabled = False
        self.active = wanted
        if self.baker is not None:
            self._bake(names)
        return warnings

    def _bake(self, names: list[str]) -> None:
        """A compiled denoiser: the acting LoRAs written into its weights (its PEFT layers off), or, where they cannot
        be, left as PEFT layers and the calls run eager (`eager_reason`)."""
        refusal = self.baker.refusal(names) if names else None
        if refusal is not None:
            self.baker.restore()
            from diffusers.utils.peft_utils import set_adapter_layers

            set_adapter_layers(self.baker.denoiser, enabled=True)
            self.eager_reason = refusal
            return
        started = time.perf_counter()
        layers = self.baker.bake(names)
        self.eager_reason = None
        if layers:
            log.info("LoRAs %s baked into %d layers of the compiled model in %.2f s", ", ".join(names) or "(none)",
                     layers, time.perf_counter() - started)  # fmt: skip

    def _switch_off(self) -> None:
        """Every LoRA layer in the pipeline's modules off, its own and those another pipeline that shares a text
        encoder or VAE loaded into it (diffusers' `disable_lora` walks only modules with its own adapters)."""
        from diffusers.utils.peft_utils import set_adapter_layers

        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                set_adapter_layers(component, enabled=False)

    @property
    def names(self) -> list[str]:
        """The PEFT adapter names of the LoRAs loaded into this pipeline."""
        return list(self._names.values())

    def release(self) -> None:
        """The pipeline leaves for good: its LoRAs out of its modules (and of any module it shares) and the budget."""
        self.clear()
        self.budget.owners.pop(self.prefix, None)

    def clear(self) -> int:
        """Unload every LoRA (Engine.clear_cache; a pipeline leaving the device)."""
        count = len(self._names)
        if self.baker is not None:  # the weights as loaded before the LoRA layers go
            self.baker.restore()
        for key in list(self._names):
            self.pipeline.delete_adapters(self._names.pop(key))
            self.budget.cache.discard((self.prefix, key))
        self.partial.clear()
        self.active, self.enabled = (), None
        return count

    def _adapter_name(self, lora: LoraUse, needed: set, events: list) -> str:
        key = lora.key
        if self.budget.cache.get((self.prefix, key)) is not None:  # (a get marks it recently used)
            return self._names[key]
        for stale in [k for k in self._names if k[0] == key[0]]:  # an earlier version of the same file
            self.budget.cache.discard((self.prefix, stale))
            self._delete(stale, Path(stale[0]).stem, "its file changed on disk", events)
        started = time.perf_counter()
        self._count += 1
        name = f"{self.prefix}lora{self._count}"  # PEFT adapter names must be plain identifiers
        path = key[0]
        try:
            state = diffusers_lora_state(lora.read(), self.pipeline)
            nbytes = sum(t.numel() * t.element_size() for t in state.values())
            self.enabled = None  # loading may switch the layers on again
            with model_offload_lifted(self.pipeline):  # its own failures are not the file's (UnsupportedError)
                try:
                    with quiet_peft_reports(), lora_values_loaded(self.pipeline, name) as values:
                        self.pipeline.load_lora_weights(state, adapter_name=name)
                except LOAD_ERRORS as exc:
                    raise NotLoaded(exc) from exc
        except (*LOAD_ERRORS, NotLoaded) as failed:
            exc = failed.args[0] if isinstance(failed, NotLoaded) else failed
            self._discard_partial(name)
            raise CheckpointError(
                path, f"diffusers cannot load this LoRA ({first_line(exc)})",
                "Check that it is a LoRA for this model's family, in kohya / A1111 or diffusers format",
            ) from None  # fmt: skip
        self._compute_beside_fp8(name, values)
        seconds = time.perf_counter() - started
        layers, found = lora_layer_count(state), self._layers_holding(name)
        if found < layers:  # diffusers loads what matches a module and drops the rest without a word
            self.partial[key] = (
                f"LoRA {lora.label}: {found} of its {layers} layers match a module of this model and act; the other "
                f"{layers - found} match none (a LoRA for another model's layout, or a damaged file)"
            )
            log.warning("%s", self.partial[key])
        log.info("LoRA %s loaded in %.2f s", lora.label, seconds)
        events.append({"event": "lora_loaded", "lora": lora.label, "file": str(path), "seconds": round(seconds, 4)})
        self._names[key] = name
        keep = {(self.prefix, k) for k in needed}
        for old in self.budget.cache.put((self.prefix, key), name, nbytes, label=lora.label, keep=keep):
            owner, old_key = self.budget.owners[old.key[0]], old.key[1]  # this pipeline's, or another's
            owner._delete(old_key, old.label, "LoRA cache budget", events)
        return name

    def _compute_beside_fp8(self, name: str, values: dict) -> None:
        """PEFT makes a LoRA layer in its base layer's dtype: beside a layer kept fp8 by diffusers' layerwise casting
        (an fp8 file's, `loading/quantized.py`) that is fp8, which no hook upcasts and nothing computes in, and its
        values rounded to fp8. imprompt goes beyond diffusers here: those LoRA layers move to the layer's compute
        dtype and take the LoRA's values again as PEFT loaded them (`values`, from `lora_values_loaded`), so they
        equal diffusers' own order (the LoRA loaded, then the casting enabled) while the base weights stay fp8."""
        for component in self.pipeline.components.values():
            if not isinstance(component, torch.nn.Module):
                continue
            loaded = values.get(id(component), {})
            for path, module in component.named_modules():
                lora_a = getattr(module, "lora_A", None)
                hook = casting_hook(module.get_base_layer()) if isinstance(lora_a, torch.nn.ModuleDict) else None
                if hook is None or name not in lora_a:
                    continue
                for layers in ("lora_A", "lora_B"):
                    layer = getattr(module, layers)[name].to(hook.compute_dtype)
                    for key, param in layer.named_parameters():
                        value = loaded.get(f"{path}.{layers}.{name}.{key}")
                        if value is not None:
                            with torch.no_grad():
                                param.copy_(value)

    def _layers_holding(self, name: str) -> int:
        """How many layers of the pipeline's modules hold PEFT adapter `name` (a shared module's counted once)."""
        layers = set()
        for component in self.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                layers |= {id(m) for m in component.modules()
                           if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and name in m.lora_A}  # fmt: skip
        return len(layers)

    def _delete(self, key, label: str, why: str, events: list) -> None:
        self.partial.pop(key, None)
        name = self._names.pop(key)
        self.pipeline.delete_adapters(name)
        self.active = tuple(a for a in self.active if a[0] != name)
        log.info("LoRA %s unloaded: %s", label, why)
        events.append({"event": "lora_evicted", "lora": label, "why": why})

    def _discard_partial(self, name: str) -> None:
        """A load that failed half way may have added layers: remove them so the next request sees none."""
        present = {n for names in self.pipeline.get_list_adapters().values() for n in names}
        if name in present:
            self.pipeline.delete_adapters(name)


LORA_DOWN = ("lora_down.weight", "lora_A.weight", ".down.weight")  # kohya / LyCORIS, PEFT, older diffusers, XLabs


def lora_layer_count(state: dict) -> int:
    """The layers a LoRA file holds: one down projection each, in every format diffusers reads."""
    return sum(key.endswith(LORA_DOWN) for key in state)


LOAD_ERRORS = (ValueError, KeyError, RuntimeError, TypeError, AttributeError)  # diffusers' and PEFT's, on a bad file


class NotLoaded(Exception):
    """diffusers' `load_lora_weights` itself failed (the file's fault), as opposed to the offload hooks around it."""


@contextmanager
def model_offload_lifted(pipeline):
    """diffusers' model CPU offload hooks off while a LoRA loads, and back on the device they had. diffusers'
    `load_lora_weights` lifts them itself but puts them back on its default accelerator (none on the CPU: it
    raises, leaving the pipeline with no hooks); imprompt lifts them first so it does not, and re-installs them
    on the pipeline's own offload device (imprompt goes beyond diffusers here)."""
    from accelerate.hooks import CpuOffload

    modules = [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]
    device = getattr(pipeline, "_offload_device", None)
    if device is None or not any(isinstance(getattr(m, "_hf_hook", None), CpuOffload) for m in modules):
        yield
        return
    pipeline.remove_all_hooks()
    try:
        yield
    finally:
        try:
            pipeline.enable_model_cpu_offload(device=device)
        except LOAD_ERRORS as exc:
            raise UnsupportedError(f"offload=model: diffusers' model CPU offload could not be put back on {device} "
                                   f"after loading a LoRA ({first_line(exc)}); use offload=group or none") from None  # fmt: skip


@contextmanager
def lora_values_loaded(pipeline, name: str):
    """Yields {id(component): {parameter name: tensor}}: the values of adapter `name` as PEFT hands them to the
    `load_state_dict` of each pipeline component that holds layerwise-cast (fp8) layers, before PEFT's cast to
    the base layer's dtype rounds them (`PipelineLoras._compute_beside_fp8` puts them back)."""
    values: dict[int, dict] = {}
    marker = f".{name}."

    def seen(module, state_dict, prefix, *_):
        values.setdefault(id(module), {}).update((k[len(prefix):], v) for k, v in state_dict.items()
                                                 if k.startswith(prefix) and marker in k)  # fmt: skip

    handles = [component.register_load_state_dict_pre_hook(seen) for component in pipeline.components.values()
               if isinstance(component, torch.nn.Module) and layerwise_cast(component)]  # fmt: skip
    try:
        yield values
    finally:
        for handle in handles:
            handle.remove()


def layerwise_cast(module: torch.nn.Module) -> bool:
    """Whether diffusers' layerwise casting (fp8 storage) holds any of the module's layers."""
    return any(casting_hook(layer) is not None for layer in module.modules())


def casting_hook(layer: torch.nn.Module):
    """diffusers' layerwise-casting hook on this layer (its `compute_dtype`), or None."""
    registry = getattr(layer, "_diffusers_hook", None)
    return registry.get_hook("layerwise_casting") if registry is not None else None


@contextmanager
def quiet_peft_reports():
    """Loading a second adapter makes PEFT warn that the model has adapters already and transformers print the
    first adapter's tensors as "MISSING" from the second's file; a UNet-only LoRA makes diffusers say it found no
    text-encoder keys: all expected here, and noise in users' logs. What matters is said by imprompt itself: a
    failed load raises, and a LoRA whose layers match only some modules is counted (`lora_layer_count`) and
    reported on every request that uses it."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" of a UNet-only LoRA
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        transformers_logging.set_verbosity(levels[0])
        diffusers_logging.set_verbosity(levels[1])
