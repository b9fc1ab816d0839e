"""A request's image prompts: its IP-Adapter units (`ip_adapter.py`, `faceid.py`, `instantid.py`), attached together.

The engine owns the encoders: each unit is encoded by the encoder its own adapter needs, and the pipeline only
ever receives finished embeddings, which is what lets two units with two encoders share one image (diffusers keeps
one encoder on the pipeline). The model carries exactly the request's adapters, in the request's order, at the
request's per-step scales; building each adapter once and attaching by reference makes switching cost nothing.
How a family's pipeline takes the embeddings is its attachment's (`ipadapter/attach.py`, `ipadapter/dit.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, LimitError, RequestError, UnsupportedError
from ..loading.tensors import first_line
from ..models.store import Entry, ModelStore
from ..request import GenerateRequest, IPAdapterUnit, parse_request, parse_unit
from ..util.images import image_digest, noise_image
from . import Conditioning, Description, Preparation
from .faceid import plan_face_unit
from .instantid import IdentityNetUnit, InstantIDInputs, InstantIDUnitPlan, find_adapter, identity_units, is_instantid
from .instantid import check_face_pack, plan_instantid_unit
from .ip_adapter import UnitInputs, UnitPlan, plan_image_unit, unit_weights
from .pulid import PuLIDInputs, PuLIDPrompts, PuLIDUnitPlan, check_alone, check_face_files, is_pulid, plan_pulid_unit
from .redux import ReduxPrompts, ReduxUnitPlan, is_redux, plan_redux_unit

if TYPE_CHECKING:  # torch-heavy modules are imported where used: planning stays light (no torch)
    from ..ipadapter.embeddings import UnitEmbeddings

log = logging.getLogger("imprompt")


def check_limits(request: GenerateRequest, limits) -> None:
    """How many units and images a request may bring: checked before any image is decoded (a body of 64 MiB holds
    100,000 tiny PNGs, each an encoder pass). The server calls this before it queues a job."""
    if len(request.ip_adapters) > limits.max_units:
        raise LimitError(
            f"ip_adapters: {len(request.ip_adapters)} units is more than the {limits.max_units} a request may have; "
            f"send fewer (the server's --max-units sets the limit)"
        )
    for i, unit in enumerate(request.ip_adapters):  # masks and negative images never outnumber the images
        faces = unit.face_embeddings if isinstance(unit.face_embeddings, list) else []
        if len(faces) > limits.max_images:
            raise LimitError(
                f"ip_adapters.{i}.face_embeddings: {len(faces)} faces is more than the {limits.max_images} a unit "
                f"may have; send fewer (the server's --max-images sets the limit)"
            )
        if len(unit.images) > limits.max_images:
            raise LimitError(
                f"ip_adapters.{i}.images: {len(unit.images)} is more than the {limits.max_images} a unit may have; "
                f"send fewer, or average them once with `imprompt embed` (the server's --max-images sets the limit)"
            )


def unit_inputs(index: int, unit: IPAdapterUnit, state) -> UnitInputs:
    """Every image a unit brings, decoded (and so checked) before anything else happens."""
    where = f"ip_adapters.{index}"
    images = [state.image(ref, f"{where}.images.{j}") for j, ref in enumerate(unit.images)]
    negatives = None
    if unit.negative_images is not None:
        negatives = [noise_image() if ref == "noise" else state.image(ref, f"{where}.negative_images.{j}")
                     for j, ref in enumerate(unit.negative_images)]  # fmt: skip
    masks = None
    if unit.masks is not None:
        masks = [state.image(ref, f"{where}.masks.{j}") for j, ref in enumerate(unit.masks)]
    if unit.pose_image is not None:
        return InstantIDInputs(images, negatives, masks, state.image(unit.pose_image, f"{where}.pose_image"))
    if unit.aligned_face is not None:  # PuLID's given crop
        return PuLIDInputs(images, negatives, masks, state.image(unit.aligned_face, f"{where}.aligned_face"))
    return UnitInputs(images, negatives, masks)


def plan_unit(index: int, unit: IPAdapterUnit, store: ModelStore, pipeline: Entry | None = None) -> UnitPlan:
    """Resolve and check one unit, by its adapter's kind. Without `pipeline` (saving embeddings) the model checks
    are skipped. Names only: no image is read."""
    adapter = find_adapter(store, unit.adapter) or store.adapter(unit.adapter)
    if is_instantid(adapter):  # InstantID: a face adapter and its IdentityNet ControlNet (`instantid.py`)
        return plan_instantid_unit(index, unit, adapter, store, pipeline)
    if is_pulid(adapter):  # PuLID: an ID encoder and CAs hooked into FLUX's blocks (`pulid.py`)
        return plan_pulid_unit(index, unit, adapter, store, pipeline)
    for field_name, given in (("aligned_face", unit.aligned_face is not None), ("start_step", unit.start_step is not None),
                              ("num_zero", unit.num_zero is not None), ("ortho", unit.ortho is not None)):  # fmt: skip
        if given:
            raise RequestError(f"ip_adapters.{index}.{field_name}: acts on PuLID units only, but {unit.adapter} is "
                               f"{adapter.spec.variant}; leave it out")  # fmt: skip
    for field_name, given in (("controlnet_scale", unit.controlnet_scale is not None),
                              ("pose_image", unit.pose_image is not None), ("identitynet", unit.identitynet)):  # fmt: skip
        if given:
            raise RequestError(f"ip_adapters.{index}.{field_name}: acts on InstantID units only, but {unit.adapter} is "
                               f"{adapter.spec.variant}; leave it out")  # fmt: skip
    if is_redux(adapter):  # FLUX Redux: tokens for the prompt, no attention (`redux.py`)
        return plan_redux_unit(index, unit, adapter, store, pipeline)
    if unit.downsample != 1:
        raise RequestError(f"ip_adapters.{index}.downsample: pools FLUX Redux's image tokens, but {unit.adapter} is an "
                           f"IP-Adapter ({adapter.spec.variant}); leave it at 1")  # fmt: skip
    weights = unit_weights(index, unit, adapter, store, pipeline)
    if adapter.spec.consumes == "faceid_embeds":
        return plan_face_unit(index, unit, adapter, store, weights)
    return plan_image_unit(index, unit, adapter, store, weights)


def check_for_transformer(request: GenerateRequest, model: Entry, units: tuple) -> None:
    """Limits of diffusers that imprompt keeps for SD 3.5 and FLUX, documented: SD 3.5 takes one IP-Adapter (its
    transformer holds one image projection), one image per unit (or averaged); FLUX's and SD3's attention
    processors take no masks; FLUX reads a negative image under true CFG only."""
    family, name, flux = model.spec.family, model.name, model.spec.architecture == "flux"
    if not flux and len(units) > 1:
        raise UnsupportedError(
            f"ip_adapters: model {name} is {family}, whose transformer holds one IP-Adapter (as in diffusers' "
            f"SD3IPAdapterMixin); the request has {len(units)} units. Use one unit"
        )
    for unit in units:
        where, u = f"ip_adapters.{unit.index}", unit.unit
        if u.masks is not None:
            raise UnsupportedError(f"{where}.masks: IP-Adapter masks are not supported (diffusers' SD3 and FLUX "
                                   f"attention processors take none) for {family} models (model {name}); remove it")  # fmt: skip
        if not flux and len(u.images) > 1 and not u.average:
            raise UnsupportedError(f"{where}.images: {len(u.images)} images, but an SD 3.5 IP-Adapter reads one; "
                                   f"set average: true to fold them into one, or give one")  # fmt: skip
        if not flux and unit.embeddings is not None and unit.embeddings.spec.images > 1 and not u.average:
            raise UnsupportedError(
                f"{where}.embeddings: {unit.embeddings.name} holds the embeddings of {unit.embeddings.spec.images} "
                f"images, but an SD 3.5 IP-Adapter reads one; set average: true to fold them into one, or save "
                f"embeddings of one image")  # fmt: skip
        if flux and u.negative_images is not None and request.true_cfg_scale == 1.0:
            raise RequestError(f"{where}.negative_images: FLUX uses a negative image only under true CFG; set "
                               f"true_cfg_scale above 1 (and a negative prompt), or remove them")  # fmt: skip


def decode_inputs(request: GenerateRequest, state) -> list[UnitInputs]:
    """Every unit's images decoded: the first check of a request (before any name is resolved)."""
    return [unit_inputs(i, unit, state) for i, unit in enumerate(request.ip_adapters)]


