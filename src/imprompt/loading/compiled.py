"""`--compile`: a resident model's denoiser compiled once, and kept compiled while requests switch what it carries.

torch.compile's graph holds as long as its guards do, and a guard fails on any Python state the forward reads that
a request changed. imprompt goes beyond diffusers (whose IP-Adapter and LoRA switching recompile the model on
nearly every switch: docs/research/compile-across-switches.md) by keeping that state out of the forward:

    IP-Adapter units    `ipadapter/slots.py`: fixed processors reading tensors (a UNet's units only)
    LoRAs               float32: baked into the denoiser's weights in place (`LoraBaker`, as A1111 applies them) with
                        PEFT's layers switched off in it, so the forward reads base weights only; a LoRA set change
                        rewrites weights, never the graph (the text encoders, not compiled, keep PEFT's layers)
    shapes              torch's automatic dynamic shapes: a size, batch or token count that changes compiles once
                        more, with that dimension dynamic from then on

What the compiled graph cannot take runs eager for that call (`torch.compiler.set_stance("force_eager")`), the
graph kept for the next: SD 3.5 / FLUX image-prompt units, PuLID, LoRAs whose baking would change the picture (a
float16 / bfloat16 model's) or cannot be done (DoRA, fp8 / GGUF-stored layers). Each graph compiled is counted
(`CompiledDenoiser.graphs`), so a test and `/cache` can show how many a sequence of requests cost (the bound is in
docs/compile.md).
"""

from __future__ import annotations

import inspect
import logging
import time
from contextlib import contextmanager

import torch

log = logging.getLogger("imprompt")

RECOMPILE_LIMIT = 64  # graphs per code object before torch falls back to eager (its default 8 is shared by every model)


class GraphCounter:
    """A torch.compile backend that counts the graphs it is given and hands them to the real backend."""

    def __init__(self, backend: str):
        self.backend = backend
        self.graphs = 0
        self.seconds = 0.0

    def __call__(self, graph, example_inputs):
        from torch._dynamo import lookup_backend

        self.graphs += 1
        started = time.perf_counter()
        compiled = lookup_backend(self.backend)(graph, example_inputs)
        self.seconds += time.perf_counter() - started
        log.info("compile: graph %d of a denoiser made by backend %s (%d inputs)", self.graphs, self.backend,
                 len(example_inputs))  # fmt: skip
        return compiled


class CompiledDenoiser:
    """A pipeline's UNet or transformer with its `forward` compiled (an instance attribute, so what wraps the forward
    for a call, `prompting.conds.ConditionedUNet`, stays eager around the compiled one), with its graph count."""

    def __init__(self, module: torch.nn.Module, backend: str):
        self.module = module
        self.counter = GraphCounter(backend)
        self.eager_calls = 0
        # imprompt beyond diffusers: torch's limit (8) counts the graphs of one code object, and every diffusers
        # denoiser's forward goes through the same LoRA-scale wrapper: raised for the process, for all models
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, RECOMPILE_LIMIT)
        # the graph guards each parameter's requires_grad, which PEFT's first LoRA load turns off in the base
        # layers: off from the start (nothing here trains)
        module.requires_grad_(False)
        self.wrapped = wrap_for_loras(module)
        signature = inspect.signature(module.forward)
        first = next(iter(signature.parameters))
        compiled = torch.compile(module.forward, backend=self.counter)

        def forward(*args, **kwargs):
            """Every call in one form, which the graph guards: each argument by name, the defaults filled in (the
            pipeline passes the text by name, a prompt schedule's rows by position), the latent contiguous (a
            VAE-encoded one, img2img's, comes in another memory layout)."""
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments[first] = arguments[first].contiguous()
            for name, parameter in signature.parameters.items():
                if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                    arguments.update(arguments.pop(name))
            return compiled(**arguments)

        module.forward = forward

    @property
    def graphs(self) -> int:
        return self.counter.graphs

    @contextmanager
    def running(self, eager_reasons: list[str]):
        """A call: compiled, or eager where the request carries something the graph cannot take (its reasons)."""
        if not eager_reasons:
            yield
            return
        self.eager_calls += 1
        log.info("compile: this call runs eager (%s); the compiled graph is kept", "; ".join(eager_reasons))
        with torch.compiler.set_stance("force_eager"):
            yield

    def stats(self) -> dict:
        return {"backend": self.counter.backend, "graphs": self.graphs, "eager_calls": self.eager_calls,
                "compile_seconds": round(self.counter.seconds, 3)}  # fmt: skip


PREWRAP = "imprompt_prewrap"  # the PEFT adapter that wraps every layer once, removed at once


