"""A request's result: images, `info` and A1111 infotexts, assembled from the call and the conditionings.

`info` says what served the request and how; `all_seeds` and each image's infotext come with it.

The fields every request has (model, size, seeds, sampler, timings, events) are written here; each conditioning
describes its own part (`conditioning.Description`) and its infotext fields take their place in A1111's order
(`util.infotext.image_fields`).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from . import __version__
from .util.infotext import image_fields, parameters_text, png_info
from .util.samplers import a1111_names


@dataclass
class Result:
    images: list[Image.Image]
    info: dict
    infotexts: list[str]  # A1111's "parameters" text of each image (each with its own seed)
    control_images: list[Image.Image] = field(default_factory=list)  # each ControlNet unit's control image

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
class Timer:
    """How long each step of a request took (`info["timings"]`), and within it each kind of conditioning
    (`by_kind`: {"loras": {"prepare": s, "apply": s}, ...})."""

    marks: dict = field(default_factory=dict)
    by_kind: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    last: float = field(default_factory=time.perf_counter)

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = round(now - self.last, 4)
        self.last = now

    @contextmanager
    def part(self, kind: str, step: str):
        started = time.perf_counter()
        yield
        self.by_kind.setdefault(kind, {})[step] = round(time.perf_counter() - started, 4)

    def summary(self) -> dict:
        return {**self.marks, "total": round(time.perf_counter() - self.started, 4), "by_kind": self.by_kind}


def make_result(images: list, call, request, descriptions: list, *, model: str, model_hash: str | None,
                engine: dict, events: list, timer: Timer, interrupted: bool) -> Result:  # fmt: skip
    """`engine`: device and dtypes, as the info reports them. Image i's seed is what a request with seed + i gives."""
    sampler, schedule_type = a1111_names(call.scheduler)
    seeds = [call.seed + i for i in range(len(images))]
    parts: dict = {}
    described: dict = {}
    suffix, warnings, extra = "", [], []
    for description in descriptions:
        extra += description.images
        parts |= description.info
        described |= description.infotext
        suffix += description.prompt_suffix
        warnings += description.warnings
    infotexts = [
        parameters_text(request.prompt + suffix, request.negative_prompt, image_fields(
            steps=request.steps, sampler=sampler, schedule_type=schedule_type, cfg_scale=request.cfg_scale,
            seed=seed, width=call.width, height=call.height, model_hash=model_hash, model=model,
            batch_size=request.batch_size, batch_pos=i, described=described,
        ))
        for i, seed in enumerate(seeds)
    ]  # fmt: skip
    fields = {
        "model": model,
        "seed": call.seed,
        "all_seeds": seeds,
        "steps": request.steps,
        "cfg_scale": request.cfg_scale,
        "width": call.width,
        "height": call.height,
        "batch_size": request.batch_size,
        "sampler": sampler,
        "schedule_type": schedule_type,
        "model_hash": model_hash,
        **engine,
        **parts,
        "warnings": warnings,
        "events": events,
        "timings": timer.summary(),
        "interrupted": interrupted,
        "version": __version__,
    }
    rank = {name: i for i, name in enumerate(INFO_ORDER)}  # a kind's fields it does not list: before "warnings"
    info = dict(sorted(fields.items(), key=lambda item: rank.get(item[0], rank["warnings"] - 0.5)))
    return Result(images, info, infotexts, extra)


# the order `info` has always had its fields in (the kinds' among them)
INFO_ORDER = ("model", "mode", "prompt", "negative_prompt", "seed", "all_seeds", "steps", "cfg_scale", "width",
              "height", "batch_size", "sampler", "schedule_type", "model_hash", "model_parts", "denoising_strength", "device", "dtype",
              "encoder_dtype", "ip_adapters", "controlnets", "loras", "textual_inversions", "clip_skip", "vae", "vae_tiling",
              "warnings", "events", "timings", "interrupted", "version")  # fmt: skip
