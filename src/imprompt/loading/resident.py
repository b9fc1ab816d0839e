"""Resident pipelines: several base models kept loaded within a byte budget, so switching models costs no reload.

SD.Next, the A1111 webui and diffusers scripts hold one pipeline and read the next from disk on every checkpoint
change. imprompt keeps each pipeline it loaded, least recently used out first, within a budget of device memory;
on a GPU, a pipeline pushed out can wait in CPU memory (its own budget) and move back instead of being read from
disk again. Keys carry the file's fingerprint, dtype and device, so a changed file is never served from an old
copy. A new pipeline is built in CPU memory first and moved to the device only when it loaded, so a failed load
leaves every resident pipeline as it was. Components that two pipeline folders share on disk (the same VAE or text
encoder files, e.g. by symlink) are loaded once and handed to diffusers' `from_pretrained` for the second.
A pipeline under a memory plan (`memory_plan.py`) is placed as its plan says, never moved whole where diffusers'
offload hooks move its parts, and counts in the budget only what it holds on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..util.cache import ByteLRU, module_bytes
from ..util.devices import release_memory
from .loras import PipelineLoras
from .memory_plan import NO_PLAN, MemoryPlan, is_encoder, leave_device, place

log = logging.getLogger("imprompt")


@dataclass
class LoadedPipeline:
    """One resident pipeline and what imprompt keeps beside it."""

    key: tuple
    name: str
    pipeline: object
    attached: object  # ipadapter.attach.AttachedAdapters: the IP-Adapters its UNet carries now
    loras: PipelineLoras  # the LoRAs loaded into it, and which act now
    own_components: dict  # name -> module as loaded: a request may swap one (its VAE) for the length of the request
    scheduler_config: dict
    scheduler_class: str
    load_seconds: float
    model_hash: str | None  # A1111's short hash of a single-file checkpoint (folders have none)
    components: dict = field(default_factory=dict)  # name -> identity of its files on disk (shared components)
    dtype: object = None  # torch.dtype it was loaded in (per family: `util/devices.model_dtype`)
    memory: MemoryPlan = NO_PLAN  # where its weights live (`memory_plan.py`)
    _img2img: object = None

    @property
    def own_vae(self):
        """The VAE it came with (a request may use another from the tree, for that request only)."""
        return self.own_components["vae"]

    def __post_init__(self):
        # its weights on the device as loaded (the LoRA layers later added inside its modules count in the one LoRA
        # budget): all, or without the text encoders kept on the CPU; under diffusers' offload hooks, what its plan
        # holds there at its peak (one component, or a few blocks)
        modules = {n: m for n, m in self.own_components.items() if isinstance(m, torch.nn.Module)}
        if self.memory.mode in ("model", "group"):
            self.nbytes = self.memory.on_device_bytes
        else:
            kept = self.memory.mode == "encoders"
            self.nbytes = sum(module_bytes(m) for n, m in modules.items() if not (kept and is_encoder(n)))
        self.hooked = False  # diffusers' offload hooks installed (`memory_plan.place`)

    def place(self, device: torch.device) -> None:
        """Its components where its memory plan says (on the device, the text encoders on the CPU, or under
        diffusers' offload hooks, installed once)."""
        self.hooked = place(self.pipeline, self.memory, device, self.hooked)

    def restore_components(self) -> None:
        """Its own components back on it and on its image-to-image twin, after a request that swapped one in: a
        pipeline that is not current must not keep a request's module alive (nor hand it out as shared)."""
        for pipeline in filter(None, (self.pipeline, self._img2img)):
            for name, module in self.own_components.items():  # modules only: the scheduler is set per request
                if isinstance(module, torch.nn.Module) and getattr(pipeline, name, None) is not module:
                    setattr(pipeline, name, module)

    def img2img(self):
        """The image-to-image pipeline over the same components (same UNet, so the same attached adapters)."""
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipeline)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img


