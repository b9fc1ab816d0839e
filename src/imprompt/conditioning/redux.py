"""A FLUX Redux unit: reference images made into tokens that join the prompt's T5 tokens.

BFL's Redux (`flux1-redux-dev.safetensors`, or diffusers' prior-redux folder) is no IP-Adapter: it adds no
attention. SigLIP so400m reads each image (its last hidden state, after the tower's final norm: 27 x 27 patches of
1152 at 384 px), `redux_up` -> SiLU -> `redux_down` turns each patch into a token of T5's width, and the tokens are
appended to the prompt's T5 tokens, as diffusers' `FluxPriorReduxPipeline` does before `FluxPipeline` runs. It pairs
like any unit: its encoder is picked from its weights (`pick_encoder`, "siglip last_hidden_state[1152]"), and the
SigLIP output goes through the engine's embedding cache, so a reference image seen before is not encoded again.

What a unit computes, for images i = 1..n with Redux tokens R_i (each [patches, T5 width]):
- `scale` s is ComfyUI's `StyleModelApply` strength in its "multiply" mode: the image tokens are multiplied by s,
  the prompt's own tokens are left as they are (diffusers' `prompt_embeds_scale` multiplies the text tokens too;
  at s = 1 with one image the two agree).
- several images: each image's tokens are appended in turn (ComfyUI's chained StyleModelApply nodes); with
  `average` their mean is appended once (diffusers' prior given the images with `prompt_embeds_scale` 1/n each).
- `downsample` f (imprompt beyond diffusers, as the community's Redux-advanced nodes do): each image's token grid
  (side x side patches) is area-pooled to (side // f) x (side // f) tokens, so 729 become 81 at f = 3: the
  prompt's tokens weigh more against fewer image tokens.
- only the positive prompt gets them: FLUX's true-CFG negative prompt is encoded as written (diffusers' prior
  makes positive embeddings only; ComfyUI applies the style to the conditioning it is wired to).
Several Redux units append their tokens in the request's order, after the prompt's; the pooled CLIP embedding is
the prompt's. `prompt.py` encodes the prompt (after the request's LoRAs act on the text encoders) and appends them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, IncompatibleError, RequestError
from ..loading.tensors import first_line
from ..models import catalog
from ..models.store import Entry, ModelStore
from ..request import IPAdapterUnit
from .ip_adapter import UnitInputs, UnitPlan, fits, pick_encoder

if TYPE_CHECKING:  # torch-heavy modules are imported where used: planning stays light (no torch)
    from ..ipadapter.embeddings import UnitEmbeddings

log = logging.getLogger("imprompt")

REDUX_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # a diffusers folder's


@dataclass(frozen=True)
class ReduxUnitPlan(UnitPlan):
    """A Redux unit: its file, the SigLIP its weights need, its images."""

    def encode(self, state, inputs: UnitInputs, events: list, true_cfg: bool) -> UnitEmbeddings:
        """Each image's SigLIP last hidden state, through the engine's encoder and embedding caches (its negative
        branch is never read: zeros, made without the encoder)."""
        return state.embedder.embed(self.encoder, self.output, inputs.images, self.label, self.why, events, None,
                                    False, "zeros")  # fmt: skip

    def describe(self, faces, embeddings: UnitEmbeddings, active_steps: list[int]) -> dict:
        info = super().describe(faces, embeddings, active_steps)
        info.update(downsample=self.unit.downsample, strength_rule="ComfyUI StyleModelApply multiply: image tokens x "
                    "scale, prompt tokens unchanged")  # fmt: skip
        return info


def is_redux(adapter: Entry) -> bool:
    return adapter.spec.variant == "redux"


def plan_redux_unit(index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore,
                    pipeline: Entry | None) -> ReduxUnitPlan:  # fmt: skip
    """A Redux unit checked against the model (a FLUX.1 model whose T5 is as wide as its tokens) and against what a
    Redux unit reads (images; no masks, windows, per-block weights or negative images: its tokens are part of the
    prompt for every step), its SigLIP picked from its weights. Names only: no image is read."""
    spec, where = adapter.spec, f"ip_adapters.{index}"
    name = catalog.friendly_name(adapter.name) or adapter.name
    if pipeline is not None and not fits(adapter, pipeline):
        p = pipeline.spec
        if p.architecture != "flux":
            problem = (f"{name} ({Path(spec.path).name}) is FLUX Redux, for FLUX.1 models (it appends tokens of T5's "
                       f"width {spec.cross_attention_dim} to the prompt's), but model {pipeline.name} is {p.family}")  # fmt: skip
        else:
            problem = (f"{name} ({Path(spec.path).name}) makes tokens of width {spec.cross_attention_dim}, but model "
                       f"{pipeline.name}'s T5 tokens are {p.cross_attention_dim} wide: it was made for another FLUX")  # fmt: skip
        models = [m.name for m in store.pipelines if fits(adapter, m)]
        adapters = sorted({catalog.friendly_name(e.name) or e.name for e in store.adapters
                           if not is_redux(e) and fits(e, pipeline)})  # fmt: skip
        raise IncompatibleError(
            f"{where}: {problem}. Use a FLUX.1 model ({', '.join(models) or 'none in the models folder'}), or an "
            f"image prompt made for {p.family} ({', '.join(adapters) or 'none in the models folder'})"
        )
    refused = {
        "embeddings": (unit.embeddings, "give the images (their SigLIP states are cached)"),
        "face_embeddings": (unit.face_embeddings is not None, "give images"),
        "masks": (unit.masks is not None, "its tokens join the prompt, which has no region; remove them"),
        "negative_images": (unit.negative_images is not None, "only the positive prompt gets its tokens; remove them"),
        "layers": (unit.layers is not None, "it attaches to no block; remove them"),
        "start": (unit.start != 0.0, "its tokens are part of the prompt at every step; leave it at 0"),
        "end": (unit.end != 1.0, "its tokens are part of the prompt at every step; leave it at 1"),
        "structure": (unit.structure != 1.0, "that is FaceID Plus v2's; leave it at 1"),
        "faceid_version": (unit.faceid_version, "that is FaceID Plus's; leave it out"),
    }
    for field_name, (given, fix) in refused.items():
        if given:
            raise RequestError(f"{where}.{field_name}: {name} is FLUX Redux, which does not read {field_name}: {fix}")
    encoder, why = pick_encoder(adapter, store, unit.encoder)
    side = encoder.spec.image_size // encoder.spec.patch_size  # its grid of patches, one token each
    if unit.downsample > side:
        raise RequestError(f"{where}.downsample: {unit.downsample} is more than the {side} x {side} grid of tokens "
                           f"{encoder.name} gives; use 1..{side}")  # fmt: skip
    return ReduxUnitPlan(index, unit, adapter, encoder, why)


def redux_file(spec) -> Path:
    """The weights of a Redux spec: BFL's file itself, or a diffusers `image_embedder/` folder's."""
    path = Path(spec.path)
    if not path.is_dir():
        return path
    found = next((path / n for n in REDUX_WEIGHTS if (path / n).is_file()), None)
    if found is None:
        raise CheckpointError(path, f"Redux folder has no weights (looked for {REDUX_WEIGHTS[0]})")
    return found


def build_redux(spec, device, dtype):
    """diffusers' `ReduxImageEncoder` of the file's widths, filled from its tensors (BFL's names are diffusers')."""
    import torch
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    from ..loading.tensors import read_tensors

    state = read_tensors(redux_file(spec), dtype)
    try:
        with torch.device("meta"):
            module = ReduxImageEncoder(redux_dim=spec.embed_dim, txt_in_features=spec.cross_attention_dim)
        if spec.redux_hidden != 3 * spec.cross_attention_dim:  # diffusers' class assumes 3 x T5's width
            with torch.device("meta"):
                module.redux_up = torch.nn.Linear(spec.embed_dim, spec.redux_hidden)
                module.redux_down = torch.nn.Linear(spec.redux_hidden, spec.cross_attention_dim)
        module.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(spec.path, f"cannot build this FLUX Redux ({first_line(exc)})",
                              "Check that the file is complete and of BFL's layout") from None  # fmt: skip
    return module.to(device=device).eval().requires_grad_(False)  # already in `dtype`, as read


def built_redux(state, entry: Entry, dtype, label: str, events: list):
    """A Redux file's module, from the engine's adapter cache (under its budget) or built now."""
    from ..util.cache import module_bytes

    key = entry.key("redux", dtype, state.device)
    module = state.adapters.get(key)
    if module is not None:
        return module
    stale = state.adapters.discard_older_versions(key)
    started = time.perf_counter()
    module = build_redux(entry.spec, state.device, dtype)
    seconds = time.perf_counter() - started
    evicted = state.adapters.put(key, module, module_bytes(module), label=entry.name)
    for old, why in [(e, "its file changed on disk") for e in stale] + [(e, "adapter cache budget") for e in evicted]:
        events.append({"event": "adapter_evicted", "adapter": old.label, "why": why})
    if stale or evicted:  # as `image_prompts.built_adapter`: no kept shell keeps an evicted adapter alive
        for resident in state.pipelines.all():
            resident.attached.forget([e.key for e in stale + evicted])
    log.info("FLUX Redux %s (%s) loaded in %.2f s", label, entry.path.name, seconds)
    events.append({"event": "adapter_loaded", "adapter": label, "file": str(entry.path), "seconds": round(seconds, 4)})
    return module


def redux_tokens(module, states, scale: float, downsample: int = 1, average: bool = False):
    """The tokens one unit appends: [1, tokens, T5 width] (see the module docstring for the arithmetic)."""
    import torch

    with torch.no_grad():
        parameter = next(module.parameters())
        tokens = module(states.to(device=parameter.device, dtype=parameter.dtype)).image_embeds  # [n, patches, width]
        if downsample > 1:
            tokens = pooled(tokens, downsample)
        if average:
            tokens = tokens.mean(0, keepdim=True)
        return (tokens * scale).reshape(1, -1, tokens.shape[-1])


def pooled(tokens, factor: int):
    """Each image's square grid of tokens area-pooled to (side // factor)^2 (imprompt beyond diffusers)."""
    import torch

    images, count, width = tokens.shape
    side = math.isqrt(count)
    if side * side != count or side // factor < 1:
        raise RequestError(f"downsample: {factor} cannot pool a {side} x {side} grid of Redux tokens ({count} tokens); "
                           f"use 1..{side}")  # fmt: skip
    grid = tokens.transpose(1, 2).reshape(images, width, side, side)
    grid = torch.nn.functional.interpolate(grid, size=(side // factor, side // factor), mode="area")
    return grid.reshape(images, width, -1).transpose(1, 2)


@dataclass
class ReduxPrompts:
    """A request's Redux units, a part of its image prompts (`image_prompts.py` prepares, applies and describes them
    with its IP-Adapter units): their tokens, made in `prepare`, go to the prompt through the call."""

    units: tuple[ReduxUnitPlan, ...]
    inputs: list[UnitInputs]
    embeddings: list = field(default_factory=list)
    tokens: list = field(default_factory=list)

    def prepare(self, state, loaded, events: list, made_elsewhere: dict) -> None:
        """Each unit's SigLIP states (cached, or from a cluster's encoder worker) through its Redux, built once in
        the model's dtype."""
        self.embeddings, self.tokens = [], []
        for u, inputs in zip(self.units, self.inputs):
            embeddings = made_elsewhere.get(u.index) or u.embed(state, inputs, events)
            module = built_redux(state, u.adapter, loaded.dtype or state.dtype, u.label, events)
            self.embeddings.append(embeddings)
            self.tokens.append(redux_tokens(module, embeddings.positive, u.unit.scale, u.unit.downsample,
                                            u.unit.average))  # fmt: skip

    def apply(self, call) -> None:
        call.prompt_tokens += self.tokens

    def describe(self, faces, steps: int) -> list[dict]:
        every = list(range(steps))
        described = []
        for u, embeddings, tokens in zip(self.units, self.embeddings, self.tokens):
            info = u.describe(faces, embeddings, every)
            info["tokens"] = tokens.shape[1]
            described.append(info)
        return described
