"""Engine.generate(request) -> Result: the data flow, and nothing else.

    request -> images -> plan (resolve + probe + validate, no compute) -> pipeline -> adapters -> embeddings
            -> attach (the UNet carries exactly this request's adapters) -> denoise -> result

Output depends on the request alone: every step either rebuilds its state from the request (scheduler, scales,
attached set, generator) or takes it from a cache keyed by what determines it (file fingerprints, image content,
dtype). A request that fails before `attach` changes nothing the next request can see.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from . import __version__
from .adapters import AdapterSlots, BuiltAdapter, build_adapter
from .cache import ByteLRU, parse_bytes
from .encoders import Encoders
from .errors import RequestError
from .images import DEFAULT_MAX_PIXELS, load_image
from .infotext import parameters_text, png_info
from .loading import load_adapter_state_dict, load_pipeline
from .plan import Plan, make_plan
from .samplers import canonical_sampler, make_scheduler, sampler_label
from .schema import GenerateRequest, parse_request
from .store import Entry, ModelStore

log = logging.getLogger("imprompt")


@dataclass
class Result:
    images: list[Image.Image]
    info: dict
    parameters: str

    def save(self, path, index: int = 0) -> Path:
        """Write one image as PNG with the A1111 `parameters` text chunk."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.images[index].save(path, pnginfo=png_info(self.parameters))
        return path


@dataclass
class _LoadedPipeline:
    key: tuple
    name: str
    pipeline: object
    slots: AdapterSlots
    scheduler_config: dict
    scheduler_class: str
    load_seconds: float


@dataclass
class _Timer:
    marks: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    _last: float = field(default_factory=time.perf_counter)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = round(now - self._last, 4)
        self._last = now

    def summary(self) -> dict:
        return {**self.marks, "total": round(time.perf_counter() - self.started, 4)}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}  # fmt: skip
    if str(dtype).lower() not in names:
        raise RequestError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16 or auto")
    return names[str(dtype).lower()]