def plan(request: GenerateRequest, model: Entry, state, inputs: list[UnitInputs], width: int, height: int):
    planned = [plan_unit(i, unit, state.store, model) for i, unit in enumerate(request.ip_adapters)]
    units = tuple(u for u in planned if not isinstance(u, (ReduxUnitPlan, PuLIDUnitPlan)))  # attached to the model
    if model.spec.architecture != "unet":
        check_for_transformer(request, model, units)
    redux = ReduxPrompts(tuple(u for u in planned if isinstance(u, ReduxUnitPlan)),
                         [inputs[u.index] for u in planned if isinstance(u, ReduxUnitPlan)])  # fmt: skip
    check_alone(units, tuple(u for u in planned if isinstance(u, PuLIDUnitPlan)))
    check_face_files(tuple(u for u in planned if isinstance(u, PuLIDUnitPlan)), state)  # facexlib's, before any load
    check_face_pack(tuple(u for u in planned if isinstance(u, InstantIDUnitPlan)), state)  # its pack, likewise
    pulid = PuLIDPrompts(tuple(u for u in planned if isinstance(u, PuLIDUnitPlan)),
                         [inputs[u.index] for u in planned if isinstance(u, PuLIDUnitPlan)])  # fmt: skip
    return ImagePrompts(units, [inputs[u.index] for u in units], request.cfg_scale, request.true_cfg_scale > 1.0,
                        width, height, redux=redux, pulid=pulid)  # fmt: skip


