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
from .errors import CheckpointError, RequestError
from .ipadapter.attach import AttachedAdapters, ip_adapter_masks
from .ipadapter.build import BuiltAdapter, build_adapter, load_adapter_state_dict
from .ipadapter.embeddings import ImageEmbedder, load_saved_embeddings, save_embeddings
from .loading.pipelines import load_pipeline
from .models.store import Entry, ModelStore
from .plan import Plan, make_plan, plan_unit
from .request import GenerateRequest, IPAdapterUnit, parse_request, parse_unit
from .util.cache import ByteLRU, parse_bytes
from .util.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, image_digest, load_image, noise_image
from .util.infotext import parameters_text, png_info
from .util.samplers import canonical_sampler, make_scheduler, sampler_label

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
    attached: AttachedAdapters  # the IP-Adapters its UNet carries now
    scheduler_config: dict
    scheduler_class: str
    load_seconds: float
    _img2img: object = None

    def img2img(self):
        """The image-to-image pipeline over the same components (same UNet, so the same attached adapters)."""
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipeline)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


@dataclass
class _UnitInputs:
    images: list
    negatives: list | None
    masks: list | None


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
        encoder_dtype: str | torch.dtype | None = None,
        cache_budget: str | int | None = None,
        embedding_cache_budget: str | int | None = "512MiB",
        adapter_cache_budget: str | int | None = "4GiB",
        default_model: str | None = None,
        allow_paths: bool = True,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_BYTES,
    ):
        """`models`: a models folder (or several). `dtype`: of the pipeline; `encoder_dtype`: of the image
        encoders (default: the same; bfloat16 halves their memory and, on CPUs with bf16 support, their time).
        `cache_budget`: bytes of loaded image encoders kept ("8GiB"; default half the machine's memory).
        Paths as names are allowed unless `allow_paths=False`."""
        self.store = ModelStore(models, allow_paths=allow_paths)
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.encoder_dtype = resolve_dtype(encoder_dtype, self.device) if encoder_dtype else self.dtype
        self.embedder = ImageEmbedder(
            self.device,
            self.encoder_dtype,
            parse_bytes(cache_budget, _default_encoder_budget()),
            parse_bytes(embedding_cache_budget, 512 * 2**20),
        )
        self.adapters = ByteLRU("adapters", parse_bytes(adapter_cache_budget, 4 * 2**30))
        self.default_model = default_model
        self.allow_paths = allow_paths
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
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

    def save_embeddings(self, unit: IPAdapterUnit | dict, path) -> Path:
        """Encode a unit's images once, with the encoder its adapter needs, and write the embeddings to a
        `.safetensors` file that later units can name (`"embeddings": "<file stem or path>"`) instead of images.
        Any adapter that consumes the same output kind and width can use them; others are refused."""
        unit = parse_unit(unit)
        if unit.embeddings:
            raise RequestError("save_embeddings needs images, not saved embeddings")
        path = Path(path)
        with self._lock:
            inputs = self._unit_inputs(0, unit)
            planned = plan_unit(0, unit, self.store)
            embeddings = self._embeddings(planned, inputs, events=[])
            path.parent.mkdir(parents=True, exist_ok=True)
            save_embeddings(embeddings, path, planned.output, planned.encoder, [image_digest(i) for i in inputs.images])
        log.info("embeddings of %d image(s) for %s saved to %s", len(inputs.images), planned.label, path)
        return path

    def interrupt(self) -> None:
        """Stop the running generation after its current step (it returns what it has)."""
        self._interrupt.set()

    @property
    def interrupt_requested(self) -> bool:
        return self._interrupt.is_set()

    def _generate(self, request: GenerateRequest, on_step) -> Result:
        timer, events = _Timer(), []
        sampler = canonical_sampler(request.sampler)
        inputs = [self._unit_inputs(i, unit) for i, unit in enumerate(request.ip_adapters)]
        init_image = self._image(request.init_images[0], "init_images.0") if request.init_images else None
        plan = make_plan(request, self.store, self.default_model)
        timer.mark("plan")

        loaded = self._load_pipeline(plan.pipeline, events)
        built = [self._built_adapter(unit.adapter, loaded, unit.label, events) for unit in plan.units]
        timer.mark("load")

        embeddings = [self._embeddings(unit, unit_inputs, events) for unit, unit_inputs in zip(plan.units, inputs)]
        timer.mark("encode")

        swapped = loaded.attached.attach(built, tuple(u.adapter.key(self.dtype, self.device) for u in plan.units))
        if swapped:
            names = " + ".join(u.label for u in plan.units) or "none"
            log.info("UNet adapters now: %s", names)
            events.append({"event": "adapters_attached", "adapters": [u.label for u in plan.units]})
        timer.mark("attach")

        seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
        width, height = self._size(request, plan, init_image)
        masks = [ip_adapter_masks(unit_inputs.masks, width, height) for unit_inputs in inputs]
        images_out, active_steps = self._denoise(
            loaded, plan, request, embeddings, masks, init_image, seed, width, height, sampler, on_step
        )
        timer.mark("denoise")

        units_info = [
            self._unit_info(u, e, steps) for u, e, steps in zip(plan.units, embeddings, active_steps)
        ]
        label = sampler_label(sampler, loaded.scheduler_class)
        parameters = parameters_text(request, seed, width, height, label, loaded.name, units_info)
        info = {
            "model": loaded.name,
            "mode": "img2img" if init_image is not None else "txt2img",
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": seed,
            "steps": request.steps,
            "cfg_scale": request.cfg_scale,
            "width": width,
            "height": height,
            "batch_size": request.batch_size,
            "sampler": label,
            "denoising_strength": request.denoising_strength if init_image is not None else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "encoder_dtype": str(self.encoder_dtype).removeprefix("torch."),
            "ip_adapters": units_info,
            "events": events,
            "timings": timer.summary(),
            "interrupted": self._interrupt.is_set(),
            "version": __version__,
        }
        return Result(images_out, info, parameters)

    def _image(self, ref, what: str):
        return load_image(ref, what, self.max_image_pixels, self.allow_paths, self.max_image_bytes)

    def _unit_inputs(self, i: int, unit) -> _UnitInputs:
        """Every image a unit brings, decoded (and so checked) before anything else happens."""
        where = f"ip_adapters.{i}"
        images = [self._image(ref, f"{where}.images.{j}") for j, ref in enumerate(unit.images)]
        negatives = None
        if unit.negative_images is not None:
            negatives = [
                noise_image() if ref == "noise" else self._image(ref, f"{where}.negative_images.{j}")
                for j, ref in enumerate(unit.negative_images)
            ]
        masks = None
        if unit.masks is not None:
            masks = [self._image(ref, f"{where}.masks.{j}") for j, ref in enumerate(unit.masks)]
        return _UnitInputs(images, negatives, masks)

    def _embeddings(self, unit, inputs: _UnitInputs, events: list):
        if unit.embeddings is not None:
            return load_saved_embeddings(unit.embeddings, self.device, self.encoder_dtype)
        return self.embedder.embed(
            unit.encoder, unit.output, inputs.images, unit.label, unit.why, events, inputs.negatives, unit.unit.average
        )

    @staticmethod
    def _size(request, plan: Plan, init_image) -> tuple[int, int]:
        """Requested size; else the init image's size (to a multiple of 8); else the model's native size."""
        if init_image is not None:
            default_w, default_h = (max(64, d - d % 8) for d in init_image.size)
        else:
            default_w = default_h = plan.pipeline.spec.default_size
        return request.width or default_w, request.height or default_h

    def _denoise(self, loaded, plan: Plan, request, embeddings, masks, init_image, seed, width, height, sampler,
                 on_step):  # fmt: skip
        pipeline = loaded.pipeline if init_image is None else loaded.img2img()
        pipeline.scheduler = make_scheduler(sampler, loaded.scheduler_config, loaded.scheduler_class)
        units = [u.unit for u in plan.units]
        weights = [u.layer_weights for u in plan.units]
        active_steps: list[list[int]] = [[] for _ in units]

        def set_scales(step: int, total: int) -> None:
            active = [u.active_at(step, total) for u in units]
            for i, on in enumerate(active):
                if on:
                    active_steps[i].append(step)
            loaded.attached.set_scales([u.scale if on else 0.0 for u, on in zip(units, active)], weights)

        def step_end(pipe, step, timestep, tensors):
            total = pipe.num_timesteps
            if step + 1 < total:
                set_scales(step + 1, total)
            if on_step is not None:
                on_step(step + 1, total)
            if self._interrupt.is_set():
                pipe._interrupt = True
            return tensors

        cfg = request.cfg_scale > 1.0  # diffusers applies classifier-free guidance only above 1
        kwargs = {}
        if units:
            kwargs["ip_adapter_image_embeds"] = [
                e.for_pipeline(cfg).to(device=self.device, dtype=pipeline.unet.dtype) for e in embeddings
            ]
        if any(m is not None for m in masks):
            kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": masks}
        if init_image is None:
            kwargs.update(width=width, height=height)
        else:
            kwargs.update(image=init_image.resize((width, height), Image.Resampling.LANCZOS),
                          strength=request.denoising_strength)  # fmt: skip
        set_scales(0, request.steps)  # step 0 acts iff start == 0 < end, whatever the number of steps
        output = pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.steps,
            guidance_scale=request.cfg_scale,
            num_images_per_prompt=request.batch_size,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            callback_on_step_end=step_end,
            output_type="pil",
            **kwargs,
        )
        return list(output.images), active_steps

    def _unit_info(self, unit, embeddings, active_steps: list[int]) -> dict:
        a = unit.adapter.spec
        if unit.encoder is not None:
            encoder, encoder_file, architecture = unit.encoder.name, str(unit.encoder.path), unit.encoder.spec.architecture
        else:  # saved embeddings: the encoder they came from, as recorded in the file
            saved = unit.embeddings.spec
            encoder, encoder_file, architecture = saved.encoder, saved.path, saved.encoder_architecture
        return {
            "adapter": unit.label,
            "file": str(a.path),
            "variant": a.variant,
            "consumes": a.consumes,
            "embed_dim": a.embed_dim,
            "tokens": a.tokens,
            "encoder": encoder,
            "encoder_file": encoder_file,
            "encoder_architecture": architecture,
            "encoder_source": embeddings.encoder_source,
            "encoder_why": unit.why,
            "embeddings": embeddings.embeddings,
            "images": len(embeddings.embeddings),
            "scale": unit.unit.scale,
            "start": unit.unit.start,
            "end": unit.unit.end,
            "active_steps": active_steps,
            "masked": unit.unit.masks is not None,
            "averaged": unit.unit.average,
            "layers": unit.unit.layers,
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
        attached = AttachedAdapters(pipeline.unet)
        if tuple(attached.names) != tuple(entry.spec.layer_names):
            raise CheckpointError(
                entry.path,
                f"the loaded UNet's cross-attention layers {attached.names[:2]}... differ from its weights file's "
                f"{entry.spec.layer_names[:2]}...; the pipeline folder is inconsistent",
            )
        self._pipeline = _LoadedPipeline(
            key=key,
            name=entry.name,
            pipeline=pipeline,
            attached=attached,
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
            "encoders": self.embedder.encoders.stats(),
            "embeddings": self.embedder.embeddings.stats(),
            "adapters": self.adapters.stats(),
            "model": self._pipeline.name if self._pipeline else None,
        }

    def clear_cache(self) -> dict:
        """Drop loaded encoders, embeddings and built adapters (the loaded model stays)."""
        with self._lock:
            if self._pipeline is not None:
                self._pipeline.attached.attach([], ())
                self._pipeline.attached.forget_shells()
            cleared = self.embedder.clear()
            cleared["adapters"] = self.adapters.clear()
            return cleared
