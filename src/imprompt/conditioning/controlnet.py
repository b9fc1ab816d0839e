"""ControlNet units: a ControlNet and its control image, beside the image prompts and the prompt.

The control image is made by a preprocessor from the user's picture, or sent finished.

diffusers runs ControlNets together with IP-Adapters for every family imprompt serves; imprompt builds that pipeline
over the resident model's own modules for the request (`controlnets/pipelines.py`), keeps the ControlNet models
loaded in their own byte budget keyed by file fingerprint (switching between them costs no load), and applies the
A1111 ControlNet extension's weight, window and control mode (`controlnets/guidance.py`). What imprompt adds to
diffusers: the model's family is checked against each ControlNet's from the tensors before anything loads, and a
preprocessor's weights are found (or refused, naming the file and the folders) at the same time.

Another kind may bring a ControlNet of its own (`fed`): InstantID's IdentityNet, whose control image (the face's
keypoints) and cross-attention input (the face tokens) its unit makes (`instantid.py`). It runs beside the
request's ControlNet units, in the same pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from PIL import Image

from ..errors import ImpromptError, IncompatibleError, LimitError, RequestError, UnsupportedError, renamed
from ..models.store import Entry
from ..request import ControlNetUnit, GenerateRequest
from . import Conditioning, Description, Preparation

log = logging.getLogger("imprompt")
DEFAULT_RESOLUTION = 512  # the extension's processor_res when a client leaves it out (-1)


def check_limits(request: GenerateRequest, limits) -> None:
    if len(request.controlnets) > limits.max_units:
        raise LimitError(f"controlnets: {len(request.controlnets)} units is more than the {limits.max_units} a request "
                         f"may have; send fewer (the server's --max-units sets the limit)")  # fmt: skip


def decode(request: GenerateRequest, state) -> list[Image.Image]:
    """Each unit's picture, decoded (and so checked) before anything else happens."""
    return [state.image(unit.image, f"controlnets.{i}.image") for i, unit in enumerate(request.controlnets)]


@dataclass
class PlannedUnit:
    index: int
    unit: ControlNetUnit
    entry: Entry
    preprocessor: object  # preprocess.Preprocessor
    weights: dict  # file name -> path of the preprocessor's weights
    union_index: int | None  # the control type a Union model is told (its index), None for other models
    image: Image.Image
    resolution: int | None  # the preprocessor's resolution (None: no preprocessor)

    @property
    def where(self) -> str:
        return f"controlnets.{self.index}"