def built_adapter(state, entry: Entry, loaded, label: str, events: list):
    """An adapter file's modules for the loaded model, from the engine's adapter cache or built now (through the
    model's attachment). Evicted adapters are let go everywhere: no kept shell or attached set keeps them alive."""
    from ..ipadapter.build import load_adapter_state_dict
    from ..util.devices import release_memory

    key = entry.key(loaded.dtype, state.device)  # built in the model's dtype (bfloat16 for FLUX on CUDA)
    built = state.adapters.get(key)
    if built is not None:
        return built
    stale = state.adapters.discard_older_versions(key)
    started = time.perf_counter()
    state_dict = load_adapter_state_dict(entry.spec)
    try:
        built = loaded.attached.build(entry.spec, state_dict)
    except (RuntimeError, KeyError, ValueError, IndexError) as exc:  # tensors the probe read but cannot build
        raise CheckpointError(entry.path, f"cannot build this IP-Adapter ({first_line(exc)})",
                              "Check that the file is complete and of a published layout") from None  # fmt: skip
    seconds = time.perf_counter() - started
    evicted = state.adapters.put(key, built, built.nbytes, label=entry.name)
    for old, why in [(e, "its file changed on disk") for e in stale] + [(e, "adapter cache budget") for e in evicted]:
        log.info("adapter %s evicted from cache: %s", old.label, why)
        events.append({"event": "adapter_evicted", "adapter": old.label, "why": why})
    if stale or evicted:  # shells on any resident model must not keep evicted adapters alive
        for resident in state.pipelines.all():
            resident.attached.forget([e.key for e in stale + evicted])
        release_memory(state.device)
    log.info("adapter %s (%s) loaded in %.2f s", label, entry.path.name, seconds)
    events.append({"event": "adapter_loaded", "adapter": label, "file": str(entry.path), "seconds": round(seconds, 4)})
    return built


