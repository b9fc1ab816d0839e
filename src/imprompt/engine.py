"""Engine.generate(request) -> Result: the data flow, and nothing else.

    request -> images -> plan (resolve + probe + validate, no compute) -> pipeline -> adapters -> embeddings
            -> attach (the UNet carries exactly this request's adapters) -> LoRAs, VAE, prompt embeddings
            -> denoise -> result

Output depends on the request alone: every step either rebuilds its state from the request (scheduler, scales,
attached set, generator) or takes it from a cache keyed by what determines it (file fingerprints, image content,
dtype). A request that fails before `attach` changes nothing the next request can see.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__
from .errors import CheckpointError, IncompatibleError, LimitError, RequestError
from .ipadapter.attach import AttachedAdapters, ip_adapter_masks
from .ipadapter.build import BuiltAdapter, build_adapter, load_adapter_state_dict
from .ipadapter.dit import AttachedTransformerAdapters, build_transformer_adapter
from .ipadapter.embeddings import (
    ImageEmbedder,
    UnitEmbeddings,
    face_embeddings,
    given_face_embeddings,
    unconditional,
    load_saved_embeddings,
    save_embeddings,
)
from .ipadapter.faces import FaceAnalyzer, insightface_roots
from .loading.loras import LoraBudget, LoraUse, PipelineLoras, lora_file
from .loading.pipelines import component_identities, load_pipeline
from .loading.resident import LoadedPipeline, ResidentPipelines
from .loading.tensors import first_line
from .loading.textual_inversions import load_inversion
from .loading.vaes import load_vae, needs_tiling
from .models.store import Entry, ModelStore
from .plan import Plan, make_plan, plan_unit
from .prompting.encode import encode_prompts
from .request import GenerateRequest, IPAdapterUnit, parse_request, parse_unit
from .util.cache import ByteLRU, module_bytes, parse_bytes
from .util.devices import activation_budget as default_activation_budget
from .util.devices import default_budget, default_device, release_memory, resolve_dtype
from .util.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, image_digest, image_to_base64, load_image, noise_image
from .util.infotext import image_fields, parameters_text, png_info
from .util.samplers import a1111_names, canonical_sampler, make_scheduler

log = logging.getLogger("imprompt")


@dataclass
class Result:
    images: list[Image.Image]
    info: dict
    infotexts: list[str]  # A1111's "parameters" text of each image (each with its own seed)

    @property
    def parameters(self) -> str:
        """The first image's infotext (A1111's `parameters` field)."""
        return self.infotexts[0]

    def save(self, path, index: int = 0) -> Path:
        """Write one image as PNG with its A1111 `parameters` text chunk."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.images[index].save(path, pnginfo=png_info(self.infotexts[index]))
        return path


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


class UnitSchedule:
    """One request's per-step unit scales (their start / end windows, times their per-layer weights) and the
    step-end callback diffusers calls: the same for UNet and transformer pipelines. `index` is the batch image
    being made; the steps each unit acted at are recorded for the first."""

    def __init__(self, attached, plan: Plan, batch_size: int, on_step, interrupt: threading.Event):
        self.attached, self.batch_size, self.on_step, self.interrupt = attached, batch_size, on_step, interrupt
        self.units = [u.unit for u in plan.units]
        self.weights = [u.layer_weights for u in plan.units]
        self.active_steps: list[list[int]] = [[] for _ in self.units]
        self.index = 0

    def set_scales(self, step: int, total: int) -> None:
        active = [u.active_at(step, total) for u in self.units]
        for i, on in enumerate(active):
            if on and self.index == 0:
                self.active_steps[i].append(step)
        self.attached.set_scales([u.scale if on else 0.0 for u, on in zip(self.units, active)], self.weights)

    def step_end(self, pipe, step, timestep, tensors):
        total = pipe.num_timesteps
        if step + 1 < total:
            self.set_scales(step + 1, total)
        if self.on_step is not None:
            self.on_step(self.index * total + step + 1, self.batch_size * total)
        if self.interrupt.is_set():
            pipe._interrupt = True
        return tensors