def plan(request: GenerateRequest, model: Entry, state, images: list[Image.Image], width: int, height: int,
         fed: tuple = ()) -> ControlNets:  # fmt: skip
    """Every unit's model found and checked against the model's family, its preprocessor found with its weights,
    before anything loads. `fed`: ControlNets other kinds bring (planned and checked by their kind)."""
    if not request.controlnets:
        return ControlNets((), model.spec.pipeline_class, model.spec.architecture == "unet", fed=tuple(fed))
    from .. import preprocess  # OpenCV and ONNX Runtime, where a preprocessor needs them: imported where used

    units = []
    for i, (unit, image) in enumerate(zip(request.controlnets, images)):
        where = f"controlnets.{i}"
        try:
            entry = state.store.controlnet(unit.model)
            pre = preprocess.find(unit.module)
            weights = preprocess.locate_weights(pre, state.store.roots)
        except ImpromptError as exc:
            raise renamed(exc, f"{where}: {exc}") from None
        spec = entry.spec
        if spec.unsupported:
            raise UnsupportedError(f"{where}: {spec.unsupported}")
        problem = spec.mismatch(model.spec)
        if problem:
            raise IncompatibleError(f"{where}: {problem}")
        if unit.advanced_weighting is not None:  # one scale per residual: 12 down blocks and the middle one, or SDXL's 10
            residuals = 10 if model.spec.pipeline_class == "StableDiffusionXLPipeline" else 13
            if model.spec.architecture != "unet":
                raise UnsupportedError(f"{where}.advanced_weighting: per-residual scales are the A1111 extension's for "
                                       f"SD 1.5 / SDXL ControlNets, not {spec.family}'s; remove it")  # fmt: skip
            if len(unit.advanced_weighting) != residuals:
                raise RequestError(f"{where}.advanced_weighting: {len(unit.advanced_weighting)} scales, but a "
                                   f"{model.spec.family} ControlNet has {residuals} residuals; give {residuals}")  # fmt: skip
        if model.spec.architecture != "unet" and unit.control_mode != "Balanced":
            raise UnsupportedError(f"{where}.control_mode: {unit.control_mode!r} is the A1111 ControlNet extension's "
                                   f"rule for SD 1.5 / SDXL ControlNets; {entry.path.name} is a {spec.family} "
                                   f"ControlNet, which runs Balanced; remove control_mode")  # fmt: skip
        resolution = None
        if pre.name != "none":
            resolution = unit.processor_res or DEFAULT_RESOLUTION
            if unit.pixel_perfect:  # the resolution that maps the picture onto the output pixel for pixel
                resolution = preprocess.resize.pixel_perfect_resolution(image, width, height, unit.resize_mode)
        check_work(where, image.size, resolution, width, height, unit.resize_mode, state.limits.max_image_pixels)
        units.append(PlannedUnit(i, unit, entry, pre, weights, union_index(where, unit, spec, pre), image, resolution))
    for u in units:
        for other in fed:
            if u.entry.path == other.entry.path:
                raise RequestError(f"{u.where}.model: {u.entry.name} is the IdentityNet that {other.where} (InstantID) "
                                   f"runs with its face keypoints; remove this unit (the InstantID unit's "
                                   f"controlnet_scale sets its weight)")  # fmt: skip
    unions = {u.entry.spec.union for u in units} | ({False} if fed else set())
    if len(unions) > 1 and model.spec.architecture == "unet":
        raise UnsupportedError("controlnets: a ControlNet Union model with other ControlNets in one request is not "
                               "supported (diffusers runs Union models in their own pipeline); use Union models "
                               "for every unit, or none")  # fmt: skip
    if request.init_images and model.spec.architecture != "unet":
        raise UnsupportedError(f"controlnets: image-to-image with ControlNet is not supported for "
                               f"{model.spec.family} models; remove init_images")  # fmt: skip
    return ControlNets(tuple(units), model.spec.pipeline_class, model.spec.architecture == "unet", fed=tuple(fed))


def check_work(where: str, size: tuple[int, int], resolution: int | None, width: int, height: int, resize_mode: str,
               max_pixels: int) -> None:
    """A picture of an extreme shape makes a preprocessor's input (its short side scaled to the resolution) and the
    control image's resize (scaled to cover the output) far larger than the picture: both bounded by the pixels an
    image may have, before any work."""
    w, h = size
    if resolution is not None:
        k = resolution / min(w, h)
        w, h = round(w * k), round(h * k)
        if w * h > max_pixels:
            raise LimitError(f"{where}: a {size[0]}x{size[1]} picture at the preprocessor's resolution {resolution} is "
                             f"{w}x{h} pixels, more than the {max_pixels} an image may have; crop the picture or "
                             f"lower processor_res")  # fmt: skip
    if resize_mode == "Crop and Resize":
        k = max(width / w, height / h)
        if round(w * k) * round(h * k) > max_pixels:
            raise LimitError(f"{where}: its control image ({w}x{h}) scaled to cover {width}x{height} would be "
                             f"{round(w * k)}x{round(h * k)} pixels, more than the {max_pixels} an image may have; "
                             f"crop the picture, or use resize_mode \"Just Resize\" or \"Resize and Fill\"")  # fmt: skip


# The words clients use for a Union model's control types (the extension's control-type tags and its
# `union_control_type` names, SD.Next's modes), as the words of the models' own type lists (`models/specs.py`)
UNION_SYNONYMS = {"openpose": ("pose",), "pose": ("openpose",), "softedge": ("hed",), "scribble": ("scribble",),
                  "hardedge": ("canny",), "lineart": ("lineart",), "mlsd": ("mlsd",), "normalmap": ("normal",),
                  "segmentation": ("segment",), "inpaint": ("repaint",), "lq": ("low quality",)}  # fmt: skip