@dataclass
class ImagePrompts(Conditioning):
    kind = "image_prompts"

    units: tuple[UnitPlan, ...]
    inputs: list[UnitInputs]
    cfg_scale: float
    true_cfg: bool  # FLUX's true CFG: its negative branch is read
    width: int
    height: int
    keys: tuple = ()  # the built adapters' cache keys, which the attachment compares
    faces: object = None  # the engine's face analyser, whose pack a FaceID unit's info names
    built: list = field(default_factory=list)
    embeddings: list[UnitEmbeddings] = field(default_factory=list)
    active_steps: list[list[int]] = field(default_factory=list)
    redux: ReduxPrompts | None = None  # the request's FLUX Redux units, whose tokens join the prompt's
    pulid: PuLIDPrompts | None = None  # the request's PuLID unit, whose CAs are hooked into FLUX's blocks

    @property
    def identity_nets(self) -> tuple[IdentityNetUnit, ...]:
        """The IdentityNets its InstantID units bring to the request's ControlNets."""
        return identity_units(self.units)

    def prepare(self, prep: Preparation) -> None:
        """Each adapter built (or taken from the cache), each unit's embeddings made (or taken from what a
        cluster's encoder worker made)."""
        self.built = [built_adapter(prep.state, u.adapter, prep.loaded, u.label, prep.events) for u in self.units]
        self.embeddings = [prep.made_elsewhere[u.index] if u.index in prep.made_elsewhere
                           else u.embed(prep.state, inputs, prep.events, self.true_cfg)
                           for u, inputs in zip(self.units, self.inputs)]  # fmt: skip
        self.keys = tuple(u.adapter.key(prep.loaded.dtype, prep.state.device) for u in self.units)
        for u, built, embeddings, inputs in zip(self.units, self.built, self.embeddings, self.inputs):
            if isinstance(u, InstantIDUnitPlan):  # what its IdentityNet reads (prepared after, with the ControlNets)
                u.link.built, u.link.embeddings, u.link.inputs = built, embeddings, inputs
        self.faces = prep.state.faces
        if self.redux is not None:
            self.redux.prepare(prep.state, prep.loaded, prep.events, prep.made_elsewhere)
        if self.pulid is not None:
            self.pulid.prepare(prep.state, prep.loaded, prep.events)

    def apply(self, call) -> None:
        """The model carries exactly these adapters; the call gets their embeddings (and masks), the face crops
        FaceID Plus reads, the LoRAs FaceID adapters embed, and a per-step hook for the units' windows."""
        from ..ipadapter.attach import ip_adapter_masks

        attached = call.adapters  # the model's attachment (in a batch: the request's recorder over it)
        if attached.attach(self.built, self.keys):
            log.info("model %s adapters now: %s", call.loaded.name, " + ".join(u.label for u in self.units) or "none")
            call.events.append({"event": "adapters_attached", "adapters": [u.label for u in self.units]})
        unet = getattr(call.loaded.pipeline, "unet", None)  # FaceID's crops and LoRAs exist for UNets only
        attached.set_face_crops([u.face_crop(e, self.cfg_scale > 1.0, unet.device, unet.dtype)
                                 for u, e in zip(self.units, self.embeddings)] if unet is not None else [])  # fmt: skip
        call.after(attached.end_call)  # the face crops' hidden states (and a compiled UNet's tensors) are the call's
        masks = [ip_adapter_masks(inputs.masks, self.width, self.height) for inputs in self.inputs]
        call.kwargs |= attached.pipeline_kwargs(self.embeddings, masks, self.cfg_scale, self.width, self.height)
        call.lora_uses += [use for use in (u.lora_use(unet) for u in self.units) if use is not None]
        self.active_steps = [[] for _ in self.units]
        weights = [u.layer_weights for u in self.units]

        def scales_at(step: int, total: int, index: int) -> None:
            active = [u.unit.active_at(step, total) for u in self.units]
            if index == 0:  # the steps each unit acted at, recorded for the first image
                for steps, on in zip(self.active_steps, active):
                    if on:
                        steps.append(step)
            attached.set_scales([u.unit.scale if on else 0.0 for u, on in zip(self.units, active)], weights)

        call.schedule.add(scales_at)
        if self.built and call.loaded.compiled is not None and not call.loaded.attached.compiles_units:
            call.eager_reasons.append("image-prompt units on an SD 3.5 / FLUX transformer are not compiled")
        if self.pulid is not None and self.pulid.units:
            call.eager_reasons.append("PuLID's ID attention is not compiled")
        if self.redux is not None:
            self.redux.apply(call)
        if self.pulid is not None:
            self.pulid.apply(call)

    def batch_part(self) -> tuple | None:
        """Plain IP-Adapter units batch (each request its own: they are slots of the batch's processors, scaled per
        row); FaceID, InstantID, PuLID and Redux units run alone (not batched yet)."""
        if any(type(u) is not UnitPlan for u in self.units):
            return None
        if (self.redux is not None and self.redux.units) or (self.pulid is not None and self.pulid.units):
            return None
        return ()

    def describe(self, call) -> Description:
        units = [u.describe(self.faces, e, steps) for u, e, steps in zip(self.units, self.embeddings, self.active_steps)]
        if self.redux is not None and self.redux.units:  # every unit in the request's order
            described = zip([u.index for u in self.units] + [u.index for u in self.redux.units],
                            units + self.redux.describe(self.faces, call.steps))  # fmt: skip
            units = [info for _, info in sorted(described, key=lambda pair: pair[0])]
        if self.pulid is not None and self.pulid.units:
            done = [u.index for u in self.units] + [u.index for u in (self.redux.units if self.redux else ())]
            described = zip(sorted(done) + [u.index for u in self.pulid.units], units + self.pulid.describe(self.faces, call.steps))
            units = [info for _, info in sorted(described, key=lambda pair: pair[0])]
        infotext = {}
        if units:  # SD.Next's form: name:scale:start:end per unit, units separated by ';'
            infotext["IP Adapter"] = ";".join(f"{u['adapter']}:{u['scale']}:{u['start']}:{u['end']}" for u in units)
            infotext["IP Adapter encoders"] = ";".join(u["encoder"] for u in units)
        warnings = self.pulid.warnings() if self.pulid is not None else []  # PuLID's fallback embedding, if taken
        return Description(info={"ip_adapters": units}, infotext=infotext, warnings=warnings)


