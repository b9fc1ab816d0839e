"""The VAE a request decodes with (the model's own, or a file from the tree), tiled where the decode needs it.

A VAE file (A1111's `sd_vae`) acts for that request only. The decode goes tile by tile where the whole image's
would not fit the memory the caches leave (decided from the size and the device alone, so the pixels stay the
request's own).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..errors import IncompatibleError, UnsupportedError
from ..models.store import Entry, ModelStore
from ..request import GenerateRequest
from . import Conditioning, Description, Preparation

log = logging.getLogger("imprompt")


def plan(request: GenerateRequest, model: Entry, store: ModelStore) -> Vae:
    if not request.vae or model.spec.parts:  # a transformer alone: its VAE is one of its parts (`plan_parts`)
        return Vae(None)
    if model.spec.architecture != "unet":
        raise UnsupportedError(f"vae: another VAE than the model's own is not supported yet for {model.spec.family} "
                               f"models (model {model.name}); remove it")  # fmt: skip
    entry = store.vae(request.vae)
    if entry.spec.latent_channels != 4:
        raise IncompatibleError(
            f"VAE {entry.path.name} has {entry.spec.latent_channels} latent channels ({entry.spec.family}), but model "
            f"{model.name} ({model.spec.family}) works on 4; choose an SD 1.x / 2.x / SDXL VAE"
        )
    return Vae(entry)


@dataclass
class Vae(Conditioning):
    kind = "vae"

    entry: Entry | None  # None: the model's own
    vae: object = None
    hash: str | None = None
    budget: int = 0
    tiled: bool = False

    def prepare(self, prep: Preparation) -> None:
        """The file's VAE, built to the model's VAE configuration, from the engine's VAE cache or loaded now."""
        from ..loading.vaes import load_vae  # torch-heavy: imported where used, so planning stays light
        from ..util.cache import module_bytes

        state, loaded = prep.state, prep.loaded
        self.budget = state.activation_budget
        if self.entry is None:
            return
        key = self.entry.key(loaded.dtype, state.device, loaded.name)  # built to the model's VAE configuration
        self.vae = state.vaes.get(key)
        if self.vae is None:
            started = time.perf_counter()
            self.vae = load_vae(self.entry.spec, loaded.own_vae, state.device, loaded.dtype)
            for old in state.vaes.put(key, self.vae, module_bytes(self.vae), label=self.entry.path.name):
                log.info("VAE %s evicted from cache: VAE cache budget", old.label)
            seconds = time.perf_counter() - started
            log.info("VAE %s loaded in %.2f s", self.entry.path.name, seconds)
            prep.events.append({"event": "vae_loaded", "vae": self.entry.path.name, "seconds": round(seconds, 4)})
        self.hash = state.store.a1111_hash(self.entry.path)

    def apply(self, call) -> None:
        """The VAE on the call's pipeline, the model's own again after the call; tiled where the decode needs it."""
        from ..loading.vaes import needs_tiling

        vae = self.vae if self.vae is not None else call.loaded.own_vae
        call.use("vae", vae)
        self.tiled = vae.use_tiling = needs_tiling(vae, call.width, call.height, self.budget)  # set by every request

    def batch_part(self) -> tuple | None:
        """A batch decodes with one VAE: the model's own, or the same file."""
        return (self.entry.key() if self.entry is not None else None,)

    def describe(self, call) -> Description:
        info = None
        if self.entry is not None:
            info = {"name": self.entry.path.name, "file": str(self.entry.path), "hash": self.hash}
        infotext = {"VAE hash": self.hash, "VAE": self.entry.path.name} if self.entry is not None else {}
        return Description(info={"vae": info, "vae_tiling": self.tiled}, infotext=infotext)
