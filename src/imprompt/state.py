"""What an engine keeps between requests: its store, caches, budgets, resident pipelines, limits and locks.

The model store, the caches with their byte budgets, the resident pipelines, the limits, and the lock and interrupt
flag of its one running generation.

The per-request flow (`engine.py`) reads and fills these; nothing here knows a request. A cluster worker and the
coming request batching run the same flow over the same state, without the server around it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass

import torch

from .errors import RequestError
from .ipadapter.attach import attachment
from .ipadapter.embeddings import ImageEmbedder
from .ipadapter.faces import FaceAnalyzer, insightface_roots
from .ipadapter.slots import compiled_attachment
from .loading.compiled import CompiledDenoiser, LoraBaker, denoiser_of, not_compiled_because
from .loading.loras import LoraBudget, PipelineLoras
from .loading.memory_plan import TRANSFORMERS, MemoryPlan, check_mode, choose_plan, estimate_sizes
from .loading.pipelines import component_identities, load_pipeline
from .loading.resident import LoadedPipeline, ResidentPipelines
from .models.parts import NO_PARTS, ModelParts
from .models.store import Entry, ModelStore
from .preprocess.loaded import MODELS as ANNOTATOR_MODELS
from .request import MAX_IMAGES, MAX_UNITS
from .util.cache import ByteLRU, parse_bytes
from .util.devices import (
    activation_budget,
    default_budget,
    default_device,
    device_memory,
    model_dtype,
    resolve_dtype,
)
from .util.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, load_image

log = logging.getLogger("imprompt")


@dataclass(frozen=True)
class Limits:
    """What one request may bring: units, images per unit (checked before any image is decoded), and each image's
    pixels and bytes; and whether names may be paths outside the models folders."""

    max_units: int = 8
    max_images: int = 16
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_BYTES
    allow_paths: bool = True

    def __post_init__(self):
        for name, value, ceiling in (("max_units", self.max_units, MAX_UNITS), ("max_images", self.max_images, MAX_IMAGES)):
            if not 1 <= value <= ceiling:  # the payloads are bounded by the ceilings while they are parsed
                raise RequestError(f"{name}: {value} is outside 1..{ceiling}, the ceiling every request is parsed "
                                   f"under; choose a limit in that range")  # fmt: skip


class EngineState:
    """The store, caches, budgets, resident pipelines and locks of one engine (see `Engine` for the arguments)."""

    def __init__(self, models, device=None, dtype=None, encoder_dtype=None, budgets: dict | None = None,
                 limits: Limits = Limits(), default_model: str | None = None, insightface_root=None,
                 offload: str | None = "auto", compile_backend: str | None = None):  # fmt: skip
        budgets = budgets or {}
        self.store = ModelStore(models, allow_paths=limits.allow_paths)
        self.device = torch.device(device) if device else default_device()
        self.dtype = resolve_dtype(dtype, self.device)
        self.dtype_setting = dtype  # "auto" / None: each model's family decides (`model_dtype`)
        self.offload = check_mode(offload)  # the memory plan the user forces, or "auto"
        self.encoder_dtype = resolve_dtype(encoder_dtype, self.device) if encoder_dtype else self.dtype
        self.limits, self.default_model = limits, default_model
        self.compile_backend = compile_backend  # torch.compile's backend for each model's denoiser; None: eager

        def budget(name: str, default: int) -> int:
            return parse_bytes(budgets.get(name), default)

        self.embedder = ImageEmbedder(self.device, self.encoder_dtype,
                                      budget("encoders", default_budget("encoders", self.device)),
                                      budget("embeddings", default_budget("embeddings", self.device)))  # fmt: skip
        self.faces = FaceAnalyzer(insightface_roots(self.store.roots, insightface_root))
        self.adapters = ByteLRU("adapters", budget("adapters", default_budget("adapters", self.device)))
        self.loras = LoraBudget(budget("loras", default_budget("loras", self.device)))
        self.vaes = ByteLRU("vaes", default_budget("vaes", self.device))
        self.inversions = ByteLRU("textual-inversions", default_budget("inversions", self.device))
        self.controlnets = ByteLRU("controlnets", budget("controlnets", default_budget("controlnets", self.device)))
        # ControlNet preprocessors' outputs by picture and parameters (`preprocess.detect`), sized as the embeddings
        self.detections = ByteLRU("detections", default_budget("embeddings", self.device))
        offload = default_budget("offload", self.device) if self.device.type == "cuda" else 0
        self.pipelines = ResidentPipelines(self.device, budget("pipelines", default_budget("pipelines", self.device)),
                                           budget("offload", offload))  # fmt: skip
        self.activation_budget = budget("activations", activation_budget(self.device))
        self.lock = threading.Lock()  # one generation at a time
        self.interrupt = threading.Event()
        self._pipeline_loads = itertools.count()  # numbers each loaded pipeline's LoRA adapter names
        self._plans: dict[tuple, MemoryPlan] = {}  # (file versions, dtype, forced plan) -> its plan (`memory_plan`)

    def image(self, ref, what: str):
        """A request's image (PIL, path or base64), decoded within the limits; `what` names it in errors."""
        limits = self.limits
        return load_image(ref, what, limits.max_image_pixels, limits.allow_paths, limits.max_image_bytes)

    # ------------------------------------------------------------------------------------------ the pipelines

    def pipeline(self, entry: Entry, events: list, parts: ModelParts = NO_PARTS) -> LoadedPipeline:
        """The request's pipeline: resident already (no reload), or loaded. A load happens in CPU memory first and
        joins the device only once it succeeded, so a failed load leaves every resident pipeline as it was.
        `parts`: the VAE and text encoders a transformer-alone model runs with (other parts: another pipeline)."""
        memory = self.memory_plan(entry, parts, self.model_dtype(entry.spec))
        key = self.pipeline_key(entry, parts)
        current = self.pipelines.current.key if self.pipelines.current else None  # the key: a reference would
        loaded = self.pipelines.get(key, events)  # keep a pushed-out pipeline on the device while another moves in
        if loaded is None:
            for stale in self.pipelines.discard_older_versions(key):
                log.info("model %s unloaded: its file changed on disk", stale.label)
                events.append({"event": "model_unloaded", "model": stale.label, "why": "its file changed on disk"})
            loaded = self._load(entry, key, events, parts, memory)
            self.pipelines.add(loaded, events)
            log.info("model %s loaded in %.2f s", entry.name, loaded.load_seconds)
            events.append({"event": "model_loaded", "model": entry.name, "seconds": round(loaded.load_seconds, 4),
                           **loaded.memory_event()})  # fmt: skip
        elif loaded.key != current:
            log.info("model %s was resident: no reload", entry.name)
            events.append({"event": "model_reused", "model": entry.name})
        if loaded.key != current:
            # a VAE or text encoder shared with another pipeline may carry that pipeline's LoRA state: set it anew
            loaded.loras.enabled = None
            self.pipelines.current = loaded
        return loaded

    def pipeline_key(self, entry: Entry, parts: ModelParts = NO_PARTS) -> tuple:
        """What identifies a loaded pipeline: its file's version, how it was loaded (dtype, device, memory plan: a
        pipeline under another plan is another pipeline), and a transformer alone's parts."""
        dtype = self.model_dtype(entry.spec)
        return entry.key(dtype, self.device, self.memory_plan(entry, parts, dtype).mode) + parts.key()

    def model_dtype(self, spec) -> torch.dtype:
        """The dtype a base model runs in: the engine's, or for "auto" on CUDA its family's (`util/devices.py`)."""
        return model_dtype(self.dtype_setting, self.device, spec.architecture)

    def memory_plan(self, entry: Entry, parts: ModelParts, dtype: torch.dtype) -> MemoryPlan:
        """Where the model's weights will live, chosen before it loads from its files' sizes and what a pipeline may
        use: the device's total memory less the engine's activation budget. Never from the memory free at the
        moment: that depends on what else happens to be resident or cached (other pipelines, encoders,
        ControlNets), and "encoders" encodes on the CPU, whose numbers differ from the GPU's in bf16; so the same
        request gets the same plan, and the same pixels, in a fresh process and after any history (invariant 3).
        Resident pipelines are pushed out for it by the pipelines budget; one pipeline may hold more than that
        budget alone. Computed once per file versions, dtype and forced plan (the files' tables are read once)."""
        key = (entry.key(dtype, self.device), parts.key(), self.offload)
        if key not in self._plans:
            sizes = estimate_sizes(entry.spec, parts, dtype)
            if len(self._plans) >= 256:  # file versions come and go; the plan is cheap to make again
                self._plans.clear()
            self._plans[key] = choose_plan(device_memory(self.device), sizes.total, self.offload,
                                           activation_bytes=self.activation_budget,
                                           group_bytes=sizes.group(streams=self.device.type == "cuda"),
                                           device_type=self.device.type,
                                           encoders_apart=entry.spec.architecture in TRANSFORMERS)  # fmt: skip
        return self._plans[key]

    def _load(self, entry: Entry, key: tuple, events: list, parts: ModelParts, memory: MemoryPlan) -> LoadedPipeline:
        started = time.perf_counter()
        dtype = self.model_dtype(entry.spec)
        log.info("model %s: memory plan %s (%s)", entry.name, memory.mode, memory.why)
        events.append({"event": "memory_plan", "model": entry.name, **memory.describe()})
        # modules under diffusers' offload hooks are never shared: another model would carry the hooks along
        hooked = memory.mode in ("model", "group")
        identities = {} if hooked else component_identities(entry.spec, dtype)
        shared = self.pipelines.shared_components(identities)
        for name in shared:
            log.info("model %s: %s shared with a resident model (same files on disk)", entry.name, name)
            events.append({"event": "component_shared", "model": entry.name, "component": name})
        pipeline = load_pipeline(entry.spec, torch.device("cpu"), dtype, shared, parts)
        loras = PipelineLoras(pipeline, self.loras, prefix=f"p{next(self._pipeline_loads)}_")
        compiled = None
        why_not = not_compiled_because(denoiser_of(pipeline), hooked) if self.compile_backend is not None else None
        if why_not is not None:
            log.info("model %s: not compiled: %s", entry.name, why_not)
            events.append({"event": "not_compiled", "model": entry.name, "why": why_not})
        elif self.compile_backend is not None:
            compiled = CompiledDenoiser(denoiser_of(pipeline), self.compile_backend)
            loras.baker = LoraBaker(denoiser_of(pipeline))
            log.info("model %s: denoiser compiled with %s (each new shape compiles on its first call)", entry.name,
                     self.compile_backend)  # fmt: skip
            events.append({"event": "compiled", "model": entry.name, "backend": self.compile_backend})
        stable = compiled is not None and entry.spec.architecture == "unet"
        return LoadedPipeline(
            key=key,
            name=entry.name,
            pipeline=pipeline,
            # before any LoRA wraps the model's layers; a compiled UNet's reads tensors only (`ipadapter/slots.py`)
            attached=compiled_attachment(pipeline, entry.spec) if stable else attachment(pipeline, entry.spec),
            loras=loras,
            compiled=compiled,
            own_components=dict(pipeline.components),
            scheduler_config=dict(pipeline.scheduler.config),
            scheduler_class=type(pipeline.scheduler).__name__,
            load_seconds=time.perf_counter() - started,
            model_hash=self.store.a1111_hash(entry.path) if entry.path.is_file() else None,
            components=identities,
            dtype=dtype,
            memory=memory,
        )

    def unload(self, kind: str, key: tuple) -> bool:
        """Drop one loaded pipeline ("pipeline") or image encoder ("encoder") by its cache key."""
        if kind == "pipeline":
            return self.pipelines.unload(key)
        return self.embedder.unload(key)

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
            "controlnets": self.controlnets.stats(),
            "detections": self.detections.stats(),
            "annotator_models": ANNOTATOR_MODELS.stats(),
            "faces": self.faces.faces.stats(),
            "model": loaded.name if loaded is not None else None,
            "pipelines": self.pipelines.stats(),
            # each compiled model's denoiser: its graphs so far and the calls that ran eager (`loading/compiled.py`)
            "compiled": {p.name: p.compiled.stats() for p in self.pipelines.all() if p.compiled is not None},
        }

    def clear_cache(self) -> dict:
        """Drop loaded encoders, embeddings, built adapters, LoRAs, VAEs, ControlNets, control images and faces (the
        loaded models stay)."""
        for resident in self.pipelines.all():
            resident.attached.attach([], ())
            resident.attached.forget_shells()
        cleared = self.embedder.clear()
        cleared["adapters"] = self.adapters.clear()
        cleared["loras"] = sum(resident.loras.clear() for resident in self.pipelines.all())
        cleared["vaes"] = self.vaes.clear()
        cleared["controlnets"] = self.controlnets.clear()
        cleared["detections"] = self.detections.clear()
        cleared["annotator_models"] = ANNOTATOR_MODELS.clear()
        cleared["faces"] = self.faces.clear()
        return cleared