def embed_unit(state, request: GenerateRequest | dict, index: int) -> tuple[UnitEmbeddings, list[dict]]:
    """Unit `index`'s finished embeddings (on the CPU, to travel) and the events of making them: the step a
    generation takes for a unit, run on its own (a cluster's encoder worker)."""
    request = parse_request(request)
    if not 0 <= index < len(request.ip_adapters):
        raise RequestError(f"unit {index}: the request has {len(request.ip_adapters)} IP-Adapter units")
    unit = request.ip_adapters[index]
    events: list[dict] = []
    inputs = unit_inputs(index, unit, state)
    planned = plan_unit(index, unit, state.store, state.store.pipeline(request.model) if request.model else None)
    embeddings = planned.embed(state, inputs, events, request.true_cfg_scale > 1.0)
    return embeddings.to("cpu"), events


def save_unit_embeddings(state, unit: IPAdapterUnit | dict, path) -> Path:
    """Encode a unit's images once, with the encoder its adapter needs, and write the embeddings to a `.safetensors`
    file that later units can name (`"embeddings": "<file stem or path>"`) instead of images. Any adapter that
    consumes the same output kind and width can use them; others are refused."""
    from ..ipadapter.embeddings import save_embeddings

    unit = parse_unit(unit)
    if unit.embeddings or unit.face_embeddings is not None:
        raise RequestError("save_embeddings needs images, not embeddings")
    path = Path(path)
    inputs = unit_inputs(0, unit, state)
    planned = plan_unit(0, unit, state.store)
    if isinstance(planned, InstantIDUnitPlan):
        raise UnsupportedError(f"save_embeddings: {planned.label} is InstantID, whose IdentityNet also reads the face's "
                               f"keypoints, which saved embeddings do not carry; give InstantID units the face image")  # fmt: skip
    embeddings = planned.embed(state, inputs, events=[])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_embeddings(embeddings, path, planned.output, planned.encoder, [image_digest(i) for i in inputs.images],
                    planned.adapter.spec.face_embedding)  # fmt: skip
    log.info("embeddings of %d image(s) for %s saved to %s", len(inputs.images), planned.label, path)
    return path