def _default_encoder_budget() -> int:
    """Half the machine's memory: room for ViT-H and ViT-bigG together on a 32 GB machine in fp32."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class Engine:
    """Generates images from a text prompt plus image prompts (IP-Adapter units) with any mix of adapters."""

    def __init__(
        self,
        models,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        cache_budget: str | int | None = None,
        embedding_cache_budget: str | int | None = "512MiB",
        adapter_cache_budget: str | int | None = "4GiB",
        default_model: str | None = None,
        allow_paths: bool = True,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        """`models`: a models folder (or several). `cache_budget`: bytes of loaded image encoders kept
        ("8GiB"; default half the machine's memory). Paths as names are allowed unless `allow_paths=False`."""
        self.store = ModelStore(models, allow_paths=allow_paths)
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.encoders = Encoders(
            self.device,
            self.dtype,
            parse_bytes(cache_budget, _default_encoder_budget()),
            parse_bytes(embedding_cache_budget, 512 * 2**20),
        )
        self.adapters = ByteLRU("adapters", parse_bytes(adapter_cache_budget, 4 * 2**30))
        self.default_model = default_model
        self.allow_paths = allow_paths
        self.max_image_pixels = max_image_pixels
        self._pipeline: _LoadedPipeline | None = None
        self._lock = threading.Lock()
        self._interrupt = threading.Event()

    # ----------------------------------------------------------------------------------------------- generation

    def generate(self, request: GenerateRequest | dict | None = None, on_step=None, **fields) -> Result:
        """Generate images. Accepts a `GenerateRequest`, a dict, or its fields as keyword arguments.
        `on_step(step, total)` is called after every denoising step. One generation runs at a time."""
        request = parse_request(request, **fields)
        with self._lock:
            self._interrupt.clear()
            return self._generate(request, on_step)

    def interrupt(self) -> None:
        """Stop the running generation after its current step (it returns what it has)."""
        self._interrupt.set()

    def _generate(self, request: GenerateRequest, on_step) -> Result:
        timer, events = _Timer(), []
        sampler = canonical_sampler(request.sampler)
        images = [
            [
                load_image(ref, f"ip_adapters.{i}.images.{j}", self.max_image_pixels, self.allow_paths)
                for j, ref in enumerate(unit.images)
            ]
            for i, unit in enumerate(request.ip_adapters)
        ]
        plan = make_plan(request, self.store, self.default_model)
        timer.mark("plan")

        loaded = self._load_pipeline(plan.pipeline, events)
        built = [self._built_adapter(unit.adapter, loaded, unit.label, events) for unit in plan.units]
        timer.mark("load")

        cfg = request.cfg_scale > 1.0  # diffusers applies classifier-free guidance only above 1
        embeddings = [
            self.encoders.embed(unit.encoder, unit.adapter.spec.consumes, unit_images, unit.label, unit.why, events)
            for unit, unit_images in zip(plan.units, images)
        ]
        timer.mark("encode")

        swapped = loaded.slots.attach(built, tuple(u.adapter.key(self.dtype, self.device) for u in plan.units))
        if swapped:
            names = " + ".join(u.label for u in plan.units) or "none"
            log.info("UNet adapters now: %s", names)
            events.append({"event": "adapters_attached", "adapters": [u.label for u in plan.units]})
        timer.mark("attach")

        seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
        width = request.width or plan.pipeline.spec.default_size
        height = request.height or plan.pipeline.spec.default_size
        images_out = self._denoise(loaded, plan, request, embeddings, cfg, seed, width, height, sampler, on_step)
        timer.mark("denoise")

        units_info = [self._unit_info(u, e) for u, e in zip(plan.units, embeddings)]
        label = sampler_label(sampler, loaded.scheduler_class)
        parameters = parameters_text(request, seed, width, height, label, loaded.name, units_info)
        info = {
            "model": loaded.name,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": seed,
            "steps": request.steps,
            "cfg_scale": request.cfg_scale,
            "width": width,
            "height": height,
            "batch_size": request.batch_size,
            "sampler": label,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "ip_adapters": units_info,
            "events": events,
            "timings": timer.summary(),
            "interrupted": self._interrupt.is_set(),
            "version": __version__,
        }
        return Result(images_out, info, parameters)

    def _denoise(self, loaded, plan: Plan, request, embeddings, cfg, seed, width, height, sampler, on_step):
        pipeline = loaded.pipeline
        pipeline.scheduler = make_scheduler(sampler, loaded.scheduler_config, loaded.scheduler_class)
        units = [u.unit for u in plan.units]
        loaded.slots.set_scales([u.scale if u.active_at(0, request.steps) else 0.0 for u in units])

        def step_end(pipe, step, timestep, tensors):
            total = pipe.num_timesteps
            if any(u.start > 0 or u.end < 1 for u in units):
                loaded.slots.set_scales([u.scale if u.active_at(step + 1, total) else 0.0 for u in units])
            if on_step is not None:
                on_step(step + 1, total)
            if self._interrupt.is_set():
                pipe._interrupt = True
            return tensors

        kwargs = {}
        if units:
            kwargs["ip_adapter_image_embeds"] = [
                e.for_pipeline(cfg).to(device=self.device, dtype=pipeline.unet.dtype) for e in embeddings
            ]
        output = pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            width=width,
            height=height,
            num_images_per_prompt=request.batch_size,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            callback_on_step_end=step_end,
            output_type="pil",
            **kwargs,
        )
        return list(output.images)

    def _unit_info(self, unit, embeddings) -> dict:
        a, e = unit.adapter.spec, unit.encoder.spec
        return {
            "adapter": unit.label,
            "file": str(a.path),
            "variant": a.variant,
            "consumes": a.consumes,
            "embed_dim": a.embed_dim,
            "tokens": a.tokens,
            "encoder": unit.encoder.name,
            "encoder_file": str(e.path),
            "encoder_architecture": e.architecture,
            "encoder_source": embeddings.encoder_source,
            "encoder_why": unit.why,
            "embeddings": embeddings.embeddings,
            "images": len(embeddings.embeddings),
            "scale": unit.unit.scale,
            "start": unit.unit.start,
            "end": unit.unit.end,
        }

    # --------------------------------------------------------------------------------------- loading, cached

    def _load_pipeline(self, entry: Entry, events: list) -> _LoadedPipeline:
        key = entry.key(self.dtype, self.device)
        if self._pipeline is not None and self._pipeline.key == key:
            return self._pipeline
        if self._pipeline is not None:
            log.info("model %s unloaded to make room for %s", self._pipeline.name, entry.name)
            events.append({"event": "model_unloaded", "model": self._pipeline.name, "why": f"{entry.name} requested"})
            self._pipeline = None
        started = time.perf_counter()
        pipeline = load_pipeline(entry.spec, self.device, self.dtype)
        seconds = time.perf_counter() - started
        log.info("model %s loaded in %.2f s", entry.name, seconds)
        events.append({"event": "model_loaded", "model": entry.name, "seconds": round(seconds, 4)})
        self._pipeline = _LoadedPipeline(
            key=key,
            name=entry.name,
            pipeline=pipeline,
            slots=AdapterSlots(pipeline.unet),
            scheduler_config=dict(pipeline.scheduler.config),
            scheduler_class=type(pipeline.scheduler).__name__,
            load_seconds=seconds,
        )
        return self._pipeline

    def _built_adapter(self, entry: Entry, loaded: _LoadedPipeline, label: str, events: list) -> BuiltAdapter:
        key = entry.key(self.dtype, self.device)
        built = self.adapters.get(key)
        if built is not None:
            return built
        self.adapters.discard_older_versions(key)
        started = time.perf_counter()
        state = load_adapter_state_dict(entry.spec)
        built = build_adapter(entry.spec, state, loaded.pipeline.unet)
        seconds = time.perf_counter() - started
        for old in self.adapters.put(key, built, built.nbytes, label=entry.name):
            log.info("adapter %s evicted from cache (budget %d bytes)", old.label, self.adapters.budget_bytes)
            events.append({"event": "adapter_evicted", "adapter": old.label, "why": "adapter cache budget"})
        log.info("adapter %s (%s) loaded in %.2f s", label, entry.path.name, seconds)
        events.append({"event": "adapter_loaded", "adapter": label, "file": str(entry.path), "seconds": round(seconds, 4)})
        return built

    # ------------------------------------------------------------------------------------------ introspection

    def cache_info(self) -> dict:
        return {
            "encoders": self.encoders.loaded.stats(),
            "embeddings": self.encoders.embeddings.stats(),
            "adapters": self.adapters.stats(),
            "model": self._pipeline.name if self._pipeline else None,
        }

    def clear_cache(self) -> dict:
        """Drop loaded encoders, embeddings and built adapters (the loaded model stays)."""
        with self._lock:
            if self._pipeline is not None:
                self._pipeline.slots.attach([], ())
            cleared = self.encoders.clear()
            cleared["adapters"] = self.adapters.clear()
            return cleared