class Engine:
    """Generates images from a text prompt plus image prompts (IP-Adapter units) with any mix of adapters."""

    def __init__(
        self,
        models,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        encoder_dtype: str | torch.dtype | None = None,
        cache_budget: str | int | None = None,
        embedding_cache_budget: str | int | None = None,
        adapter_cache_budget: str | int | None = None,
        lora_cache_budget: str | int | None = None,
        pipeline_cache_budget: str | int | None = None,
        offload_budget: str | int | None = None,
        default_model: str | None = None,
        allow_paths: bool = True,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_image_bytes: int = DEFAULT_MAX_BYTES,
        max_units: int = 8,
        max_images: int = 16,
        insightface_root: str | Path | None = None,
        activation_budget: str | int | None = None,
    ):
        """`models`: a models folder (or several). `dtype`: of the pipeline; `encoder_dtype`: of the image
        encoders (default: the same; bfloat16 halves their memory and, on CPUs with bf16 support, their time).
        Budgets ("8GiB", "512MB", bytes) of the caches, on the device the models live on: `cache_budget` for loaded
        image encoders (default half the RAM on the CPU, 30 % of the GPU's memory on CUDA), `adapter_cache_budget`
        for built adapters, `embedding_cache_budget` for embeddings, `lora_cache_budget` for LoRAs loaded into the
        pipeline, `pipeline_cache_budget` for base models kept loaded, and on a GPU `offload_budget` for base models
        waiting in CPU memory (see `util/devices.py`).
        Paths as names are allowed unless `allow_paths=False`. `max_units` per request and `max_images` per unit
        are checked before any image is decoded. `insightface_root`: where InsightFace's model pack is (FaceID from
        images; see `ipadapter/faces.py` for where else it is looked for). `activation_budget`: the device memory
        a generation may use beyond the caches (default: what their shares leave, `util/devices.py`); an image whose
        VAE decode would need more is decoded tile by tile."""
        self.store = ModelStore(models, allow_paths=allow_paths)
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.encoder_dtype = resolve_dtype(encoder_dtype, self.device) if encoder_dtype else self.dtype
        self.embedder = ImageEmbedder(
            self.device,
            self.encoder_dtype,
            parse_bytes(cache_budget, default_budget("encoders", self.device)),
            parse_bytes(embedding_cache_budget, default_budget("embeddings", self.device)),
        )
        self.faces = FaceAnalyzer(insightface_roots(self.store.roots, insightface_root))
        self.adapters = ByteLRU("adapters", parse_bytes(adapter_cache_budget, default_budget("adapters", self.device)))
        self.loras = LoraBudget(parse_bytes(lora_cache_budget, default_budget("loras", self.device)))
        self.vaes = ByteLRU("vaes", default_budget("vaes", self.device))
        self.inversions = ByteLRU("textual-inversions", default_budget("inversions", self.device))
        self.default_model = default_model
        self.allow_paths = allow_paths
        self.max_image_pixels = max_image_pixels
        self.max_image_bytes = max_image_bytes
        self.max_units, self.max_images = max_units, max_images
        self._pipeline_loads = itertools.count()  # numbers each loaded pipeline's LoRA adapter names
        self.pipelines = ResidentPipelines(
            self.device,
            parse_bytes(pipeline_cache_budget, default_budget("pipelines", self.device)),
            parse_bytes(offload_budget, default_budget("offload", self.device) if self.device.type == "cuda" else 0),
        )
        self.activation_budget = parse_bytes(activation_budget, default_activation_budget(self.device))
        self._lock = threading.Lock()
        self._interrupt = threading.Event()

    # ----------------------------------------------------------------------------------------------- generation

    def generate(self, request: GenerateRequest | dict | None = None, on_step=None,
                 embeddings: dict[int, UnitEmbeddings] | None = None, **fields) -> Result:  # fmt: skip
        """Generate images. Accepts a `GenerateRequest`, a dict, or its fields as keyword arguments.
        `on_step(step, total)` is called after every denoising step. One generation runs at a time.
        `embeddings`: finished embeddings of some units (by unit index), made elsewhere by `embed` (a cluster's
        encoder workers); the other units are encoded here. Either way the pipeline only sees finished embeddings."""
        request = parse_request(request, **fields)
        self.check_limits(request)
        with self._lock:
            self._interrupt.clear()
            return self._generate(request, on_step, embeddings or {})

    def plan(self, request: GenerateRequest | dict) -> Plan:
        """Everything a request would be refused for (images, names, pairings, limits), checked without loading
        or computing anything: a cluster's ingress calls this before it hands the request to any worker."""
        request = parse_request(request)
        self.check_limits(request)
        return self._prepare(request)[0]

    def embed(self, request: GenerateRequest | dict, index: int) -> tuple[UnitEmbeddings, list[dict]]:
        """The finished embeddings of unit `index` of `request` (on the CPU, to travel), and the events of making
        them: the same step `generate` takes for a unit, run on its own (a cluster's encoder worker)."""
        request = parse_request(request)
        unit = request.ip_adapters[index]
        events: list[dict] = []
        with self._lock:
            inputs = self._unit_inputs(index, unit)
            planned = plan_unit(index, unit, self.store, self.store.pipeline(request.model) if request.model else None)
            embeddings = self._embeddings(planned, inputs, events, request.true_cfg_scale > 1.0)
        return embeddings.to("cpu"), events

    def unload(self, kind: str, key: tuple) -> bool:
        """Drop one loaded pipeline ("pipeline") or image encoder ("encoder") by its cache key, waiting for a running
        generation; a cluster's worker does this when Ray's model multiplexing lets the model go."""
        with self._lock:
            if kind == "pipeline":
                return self.pipelines.unload(key)
            return self.embedder.unload(key)

    def preload(self, model: str) -> list[dict]:
        """Load a model before any request needs it (the server does this as it starts, so that the first request
        does not wait for the load). Returns the load's events; a failed load raises as a request would."""
        events: list[dict] = []
        with self._lock:
            self._load_pipeline(self.store.pipeline(model), events)
        return events

    def preload_encoder(self, entry: Entry) -> list[dict]:
        """Load an image encoder before a unit needs it (a cluster's encoder worker, as Ray routes a new encoder
        to it). Returns the load's events."""
        events: list[dict] = []
        with self._lock:
            self.embedder.load(entry, "preloaded for the cluster's routing", events)
        return events

    def check_limits(self, request: GenerateRequest) -> None:
        """How many units and images a request may bring: checked before any image is decoded (a body of 64 MiB
        holds 100,000 tiny PNGs, each an encoder pass). The server calls this before it queues a job."""
        if len(request.ip_adapters) > self.max_units:
            raise LimitError(
                f"ip_adapters: {len(request.ip_adapters)} units is more than the {self.max_units} a request may have; "
                f"send fewer (the server's --max-units sets the limit)"
            )
        for i, unit in enumerate(request.ip_adapters):  # masks and negative images never outnumber the images
            faces = unit.face_embeddings if isinstance(unit.face_embeddings, list) else []
            if len(faces) > self.max_images:
                raise LimitError(
                    f"ip_adapters.{i}.face_embeddings: {len(faces)} faces is more than the {self.max_images} a unit "
                    f"may have; send fewer (the server's --max-images sets the limit)"
                )
            if len(unit.images) > self.max_images:
                raise LimitError(
                    f"ip_adapters.{i}.images: {len(unit.images)} is more than the {self.max_images} a unit may have; "
                    f"send fewer, or average them once with `imprompt embed` (the server's --max-images sets the limit)"
                )

    def save_embeddings(self, unit: IPAdapterUnit | dict, path) -> Path:
        """Encode a unit's images once, with the encoder its adapter needs, and write the embeddings to a
        `.safetensors` file that later units can name (`"embeddings": "<file stem or path>"`) instead of images.
        Any adapter that consumes the same output kind and width can use them; others are refused."""
        unit = parse_unit(unit)
        if unit.embeddings or unit.face_embeddings is not None:
            raise RequestError("save_embeddings needs images, not embeddings")
        path = Path(path)
        with self._lock:
            inputs = self._unit_inputs(0, unit)
            planned = plan_unit(0, unit, self.store)
            embeddings = self._embeddings(planned, inputs, events=[])
            path.parent.mkdir(parents=True, exist_ok=True)
            save_embeddings(embeddings, path, planned.output, planned.encoder, [image_digest(i) for i in inputs.images],
                            planned.adapter.spec.face_embedding)  # fmt: skip
        log.info("embeddings of %d image(s) for %s saved to %s", len(inputs.images), planned.label, path)
        return path

    def interrupt(self) -> None:
        """Stop the running generation after its current step (it returns what it has)."""
        self._interrupt.set()

    @property
    def interrupt_requested(self) -> bool:
        return self._interrupt.is_set()

    def _prepare(self, request: GenerateRequest) -> tuple[Plan, list[_UnitInputs], Image.Image | None]:
        """Every image decoded (so checked) and the plan made: all a request can be refused for, before compute."""
        canonical_sampler(request.sampler)
        inputs = [self._unit_inputs(i, unit) for i, unit in enumerate(request.ip_adapters)]
        init_image = self._image(request.init_images[0], "init_images.0") if request.init_images else None
        return make_plan(request, self.store, self.default_model), inputs, init_image

    def _generate(self, request: GenerateRequest, on_step, given: dict[int, UnitEmbeddings]) -> Result:
        timer, events = _Timer(), []
        sampler = canonical_sampler(request.sampler)
        plan, inputs, init_image = self._prepare(request)
        timer.mark("plan")

        loaded = self._load_pipeline(plan.pipeline, events)
        built = [self._built_adapter(unit.adapter, loaded, unit.label, events) for unit in plan.units]
        timer.mark("load")

        true_cfg = request.true_cfg_scale > 1.0
        embeddings = [given[unit.index] if unit.index in given else self._embeddings(unit, unit_inputs, events, true_cfg)
                      for unit, unit_inputs in zip(plan.units, inputs)]  # fmt: skip
        timer.mark("encode")

        swapped = loaded.attached.attach(built, tuple(u.adapter.key(self.dtype, self.device) for u in plan.units))
        if swapped:
            names = " + ".join(u.label for u in plan.units) or "none"
            log.info("UNet adapters now: %s", names)
            events.append({"event": "adapters_attached", "adapters": [u.label for u in plan.units]})
        warnings = loaded.loras.activate(self._lora_uses(plan, loaded), events)
        vae = self._vae(plan.vae, loaded, events) if plan.vae is not None else loaded.own_vae
        timer.mark("attach")

        seed = request.seed if request.seed >= 0 else secrets.randbelow(2**32)
        width, height = self._size(request, plan, init_image)
        inversions_used = []
        if plan.pipeline.spec.architecture == "unet":
            inversions = [self._inversion(entry) for entry in plan.inversions]
            with torch.no_grad():
                prompts = encode_prompts(loaded.pipeline, plan.prompt, plan.negative_prompt, request.clip_skip,
                                         inversions, guidance=request.cfg_scale > 1.0)  # fmt: skip
            inversions_used = prompts.inversions_used
            timer.mark("prompt")
            masks = [ip_adapter_masks(unit_inputs.masks, width, height) for unit_inputs in inputs]
            images_out, active_steps, scheduler, tiled = self._denoise(
                loaded, plan, request, prompts.kwargs, vae, embeddings, masks, init_image, seed, width, height,
                sampler, on_step,
            )
        else:  # SD 3.5, FLUX: the pipeline encodes its prompts itself (T5 and CLIP, as the family needs)
            images_out, active_steps, scheduler, tiled = self._denoise_transformer(
                loaded, plan, request, embeddings, inputs, seed, width, height, on_step
            )
        timer.mark("denoise")

        units_info = [
            self._unit_info(u, e, steps) for u, e, steps in zip(plan.units, embeddings, active_steps)
        ]
        sampler_name, schedule_type = a1111_names(scheduler)
        seeds = [seed + i for i in range(len(images_out))]  # image i is what a request with seed + i gives
        strength = request.denoising_strength if init_image is not None else None
        loras_info = [{"name": lora.entry.name, "weight": lora.weight, "source": lora.source, "file": str(lora.entry.path),
                       "hash": self.store.a1111_hash(lora.entry.path, 12)} for lora in plan.loras]  # fmt: skip
        vae_info = {"name": plan.vae.path.name, "file": str(plan.vae.path), "hash": self.store.a1111_hash(plan.vae.path)} if plan.vae else None
        inversions_info = [{"name": i.name, "hash": i.hash} for i in inversions_used]
        # the prompt as A1111 would show it: LoRAs given as a field are written as tags, so that readers find them
        shown_prompt = request.prompt + "".join(f" <lora:{lo.entry.name}:{lo.weight:g}>" for lo in plan.loras
                                                if lo.source == "loras")  # fmt: skip
        infotexts = [
            parameters_text(shown_prompt, request.negative_prompt, image_fields(
                steps=request.steps, sampler=sampler_name, schedule_type=schedule_type, cfg_scale=request.cfg_scale,
                seed=image_seed, width=width, height=height, model_hash=loaded.model_hash, model=loaded.name,
                denoising_strength=strength, batch_size=request.batch_size, batch_pos=i, units=units_info,
                clip_skip=request.clip_skip, vae=vae_info, loras=loras_info, inversions=inversions_info,
            ))
            for i, image_seed in enumerate(seeds)
        ]  # fmt: skip
        info = {
            "model": loaded.name,
            "mode": "img2img" if init_image is not None else "txt2img",
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": seed,
            "all_seeds": seeds,
            "steps": request.steps,
            "cfg_scale": request.cfg_scale,
            "width": width,
            "height": height,
            "batch_size": request.batch_size,
            "sampler": sampler_name,
            "schedule_type": schedule_type,
            "model_hash": loaded.model_hash,
            "denoising_strength": strength,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "encoder_dtype": str(self.encoder_dtype).removeprefix("torch."),
            "ip_adapters": units_info,
            "loras": loras_info,
            "textual_inversions": inversions_info,
            "clip_skip": request.clip_skip,
            "vae": vae_info,
            "vae_tiling": tiled,  # decoded tile by tile: the whole image would not fit the activation budget
            "warnings": warnings,  # what the request asked for that acts only in part
            "events": events,
            "timings": timer.summary(),
            "interrupted": self._interrupt.is_set(),
            "version": __version__,
        }
        return Result(images_out, info, infotexts)

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

    def _lora_uses(self, plan: Plan, loaded: LoadedPipeline) -> list[LoraUse]:
        """The request's LoRAs, and the LoRA each FaceID adapter embeds (at 1.0, as diffusers' FaceID loading sets
        it), active exactly while its unit is in the request, beside the user's own."""
        uses = [lora_file(lora.entry, lora.weight) for lora in plan.loras]
        for unit in plan.units:
            spec = unit.adapter.spec
            key = unit.adapter.key("faceid-lora")
            if spec.lora_rank and key not in {use.key for use in uses}:
                unet = loaded.pipeline.unet
                uses.append(LoraUse(key, f"{unit.label} (its LoRA)", 1.0,
                                    lambda spec=spec: unet._load_ip_adapter_loras([load_adapter_state_dict(spec)])[0]))  # fmt: skip
        return uses

    def _embeddings(self, unit, inputs: _UnitInputs, events: list, true_cfg: bool = True) -> UnitEmbeddings:
        """A unit's embeddings; `true_cfg`: FLUX's negative branch is used (saved embeddings keep it, for later)."""
        if unit.output == "faceid_embeds" and unit.embeddings is None and unit.unit.face_embeddings is None:
            return self._face_embeddings(unit, inputs, events)
        if unit.unit.face_embeddings is not None:
            return given_face_embeddings(unit.unit.face_embeddings, unit.adapter.spec.embed_dim, unit.unit.average,
                                         self.allow_paths, f"ip_adapters.{unit.index}.face_embeddings", self.device,
                                         self.encoder_dtype)  # fmt: skip
        if unit.embeddings is not None:
            return load_saved_embeddings(unit.embeddings, self.device, self.encoder_dtype, unit.unit.average)
        return self.embedder.embed(
            unit.encoder, unit.output, inputs.images, unit.label, unit.why, events, inputs.negatives, unit.unit.average,
            unconditional(unit.adapter.spec, true_cfg),
        )

    def _face_embeddings(self, unit, inputs: _UnitInputs, events: list) -> UnitEmbeddings:
        """FaceID from images: InsightFace's face embedding of each image (normed, or raw for Portrait unnorm) and,
        for the Plus family, CLIP hidden states of each aligned face crop from the encoder the plan picked."""
        spec, where = unit.adapter.spec, f"ip_adapters.{unit.index}"
        found = [self.faces.face(image, f"{where}.images.{j}", events) for j, image in enumerate(inputs.images)]
        raw = spec.face_embedding == "raw"
        vectors = torch.from_numpy(np.stack([face.embedding if raw else face.normed_embedding for face, _ in found]))
        result = face_embeddings(vectors, spec.embed_dim, unit.unit.average, f"{where}.images", self.device,
                                 self.encoder_dtype, [origin for _, origin in found])  # fmt: skip
        if spec.clip_width:
            crops = [face.crop_image() for face, _ in found]
            result.clip = self.embedder.embed(unit.encoder, "hidden_states", crops, unit.label, unit.why, events,
                                              None, unit.unit.average)  # fmt: skip
            result.encoder_source = result.clip.encoder_source
        result.faces = [face for face, _ in found]
        return result

    @staticmethod
    def _size(request, plan: Plan, init_image) -> tuple[int, int]:
        """Requested size; else the init image's size (to a multiple of 8); else the model's native size."""
        if init_image is not None:
            default_w, default_h = (max(64, d - d % 8) for d in init_image.size)
        else:
            default_w = default_h = plan.pipeline.spec.default_size
        return request.width or default_w, request.height or default_h

    def _denoise(self, loaded, plan: Plan, request, prompt_embeds: dict, vae, embeddings, masks, init_image, seed,
                 width, height, sampler, on_step):  # fmt: skip
        """A batch is made one image at a time, each with a fresh scheduler and its own generator (seed + i), so
        image i is exactly the image a request with seed + i gives alone (batched on one tensor, it would differ in
        the last bit: the batched arithmetic rounds otherwise)."""
        pipeline = loaded.pipeline if init_image is None else loaded.img2img()
        units = [u.unit for u in plan.units]
        schedule = UnitSchedule(loaded.attached, plan, request.batch_size, on_step, self._interrupt)

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
        loaded.attached.set_face_crops([
            (e.clip.for_pipeline(cfg).to(device=self.device, dtype=pipeline.unet.dtype) if e.clip else None,
             u.faceid_version == "v2", u.unit.structure)
            for u, e in zip(plan.units, embeddings)
        ])  # fmt: skip
        try:
            pipeline.vae = vae  # the request's VAE, or the model's own; its own again after the request
            vae.use_tiling = needs_tiling(vae, width, height, self.activation_budget)  # set by every request
            images = []
            for index in range(request.batch_size):
                if index and self._interrupt.is_set():
                    break
                schedule.index = index
                pipeline.scheduler = make_scheduler(sampler, loaded.scheduler_config, loaded.scheduler_class)
                schedule.set_scales(0, request.steps)  # step 0 acts iff start == 0 < end, whatever the number of steps
                output = pipeline(
                    **prompt_embeds,
                    num_inference_steps=request.steps,
                    guidance_scale=request.cfg_scale,
                    generator=torch.Generator(device="cpu").manual_seed(seed + index),
                    callback_on_step_end=schedule.step_end,
                    output_type="pil",
                    **kwargs,
                )
                images += output.images
        finally:
            loaded.attached.set_face_crops([])  # the face crops' hidden states belong to this request only
            loaded.restore_components()
        return images, schedule.active_steps, pipeline.scheduler, vae.use_tiling

    def _denoise_transformer(self, loaded, plan: Plan, request, embeddings, inputs, seed, width, height, on_step):
        """SD 3.5 and FLUX through their diffusers pipelines, with finished embeddings. SD3 takes one tensor
        (cat([negative, positive]) under CFG, as its pipeline splits it); FLUX a list per adapter, and its negative
        images' embeddings separately (used under true CFG only). One image per call, seed + i, as `_denoise`."""
        pipeline = loaded.pipeline
        units = [u.unit for u in plan.units]
        schedule = UnitSchedule(loaded.attached, plan, request.batch_size, on_step, self._interrupt)
        dtype = pipeline.transformer.dtype

        kwargs = {"prompt": plan.prompt, "negative_prompt": plan.negative_prompt or None, "width": width,
                  "height": height, "guidance_scale": request.cfg_scale}  # fmt: skip
        flux = plan.pipeline.spec.architecture == "flux"
        if flux:
            kwargs["true_cfg_scale"] = request.true_cfg_scale
            if units:
                kwargs["ip_adapter_image_embeds"] = [e.positive.unsqueeze(0).to(self.device, dtype) for e in embeddings]
                kwargs["negative_ip_adapter_image_embeds"] = [e.negative.unsqueeze(0).to(self.device, dtype)
                                                              for e in embeddings]  # fmt: skip
        else:
            kwargs["negative_prompt"] = plan.negative_prompt  # SD3 encodes "" for an empty one, as diffusers does
            if units:
                (e,) = embeddings
                if e.positive.shape[0] != 1:  # the plan refuses more; embeddings made elsewhere (a cluster) too
                    raise IncompatibleError(f"ip_adapters.0: embeddings of {e.positive.shape[0]} images, but an SD 3.5 "
                                            f"IP-Adapter reads one; average them")  # fmt: skip
                kwargs["ip_adapter_image_embeds"] = e.for_pipeline(request.cfg_scale > 1.0)[:, 0].to(self.device, dtype)
        pipeline.vae.use_tiling = needs_tiling(pipeline.vae, width, height, self.activation_budget)
        images = []
        for index in range(request.batch_size):
            if index and self._interrupt.is_set():
                break
            schedule.index = index
            pipeline.scheduler = make_scheduler("Default", loaded.scheduler_config, loaded.scheduler_class)
            schedule.set_scales(0, request.steps)
            output = pipeline(
                num_inference_steps=request.steps,
                generator=torch.Generator(device="cpu").manual_seed(seed + index),
                callback_on_step_end=schedule.step_end,
                output_type="pil",
                **kwargs,
            )
            images += output.images
        return images, schedule.active_steps, pipeline.scheduler, pipeline.vae.use_tiling

    def _unit_info(self, unit, embeddings, active_steps: list[int]) -> dict:
        a = unit.adapter.spec
        if unit.encoder is not None:
            encoder, encoder_file, architecture = unit.encoder.name, str(unit.encoder.path), unit.encoder.spec.architecture
        elif unit.embeddings is None and unit.unit.face_embeddings is not None:
            encoder, encoder_file, architecture = "face embeddings given", None, None
        elif unit.embeddings is None:  # FaceID Base / Portrait from images: InsightFace alone
            encoder, encoder_file, architecture = f"InsightFace {self.faces.pack.name}", str(self.faces.pack), None
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
            **(self._faceid_info(unit, embeddings) if a.consumes == "faceid_embeds" else {}),
        }

    def _faceid_info(self, unit, embeddings: UnitEmbeddings) -> dict:
        """How a FaceID unit was served: which version and how that was decided, and the face found in each image
        (with the aligned crop the Plus family's encoder read, shown by the web page)."""
        a = unit.adapter.spec
        decided = "the request's faceid_version" if unit.unit.faceid_version else a.faceid_from
        faces = [{"score": round(face.score, 4), "box": list(face.box), "faces_found": face.faces_found,
                  "crop": image_to_base64(face.crop_preview().resize((112, 112)))} for face in embeddings.faces]  # fmt: skip
        info = {"faceid_version": unit.faceid_version, "faceid_version_from": decided, "faces": faces,
                "face_source": ("face_embeddings" if unit.unit.face_embeddings is not None else
                                "saved embeddings" if unit.embeddings is not None else "InsightFace")}  # fmt: skip
        if a.variant == "faceid-plus":
            info["structure"] = unit.unit.structure if unit.faceid_version == "v2" else None
        if a.lora_rank:
            info["lora"] = {"rank": a.lora_rank, "weight": 1.0}
        return info

    # --------------------------------------------------------------------------------------- loading, cached

    def _load_pipeline(self, entry: Entry, events: list) -> LoadedPipeline:
        """The request's pipeline: resident already (no reload), or loaded. A load happens in CPU memory first and
        joins the device only once it succeeded, so a failed load leaves every resident pipeline as it was."""
        key = entry.key(self.dtype, self.device)
        current = self.pipelines.current.key if self.pipelines.current else None  # the key: a reference would
        loaded = self.pipelines.get(key, events)  # keep a pushed-out pipeline on the device while another moves in
        if loaded is None:
            for stale in self.pipelines.discard_older_versions(key):
                log.info("model %s unloaded: its file changed on disk", stale.label)
                events.append({"event": "model_unloaded", "model": stale.label, "why": "its file changed on disk"})
            loaded = self._loaded_pipeline(entry, key, events)
            self.pipelines.add(loaded, events)
            log.info("model %s loaded in %.2f s", entry.name, loaded.load_seconds)
            events.append({"event": "model_loaded", "model": entry.name, "seconds": round(loaded.load_seconds, 4)})
        elif loaded.key != current:
            log.info("model %s was resident: no reload", entry.name)
            events.append({"event": "model_reused", "model": entry.name})
        if loaded.key != current:
            # a VAE or text encoder shared with another pipeline may carry that pipeline's LoRA state: set it anew
            loaded.loras.enabled = None
            self.pipelines.current = loaded
        return loaded

    def _loaded_pipeline(self, entry: Entry, key: tuple, events: list) -> LoadedPipeline:
        started = time.perf_counter()
        identities = component_identities(entry.spec, self.dtype)
        shared = self.pipelines.shared_components(identities)
        for name in shared:
            log.info("model %s: %s shared with a resident model (same files on disk)", entry.name, name)
            events.append({"event": "component_shared", "model": entry.name, "component": name})
        pipeline = load_pipeline(entry.spec, torch.device("cpu"), self.dtype, shared)
        if entry.spec.architecture != "unet":  # SD 3.5, FLUX: adapters attach to the transformer's blocks
            attached = AttachedTransformerAdapters(pipeline.transformer, entry.spec.architecture)
        else:
            attached = AttachedAdapters(pipeline.unet)  # before any LoRA wraps the UNet's layers
        if entry.spec.architecture == "unet" and tuple(attached.names) != tuple(entry.spec.layer_names):
            raise CheckpointError(
                entry.path,
                f"the loaded UNet's cross-attention layers {attached.names[:2]}... differ from its weights file's "
                f"{entry.spec.layer_names[:2]}...; the pipeline folder is inconsistent",
            )
        return LoadedPipeline(
            key=key,
            name=entry.name,
            pipeline=pipeline,
            attached=attached,
            loras=PipelineLoras(pipeline, self.loras, prefix=f"p{next(self._pipeline_loads)}_"),
            own_components=dict(pipeline.components),
            scheduler_config=dict(pipeline.scheduler.config),
            scheduler_class=type(pipeline.scheduler).__name__,
            load_seconds=time.perf_counter() - started,
            model_hash=self.store.a1111_hash(entry.path) if entry.path.is_file() else None,
            components=identities,
        )

    def _built_adapter(self, entry: Entry, loaded: LoadedPipeline, label: str, events: list) -> BuiltAdapter:
        key = entry.key(self.dtype, self.device)
        built = self.adapters.get(key)
        if built is not None:
            return built
        stale = self.adapters.discard_older_versions(key)
        started = time.perf_counter()
        state = load_adapter_state_dict(entry.spec)
        try:
            if entry.spec.architecture == "unet":
                built = build_adapter(entry.spec, state, loaded.pipeline.unet)
            else:
                built = build_transformer_adapter(entry.spec, state, loaded.pipeline.transformer)
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:  # tensors the probe read but cannot build
            raise CheckpointError(entry.path, f"cannot build this IP-Adapter ({first_line(exc)})",
                                  "Check that the file is complete and of a published layout") from None  # fmt: skip
        seconds = time.perf_counter() - started
        evicted = self.adapters.put(key, built, built.nbytes, label=entry.name)
        for old, why in [(e, "its file changed on disk") for e in stale] + [(e, "adapter cache budget") for e in evicted]:
            log.info("adapter %s evicted from cache: %s", old.label, why)
            events.append({"event": "adapter_evicted", "adapter": old.label, "why": why})
        if stale or evicted:  # shells on any resident UNet must not keep evicted adapters alive
            for resident in self.pipelines.all():
                resident.attached.forget([e.key for e in stale + evicted])
            release_memory(self.device)
        log.info("adapter %s (%s) loaded in %.2f s", label, entry.path.name, seconds)
        events.append({"event": "adapter_loaded", "adapter": label, "file": str(entry.path), "seconds": round(seconds, 4)})
        return built

    def _vae(self, entry: Entry, loaded: LoadedPipeline, events: list):
        key = entry.key(self.dtype, self.device, loaded.name)  # built to the model's VAE configuration
        vae = self.vaes.get(key)
        if vae is None:
            started = time.perf_counter()
            vae = load_vae(entry.spec, loaded.own_vae, self.device, self.dtype)
            for old in self.vaes.put(key, vae, module_bytes(vae), label=entry.path.name):
                log.info("VAE %s evicted from cache: VAE cache budget", old.label)
            seconds = time.perf_counter() - started
            log.info("VAE %s loaded in %.2f s", entry.path.name, seconds)
            events.append({"event": "vae_loaded", "vae": entry.path.name, "seconds": round(seconds, 4)})
        return vae

    def _inversion(self, entry: Entry):
        key = entry.key(self.dtype, self.device)
        inversion = self.inversions.get(key)
        if inversion is None:
            inversion = load_inversion(entry, self.device, self.dtype, self.store.a1111_hash(entry.path, 12))
            self.inversions.put(key, inversion, sum(v.numel() * v.element_size() for v in inversion.vectors), entry.name)
        return inversion

    # ------------------------------------------------------------------------------------------ introspection

    def cache_info(self) -> dict:
        """What is loaded now; answers at once, even while a generation (or a model switch) runs."""
        loaded = self.pipelines.current  # read once: another thread may replace it meanwhile
        return {
            "encoders": self.embedder.encoders.stats(),
            "embeddings": self.embedder.embeddings.stats(),
            "adapters": self.adapters.stats(),
            "loras": self.loras.cache.stats(),
            "vaes": self.vaes.stats(),
            "faces": self.faces.faces.stats(),
            "model": loaded.name if loaded is not None else None,
            "pipelines": self.pipelines.stats(),
        }

    def clear_cache(self) -> dict:
        """Drop loaded encoders, embeddings and built adapters (the loaded model stays)."""
        with self._lock:
            for resident in self.pipelines.all():
                resident.attached.attach([], ())
                resident.attached.forget_shells()
            cleared = self.embedder.clear()
            cleared["adapters"] = self.adapters.clear()
            cleared["loras"] = sum(resident.loras.clear() for resident in self.pipelines.all())
            cleared["vaes"] = self.vaes.clear()
            cleared["faces"] = self.faces.clear()
            return cleared