def wrap_for_loras(module: torch.nn.Module) -> int:
    """Every Linear and Conv2d of the denoiser wrapped in PEFT's LoRA layer now, adapters off: the graph guards
    each layer's class, and a LoRA's first load would otherwise turn the layers it targets from `Linear` into
    PEFT's `lora.Linear`, invalidating every graph compiled before (each LoRA with new targets: once per kwarg
    structure). Later LoRAs add adapters to these wrappers. Returns the layers wrapped."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    targets = [name for name, layer in module.named_modules() if type(layer) in (torch.nn.Linear, torch.nn.Conv2d)]
    if not targets:
        return 0
    had_config = hasattr(module, "peft_config")
    inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, target_modules=targets), module, adapter_name=PREWRAP)
    layers = [layer for layer in module.modules() if isinstance(layer, LoraLayer)]
    for layer in layers:
        layer.delete_adapter(PREWRAP)
        layer.enable_adapters(False)
    getattr(module, "peft_config", {}).pop(PREWRAP, None)
    if not had_config and getattr(module, "peft_config", None) == {}:
        del module.peft_config  # diffusers reads its presence as "a LoRA was loaded"
    return len(layers)


def not_compiled_because(denoiser: torch.nn.Module, offloaded: bool) -> str | None:
    """Why a denoiser is left eager under `--compile`, or None: diffusers' offload hooks move weights inside the
    forward, and fp8 / GGUF storage computes through per-layer hooks and tensor subclasses (not measured here)."""
    from .loras import layerwise_cast

    if offloaded:
        return "its memory plan offloads it (weights move in during the forward)"
    if layerwise_cast(denoiser) or any(type(p).__name__ == "GGUFParameter" for p in denoiser.parameters()):
        return "its weights are stored fp8 / GGUF"
    return None


def denoiser_of(pipeline) -> torch.nn.Module:
    """The module `--compile` compiles: the UNet, or an SD 3.5 / FLUX transformer."""
    return pipeline.unet if getattr(pipeline, "unet", None) is not None else pipeline.transformer


class LoraBaker:
    """A compiled denoiser's LoRAs as weights: each PEFT-wrapped layer's base weight becomes its original plus the
    active adapters' deltas (PEFT's own `get_delta_weight`, at the weights `set_adapters` set), summed in float32,
    and PEFT's layers are switched off in the denoiser. The originals are kept (memory: the touched layers' weights
    once more) and written back when the set changes or no LoRA acts."""

    def __init__(self, denoiser: torch.nn.Module):
        self.denoiser = denoiser
        self.saved: dict[torch.nn.Module, torch.Tensor] = {}  # base layer -> its weight before any LoRA

    def refusal(self, active: list[str]) -> str | None:
        """Why the `active` LoRAs cannot be baked, if so: a half-precision model (W + ΔW rounded to 8 or 11 bits is
        up to 14/255 off PEFT's unfused W x + B A x, measured in bfloat16), layers stored fp8 / GGUF, a DoRA or
        bias LoRA."""
        for layer in self.lora_layers():
            names = [name for name in active if name in layer.lora_A]
            if not names:
                continue
            base = layer.get_base_layer()
            weight = getattr(base, "weight", None)
            if type(base) not in (torch.nn.Linear, torch.nn.Conv2d) or weight is None or not weight.is_floating_point():
                return f"a LoRA on {type(base).__name__} layers stored {getattr(weight, 'dtype', None)} is not baked"
            if weight.dtype != torch.float32:
                return (f"LoRAs on a {str(weight.dtype).removeprefix('torch.')} model are not baked into its weights "
                        "(the rounding would change the picture): they act as PEFT layers, eager")  # fmt: skip
            if any(layer.lora_variant.get(n) for n in names) or any(layer.lora_bias.get(n) for n in names):
                return "a DoRA or bias LoRA is not baked"
        return None

    def lora_layers(self) -> list:
        from peft.tuners.lora import LoraLayer

        return [m for m in self.denoiser.modules() if isinstance(m, LoraLayer)]

    def bake(self, active: list[str]) -> int:
        """The base weights as `active` adapters (PEFT names, weights already set) make them; PEFT's layers off in the
        denoiser. Returns the layers rewritten."""
        rewritten = 0
        with torch.no_grad():
            for layer in self.lora_layers():
                base = layer.get_base_layer()
                names = [name for name in active if name in layer.lora_A]
                if names:
                    original = self.saved.setdefault(base, base.weight.detach().clone())
                    total = original.float()
                    for name in names:
                        total = total + layer.get_delta_weight(name).float()
                    base.weight.copy_(total.to(base.weight.dtype))
                    rewritten += 1
                elif base in self.saved:
                    base.weight.copy_(self.saved.pop(base))
                    rewritten += 1
                layer.enable_adapters(False)
        return rewritten

    def restore(self) -> None:
        """Every baked weight back as loaded (before the LoRA layers are deleted, or the model leaves)."""
        with torch.no_grad():
            for base, original in self.saved.items():
                base.weight.copy_(original)
        self.saved.clear()
