"""Resident pipelines: several base models kept loaded within a byte budget, so switching models costs no reload.

SD.Next, the A1111 webui and diffusers scripts hold one pipeline and read the next from disk on every checkpoint
change. imprompt keeps each pipeline it loaded, least recently used out first, within a budget of device memory;
on a GPU, a pipeline pushed out can wait in CPU memory (its own budget) and move back instead of being read from
disk again. Keys carry the file's fingerprint, dtype and device, so a changed file is never served from an old
copy. A new pipeline is built in CPU memory first and moved to the device only when it loaded, so a failed load
leaves every resident pipeline as it was. Components that two pipeline folders share on disk (the same VAE or text
encoder files, e.g. by symlink) are loaded once and handed to diffusers' `from_pretrained` for the second.
A pipeline under a memory plan (`memory_plan.py`) is placed as its plan says, never moved whole where diffusers'
offload hooks move its parts. It holds two amounts: its bytes on the device and its bytes waiting in host memory (text
encoders kept on the CPU, components or blocks the hooks have moved off). On the CPU device both are the same memory:
the pipelines budget counts all of it. On a GPU the pipelines budget (the GPU's memory) counts its device bytes, and
its host bytes are charged to the offload budget (the host RAM tier) as a reservation beside the pipelines pushed
there, so what waits in RAM is counted once, wherever it waits.
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
    attached: object  # ipadapter.attach.AttachedAdapters (compiled: slots.SlotAttachment): the IP-Adapters it carries now
    loras: PipelineLoras  # the LoRAs loaded into it, and which act now
    own_components: dict  # name -> module as loaded: a request may swap one (its VAE) for the length of the request
    scheduler_config: dict
    scheduler_class: str
    load_seconds: float
    model_hash: str | None  # A1111's short hash of a single-file checkpoint (folders have none)
    components: dict = field(default_factory=dict)  # name -> identity of its files on disk (shared components)
    dtype: object = None  # torch.dtype it was loaded in (per family: `util/devices.model_dtype`)
    memory: MemoryPlan = NO_PLAN  # where its weights live (`memory_plan.py`)
    compiled: object = None  # loading.compiled.CompiledDenoiser: its denoiser compiled (`--compile`), or None
    _img2img: object = None

    @property
    def own_vae(self):
        """The VAE it came with (a request may use another from the tree, for that request only)."""
        return self.own_components["vae"]

    def __post_init__(self):
        # its weights as loaded (the LoRA layers later added inside its modules count in the one LoRA budget): on
        # the device all, or without the text encoders kept on the CPU, or under diffusers' offload hooks what its
        # plan holds there at its peak (one component, or a few blocks); the rest waits in host memory
        modules = {n: m for n, m in self.own_components.items() if isinstance(m, torch.nn.Module)}
        self.total_bytes = module_bytes_of(modules.values())
        if self.memory.mode in ("model", "group"):
            self.device_bytes = min(self.memory.on_device_bytes, self.total_bytes)
        else:
            kept = self.memory.mode == "encoders"
            self.device_bytes = module_bytes_of(m for n, m in modules.items() if not (kept and is_encoder(n)))
        self.host_bytes = self.total_bytes - self.device_bytes
        self.hooked = False  # diffusers' offload hooks installed (`memory_plan.place`)

    def charge(self, device: torch.device) -> int:
        """What it counts in the pipelines budget: on the CPU device all it holds (its "host" part is the same
        memory); on a GPU its device bytes (the host part is charged to the offload budget, `host_key`)."""
        return self.total_bytes if device.type == "cpu" else self.device_bytes

    def memory_event(self) -> dict:
        """Its bytes on the device and in host memory, for the events."""
        return {"device_bytes": self.device_bytes, "host_bytes": self.host_bytes}

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
            self.offloaded.discard(host_key(loaded.key))  # nor is its host part held for it
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
        charge = loaded.charge(self.device)
        evicted, unloaded = self.on_device.put(loaded.key, loaded, charge, label=loaded.name, with_values=True), 0
        if self.device.type != "cpu" and loaded.host_bytes:  # its part in host RAM: the offload budget's memory
            unloaded += self._reserve_host(loaded, events)
        for old in evicted:
            if self.current is old.value:
                self.current = None
            self.offloaded.discard(host_key(old.key))  # all of it moves to host memory (or is freed): counted there
            why = f"the pipeline budget ({_mib(self.on_device.budget_bytes)}) needed room for {loaded.name}"
            if 0 < old.value.total_bytes <= self.offloaded.budget_bytes:
                # what it holds but does not own stays on the device: the IP-Adapters (cached for every model)
                # and a request's VAE (cached); a component shared with another model comes back with `get`
                old.value.attached.attach([], ())
                old.value.restore_components()
                old.value.loras.clear()  # the LoRA budget is the device's: they load again if it comes back
                leave_device(old.value.pipeline, old.value.memory)
                # the host parts of the pipelines staying on the device (the new one's too) are not for eviction
                staying = {host_key(p.key) for p in self.on_device.values()}
                for gone in self.offloaded.put(old.key, old.value, old.value.total_bytes, label=old.label, keep=staying,
                                               with_values=True):  # fmt: skip
                    if gone.value is None:  # a host part: only when the parts alone exceed the budget
                        continue
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

    def _reserve_host(self, loaded: LoadedPipeline, events: list) -> int:
        """Charge a GPU pipeline's host part (text encoders kept on the CPU, offloaded components) to the offload
        budget, pushing pipelines waiting there out for it; returns how many were freed."""
        freed = 0
        for gone in self.offloaded.put(host_key(loaded.key), None, loaded.host_bytes, label=f"{loaded.name} (host part)",
                                       keep={host_key(p.key) for p in self.on_device.values()}, with_values=True):  # fmt: skip
            if gone.value is None:  # another resident pipeline's reservation (only when they exceed the budget)
                continue
            self._let_go(gone.value)
            freed += 1
            log.info("model %s unloaded from CPU memory (its budget)", gone.label)
            events.append({"event": "model_unloaded", "model": gone.label, "why": "CPU memory budget"})
        return freed

    def all(self) -> list[LoadedPipeline]:
        """Every resident pipeline, on the device and in CPU memory."""
        return [*self.on_device.values(), *(p for p in self.offloaded.values() if p is not None)]

    def shared_components(self, identities: dict[str, str]) -> dict:
        """For a pipeline about to load: its components (name -> identity of their files) that a resident pipeline
        already holds, as modules to hand to `from_pretrained`."""
        held = {known: loaded.own_components[name]  # never what a request swapped in
                for loaded in self.all() for name, known in loaded.components.items()}  # fmt: skip
        return {name: held[identity] for name, identity in identities.items() if identity in held}

    def discard_older_versions(self, key: tuple) -> list:
        """Pipelines loaded from an earlier version of one of this key's files (the transformer's or a part's: the
        same path under another fingerprint): no request can match them again, so they are freed (their LoRA layers
        taken out of any text encoder or VAE they share with others). A pipeline with another T5 at another path
        is another pipeline and stays."""
        found = [p for p in self.all() if older_version(p.key, key)]
        for stale in found:
            self._let_go(stale)
        dropped = self.on_device.discard_where(lambda k: older_version(k, key))
        dropped += [e for e in self.offloaded.discard_where(lambda k: older_version(pipeline_of(k), key))
                    if e.key[0] != HOST]  # fmt: skip
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
        self.offloaded.discard(host_key(key))
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


def module_bytes_of(modules) -> int:
    return sum(module_bytes(m) for m in modules)


HOST = "host part"  # the offload budget's key of a GPU pipeline's host part: (HOST, its key)


def host_key(key: tuple) -> tuple:
    return (HOST, key)


def pipeline_of(key: tuple) -> tuple:
    """The pipeline key an offload-budget key stands for (itself, or the one whose host part it reserves)."""
    return key[1] if key and key[0] == HOST else key


def files_of(key: tuple) -> dict:
    """path -> fingerprint of every file a pipeline key names: its own (`Entry.key`: path, fingerprint first) and
    its parts' (`ModelParts.key`: (role, (path, fingerprint)) pairs at its end)."""
    files = {key[0]: key[1]}
    for item in key[2:]:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], tuple) and len(item[1]) >= 2:
            files[item[1][0]] = item[1][1]
    return files


def older_version(old: tuple, new: tuple) -> bool:
    """Whether the pipeline keyed `old` was built from a file at one of `new`'s paths under another fingerprint
    (the file changed on disk since)."""
    if not old or old[0] == HOST:
        return False
    mine = files_of(new)
    return any(path in mine and mine[path] != fingerprint for path, fingerprint in files_of(old).items())


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"