def union_index(where: str, unit: ControlNetUnit, spec, pre) -> int | None:
    """The control type a Union model is told: the unit's `union_type` (a name or an index), else the one its
    preprocessor's type names (SD.Next's `mode`, the extension's control type)."""
    if not spec.union:
        if unit.union_type is not None:
            raise RequestError(f"{where}.union_type: {spec.variant} {spec.path} is not a Union ControlNet and takes no "
                               f"control type; remove union_type")  # fmt: skip
        return None
    types = list(spec.control_types)
    wanted = unit.union_type
    if isinstance(wanted, int) or (isinstance(wanted, str) and wanted.isdigit()):
        index = int(wanted)
        if not 0 <= index < len(types):
            raise RequestError(f"{where}.union_type: {index} is not one of the {len(types)} control types of "
                               f"{spec.path} (0..{len(types) - 1}: {', '.join(types)})")  # fmt: skip
        return index
    names = [wanted.lower()] if wanted is not None else [tag.lower() for tag in pre.tags]
    for name in names:
        words = {name, *UNION_SYNONYMS.get(name.replace(" ", ""), ())}
        for index, label in enumerate(types):
            if words & {label.lower(), *label.lower().split("/")}:
                return index
    raise RequestError(f"{where}.union_type: {'the preprocessor ' + repr(pre.name) + ' names no' if wanted is None else repr(wanted) + ' is not a'} "
                       f"control type of the Union model {spec.path} ({', '.join(types)}); give union_type")  # fmt: skip