class ResidentPipelines:
    """The pipelines on the device (byte-bounded LRU) and, on a GPU, those waiting in CPU memory."""

    def __init__(self, device: torch.device, budget_bytes: int, offload_budget_bytes: int):
        self.device = device
        self.on_device = ByteLRU("pipelines", budget_bytes)
        # on the CPU there is nowhere cheaper to wait: the engine gives no offload budget there by default (one
        # given anyway makes a second tier in the same memory, which is how the tests run this path without a GPU)
        self.offloaded = ByteLRU("offloaded pipelines", offload_budget_bytes)
        self.current: LoadedPipeline | None = None

    def get(self, key: tuple, events: list) -> LoadedPipeline | None:
        """The resident pipeline for `key`: on the device, or moved back from CPU memory; None if not resident."""
        loaded = self.on_device.get(key)
        if loaded is not None and self.device.type == "cuda" and loaded is not self.current:
            loaded.place(self.device)  # a component it shares with a model moved to CPU memory went along
        if loaded is not None or key not in self.offloaded:
            return loaded
        loaded = self.offloaded.get(key)
        self.offloaded.discard(key)
        log.info("model %s moving back to %s from CPU memory", loaded.name, self.device)
        events.append({"event": "model_restored", "model": loaded.name, "from": "CPU memory"})
        self.add(loaded, events)
        return loaded

    def add(self, loaded: LoadedPipeline, events: list) -> None:
        """Make `loaded` resident on the device, pushing the least recently used ones out to fit the budget: to
        CPU memory on a GPU while that budget allows, else freed. What is pushed out leaves the device before
        `loaded` moves in: a GPU with room for one model never holds two, not even for a moment."""
        if self._make_room(loaded, events):
            release_memory(self.device)  # no reference to what was unloaded is left: collect it now
        try:
            loaded.place(self.device)
        except BaseException:  # e.g. out of device memory halfway: a pipeline half on the device is never served
            self.on_device.discard(loaded.key)
            self._let_go(loaded)
            release_memory(self.device)
            raise

    def _let_go(self, pipeline: LoadedPipeline) -> None:
        """A pipeline leaving for good: its LoRA layers out of any text encoder or VAE it shares with others,
        and no longer the current one."""
        pipeline.loras.release()
        if self.current is pipeline:
            self.current = None

    def _make_room(self, loaded: LoadedPipeline, events: list) -> bool:
        """Evict for `loaded`; returns whether any pipeline was unloaded (one moved to CPU memory frees its device
        memory as it moves, with no collection). Its locals (the evicted pipelines) die with it."""
        evicted, unloaded = self.on_device.put(loaded.key, loaded, loaded.nbytes, label=loaded.name, with_values=True), 0
        for old in evicted:
            if self.current is old.value:
                self.current = None
            why = f"the pipeline budget ({_mib(self.on_device.budget_bytes)}) needed room for {loaded.name}"
            if 0 < old.nbytes <= self.offloaded.budget_bytes:
                # what it holds but does not own stays on the device: the IP-Adapters (cached for every model)
                # and a request's VAE (cached); a component shared with another model comes back with `get`
                old.value.attached.attach([], ())
                old.value.restore_components()
                old.value.loras.clear()  # the LoRA budget is the device's: they load again if it comes back
                leave_device(old.value.pipeline, old.value.memory)
                for gone in self.offloaded.put(old.key, old.value, old.nbytes, label=old.label, with_values=True):
                    self._let_go(gone.value)
                    unloaded += 1
                    log.info("model %s unloaded from CPU memory (its budget)", gone.label)
                    events.append({"event": "model_unloaded", "model": gone.label, "why": "CPU memory budget"})
                log.info("model %s moved to CPU memory: %s", old.label, why)
                events.append({"event": "model_offloaded", "model": old.label, "why": why})
            else:
                unloaded += 1
                self._let_go(old.value)
                log.info("model %s unloaded: %s", old.label, why)
                events.append({"event": "model_unloaded", "model": old.label, "why": why})
        return unloaded > 0

    def all(self) -> list[LoadedPipeline]:
        """Every resident pipeline, on the device and in CPU memory."""
        return [*self.on_device.values(), *self.offloaded.values()]

    def shared_components(self, identities: dict[str, str]) -> dict:
        """For a pipeline about to load: its components (name -> identity of their files) that a resident pipeline
        already holds, as modules to hand to `from_pretrained`."""
        held = {known: loaded.own_components[name]  # never what a request swapped in
                for loaded in self.all() for name, known in loaded.components.items()}  # fmt: skip
        return {name: held[identity] for name, identity in identities.items() if identity in held}

    def discard_older_versions(self, key: tuple) -> list:
        """Pipelines loaded from an earlier version of this file: never served again, so freed (their LoRA
        layers taken out of any text encoder or VAE they share with others)."""
        found = [p for p in self.all() if p.key[0] == key[0] and p.key[1] != key[1]]
        for stale in found:
            self._let_go(stale)
        dropped = self.on_device.discard_older_versions(key) + self.offloaded.discard_older_versions(key)
        if found:
            del found, stale
            release_memory(self.device)
        return dropped

    def unload(self, key: tuple) -> bool:
        """Free one pipeline, wherever it waits (on the device or in CPU memory)."""
        found = [p for p in self.all() if p.key == key]
        for pipeline in found:
            self._let_go(pipeline)
            log.info("model %s unloaded", pipeline.name)
        self.on_device.discard(key)
        self.offloaded.discard(key)
        if found:
            del pipeline
            found.clear()
            release_memory(self.device)
        return bool(found)

    def clear(self) -> None:
        self.on_device.clear()
        self.offloaded.clear()
        self.current = None

    def stats(self) -> dict:
        """The pipelines on the device, as every cache reports itself, with those waiting in CPU memory."""
        return {**self.on_device.stats(), "offloaded": self.offloaded.stats()}


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"