@dataclass
class ControlNets(Conditioning):
    kind = "controlnets"

    units: tuple[PlannedUnit, ...]
    pipeline_class: str
    unet_family: bool
    models: list = field(default_factory=list)  # the loaded ControlNet of each unit
    maps: list = field(default_factory=list)  # each unit's control image (the preprocessor's output), as made
    titles: list = field(default_factory=list)  # each unit's model as the extension lists it: "name [hash]"
    fed: tuple = ()  # ControlNets other kinds bring (InstantID's IdentityNet), after the units
    fed_models: list = field(default_factory=list)
    fed_maps: list = field(default_factory=list)

    def prepare(self, prep: Preparation) -> None:
        """Each ControlNet from the engine's cache (or loaded now), each control image made (or taken from the
        preprocessor cache)."""
        from .. import preprocess

        state = prep.state
        self.models, self.maps = [], []
        self.fed_models = [loaded_controlnet(state, f.entry, prep.loaded.dtype, prep.events, f.where) for f in self.fed]
        self.fed_maps = [f.control_map(state, prep.events) for f in self.fed]
        self.titles = [state.store.controlnet_title(u.entry) for u in self.units]  # as /controlnet/model_list has it
        for u in self.units:
            self.models.append(loaded_controlnet(state, u.entry, prep.loaded.dtype, prep.events, u.where))
            if u.preprocessor.name == "none":
                self.maps.append(u.image.convert("RGB"))
                continue
            started = time.perf_counter()
            a, b = (-1 if t is None else t for t in (u.unit.threshold_a, u.unit.threshold_b))  # -1: its default
            # a pixel-perfect resolution is used as computed (the extension sets it after checking the slider)
            try:
                self.maps.append(preprocess.detect(u.preprocessor, u.image, u.resolution, a, b, u.weights,
                                                   cache=state.detections, exact_resolution=u.unit.pixel_perfect))  # fmt: skip
            except ImpromptError as exc:  # a preprocessor's weights that do not load, named with the unit
                raise renamed(exc, f"{u.where}: {exc}") from None
            prep.events.append({"event": "control_detected", "unit": u.index, "module": u.preprocessor.name,
                                "seconds": round(time.perf_counter() - started, 4)})  # fmt: skip

    def apply(self, call) -> None:
        """The ControlNet twin of the call's pipeline, the control images at the call's size, and each model's
        forward patched for the units' weights, windows and modes (undone after the call)."""
        if not self.units and not self.fed:
            return
        from ..controlnets.guidance import ControlPatch, UnitGuidance
        from ..controlnets.pipelines import controlnet_pipeline
        from ..preprocess.resize import fit

        img2img = call.pipeline is not call.loaded.pipeline  # `init_image` chose the model's image-to-image twin
        union = any(u.entry.spec.union for u in self.units)
        # over the call's pipeline as the kinds before left it (its image-to-image twin, the request's VAE)
        call.pipeline = controlnet_pipeline(call.pipeline, self.pipeline_class, union, img2img,
                                            self.models + self.fed_models)  # fmt: skip
        images = [fit(m, call.width, call.height, u.unit.resize_mode) for u, m in zip(self.units, self.maps)]
        images += [f.fitted(m, call.width, call.height) for f, m in zip(self.fed, self.fed_maps)]
        many = len(images) > 1
        control = images if many else images[0]
        if union and self.unet_family:  # diffusers' SDXL Union pipelines: one image and mode per model, in lists
            call.kwargs["control_image"] = images
            call.kwargs["control_mode"] = [u.union_index for u in self.units]
        elif img2img or not self.unet_family:  # the img2img twins' `image` is the init image
            call.kwargs["control_image"] = control
        else:
            call.kwargs["image"] = control
        if not self.unet_family and any(u.union_index is not None for u in self.units):  # FLUX Union models
            call.kwargs["control_mode"] = [u.union_index for u in self.units] if many else self.units[0].union_index
        call.kwargs["controlnet_conditioning_scale"] = [1.0] * len(images) if many else 1.0  # applied by the patches
        guidance = [UnitGuidance(u.unit.weight, u.unit.start, u.unit.end, u.unit.control_mode,
                                 None if u.unit.advanced_weighting is None else tuple(u.unit.advanced_weighting))
                    for u in self.units]  # fmt: skip
        # a fed net reads its own unit's cross-attention input (two InstantID units: each its face tokens)
        guidance += [UnitGuidance(f.weight, f.start, f.end, "Balanced", hidden_states=f.hidden_states_for(call))
                     for f in self.fed]  # fmt: skip
        by_model: dict[int, list] = {}  # one patch per model, walking its units in the pipeline's order
        for g, model in zip(guidance, self.models + self.fed_models):
            by_model.setdefault(id(model), [model, []])[1].append(g)
        for model, units in by_model.values():
            patch = ControlPatch(model, units, self.unet_family, call.steps, lambda: call.conditioned_unet,
                                 lambda: call.pipeline.scheduler)  # fmt: skip
            call.after(patch.install())
            call.schedule.add(patch.at_step)

    def batch_part(self) -> tuple | None:
        """Requests without ControlNets batch; ControlNets run alone (not batched yet)."""
        return () if not self.units and not self.fed else None

    def describe(self, call) -> Description:
        units, infotext = [], {}
        for n, (u, shown) in enumerate(zip(self.units, self.titles)):
            unit = u.unit
            resolution = u.resolution
            units.append({"model": shown, "file": str(u.entry.path), "family": u.entry.spec.family,
                          "module": u.preprocessor.name, "weight": unit.weight, "start": unit.start, "end": unit.end,
                          "control_mode": unit.control_mode, "resize_mode": unit.resize_mode,
                          "processor_res": resolution, "threshold_a": unit.threshold_a, "threshold_b": unit.threshold_b,
                          "pixel_perfect": unit.pixel_perfect, "union_type": u.union_index,
                          "advanced_weighting": unit.advanced_weighting})  # fmt: skip
            infotext[f"ControlNet {n}"] = (
                f"Module: {u.preprocessor.name}, Model: {shown}, Weight: {unit.weight}, Resize Mode: {unit.resize_mode}, "
                f"Processor Res: {resolution or DEFAULT_RESOLUTION}, Threshold A: {unit.threshold_a}, Threshold B: "
                f"{unit.threshold_b}, Guidance Start: {unit.start}, Guidance End: {unit.end}, Pixel Perfect: "
                f"{unit.pixel_perfect}, Control Mode: {unit.control_mode}"
            )
        return Description(info={"controlnets": units}, infotext=infotext, images=list(self.maps))


def loaded_controlnet(state, entry: Entry, dtype, events: list, where: str):
    """The ControlNet model of `entry` on the engine's device in the model's `dtype`: from its cache, or loaded now
    (a load that fails names the unit and leaves the cache as it was)."""
    from ..loading.controlnets import load_controlnet
    from ..util.cache import module_bytes

    key = entry.key(dtype, state.device)
    model = state.controlnets.get(key)
    if model is not None:
        return model
    started = time.perf_counter()
    try:
        model = load_controlnet(entry.spec, dtype).to(state.device)
    except ImpromptError as exc:
        raise renamed(exc, f"{where}: {exc}") from None
    for old in state.controlnets.put(key, model, module_bytes(model), label=entry.name):
        log.info("ControlNet %s evicted from cache: ControlNet cache budget", old.label)
        events.append({"event": "controlnet_evicted", "controlnet": old.label, "why": "ControlNet cache budget"})
    seconds = time.perf_counter() - started
    log.info("ControlNet %s loaded in %.2f s (%s)", entry.name, seconds, where)
    events.append({"event": "controlnet_loaded", "controlnet": entry.name, "unit": where, "seconds": round(seconds, 4)})
    return model
