"""Request -> checked plan: the model, the call's size and sampler, and each conditioning, refused before compute.

The conditionings are planned in the order they apply (`conditioning/`): every refusal a request can meet is made
here, from the request and the files' tensor tables, before anything is loaded or computed.

A kind of conditioning plans itself (its module's `plan`); this module decodes the images first, resolves the
model, decides what the call shares (size, sampler), and lists the kinds in their order. Adding a kind adds its
module and one line here; the engine does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from .conditioning import controlnet, image_prompts, init_image, instantid, loras, prompt, pulid, vae
from .conditioning.image_prompts import ImagePrompts
from .conditioning.ip_adapter import fits, pick_encoder
from .conditioning.prompt import A1111Prompt
from .errors import ImpromptError, RequestError, UnknownModelError, UnsupportedError
from .models import catalog
from .models import parts as model_parts
from .models.single_file import require_t5_tokenizer
from .models.store import Entry, ModelStore
from .request import GenerateRequest
from .util.samplers import canonical_sampler

TRANSFORMER_SAMPLERS = ("Default", "Euler")  # SD 3.5 and FLUX run their own flow-matching Euler scheduler


@dataclass(frozen=True)
class Plan:
    pipeline: Entry  # the model
    parts: model_parts.ModelParts  # a transformer alone: the VAE and text encoders it runs with
    conditionings: tuple  # in the order they apply (see `conditioning/__init__.py`)
    sampler: str
    width: int
    height: int

    @property
    def units(self) -> tuple:
        """The image prompts' units (a cluster routes their encoders to encoder workers)."""
        return next((c.units for c in self.conditionings if isinstance(c, ImagePrompts)), ())


def make_plan(request: GenerateRequest, state) -> Plan:
    """Every image decoded (so checked) first, then names, pairings and what each family runs."""
    sampler = canonical_sampler(request.sampler)
    inputs = image_prompts.decode_inputs(request, state)
    start = init_image.decode(request, state)
    control_images = controlnet.decode(request, state)
    model = state.store.pipeline(request.model or state.default_model or _only_pipeline(state.store))
    check_runnable(model)
    parts = plan_parts(request, model, state.store)
    if model.spec.architecture != "unet" and not model.spec.parts:
        require_t5_tokenizer(model.spec)  # a single file that holds T5 needs its tokenizer from elsewhere
    width, height = size(request, model, start)
    images = image_prompts.plan(request, model, state, inputs, width, height)
    lora_set = loras.plan(request, model, state.store)
    text = prompt.plan(request, model, state.store)
    check_composable_with_images(text, images, request)
    decoder = vae.plan(request, model, state.store)
    start_image = init_image.plan(request, model, start)
    controls = controlnet.plan(request, model, state, control_images, width, height, images.identity_nets)
    if model.spec.architecture != "unet":
        sampler = transformer_sampler(sampler, model)
    return Plan(model, parts, (start_image, images, lora_set, decoder, text, controls), sampler, width, height)


def plan_parts(request: GenerateRequest, model: Entry, store: ModelStore) -> model_parts.ModelParts:
    """A transformer alone (ComfyUI's split layout) runs with a VAE and text encoders from other files: named in the
    request or found in the models folders (`models/parts.py`). Other models hold their own."""
    if model.spec.parts:
        return model_parts.choose_parts(model, store, request.vae, list(request.text_encoders))
    if request.text_encoders:
        raise RequestError(f"text_encoders: model {model.name} holds its own text encoders (a diffusers folder or an "
                           f"all-in-one file); only a transformer alone (ComfyUI's diffusion_models/) takes them from "
                           f"other files. Remove text_encoders")  # fmt: skip
    return model_parts.NO_PARTS


def check_limits(request: GenerateRequest, limits) -> None:
    """How many units and images a request may bring, checked before any image is decoded (the server calls this
    before it queues a job)."""
    image_prompts.check_limits(request, limits)
    controlnet.check_limits(request, limits)


def check_composable_with_images(text, images, request: GenerateRequest) -> None:
    """Where two kinds meet: a composable prompt (AND, or a part's weight) runs the negative and each part as rows
    of one UNet batch, and the image prompts' embeddings follow the pipeline's rows. A FaceID Plus unit's face
    crops are batched for the pipeline's one prompt row, and without guidance (cfg_scale <= 1) the pipeline makes no
    negative image embeddings for the negative's row: both refused, rather than read wrong."""
    parts = text.parts if isinstance(text, A1111Prompt) else []
    if not (len(parts) > 1 or any(weight != 1.0 for _, weight in parts)):
        return
    for unit in images.units:
        if unit.output == "faceid_embeds" and unit.adapter.spec.clip_width:
            raise UnsupportedError(f"prompt: AND (or a part's weight) is not supported with FaceID Plus units "
                                   f"(ip_adapters.{unit.index}, {unit.label}); write one prompt, or use another "
                                   f"FaceID adapter")  # fmt: skip
    if images.units and request.cfg_scale <= 1.0:
        raise UnsupportedError("prompt: AND (or a part's weight) with image prompts needs classifier-free guidance "
                               "(cfg_scale above 1), which makes the negative image embeddings its negative reads; "
                               "raise cfg_scale or write one prompt")  # fmt: skip


def transformer_sampler(sampler: str, model: Entry) -> str:
    """SD 3.5 and FLUX run their own scheduler: "Default" (or "Euler", which it is) and nothing else."""
    if sampler not in TRANSFORMER_SAMPLERS:
        raise UnsupportedError(f"sampler: {sampler!r}: these models run their own flow-matching Euler scheduler "
                               f"({' or '.join(TRANSFORMER_SAMPLERS)}) for {model.spec.family} models (model "
                               f"{model.name}); remove it")  # fmt: skip
    return "Default"


def size(request: GenerateRequest, model: Entry, start) -> tuple[int, int]:
    """Requested size; else the init image's size (to a multiple of 8); else the model's native size."""
    if start is not None:
        default_w, default_h = (max(64, d - d % 8) for d in start.size)
    else:
        default_w = default_h = model.spec.default_size
    return request.width or default_w, request.height or default_h


def check_runnable(pipeline: Entry) -> None:
    """Every reason a model cannot run (another pipeline class, an inpainting UNet, a single file of another type),
    read when it was probed and raised here, before anything (the current model included) is unloaded."""
    if pipeline.spec.unsupported:
        raise UnsupportedError(pipeline.spec.unsupported)


def _only_pipeline(store: ModelStore) -> str:
    pipelines = store.pipelines
    if len(pipelines) == 1:
        return pipelines[0].name
    names = ", ".join(p.name for p in pipelines) or "none"
    raise UnknownModelError(f"no model named in the request and {len(pipelines)} models in the store ({names}); name one")


def lora_models(entry: Entry, store: ModelStore) -> dict:
    """For a LoRA, the models it fits by the plan's own check (family and width from tensors); {} for other kinds."""
    if entry.kind != "lora":
        return {}
    return {"fits_models": [p.name for p in store.pipelines if not p.spec.unsupported and loras.lora_fits(entry, p)]}


OTHER_KINDS = ("lora", "vae", "textual-inversion", "t2i-adapter", "upscaler", "face-restorer",
               "text-encoder", "diffusion-model", "image-encoder-other", "ip-embeddings", "unknown")  # fmt: skip


def describe_store(store: ModelStore) -> dict:
    """Everything in the store, each file as what its tensors say it is; for each adapter the encoder it needs,
    whether one is present, and which of the store's models it fits (the same checks a request goes through); for
    each ControlNet the models it fits."""
    store.read_all()
    adapters = []
    for entry in store.adapters:
        spec = entry.spec
        family = catalog.family_by_output(spec.consumes, spec.embed_dim, spec.encoder_type)
        # InstantX ships InstantID as `ip-adapter.bin`: its tensors name it where its stem cannot
        friendly = catalog.friendly_name(entry.name) or ("InstantID" if spec.variant == "instantid" else None)
        item = {"name": entry.name, "friendly_name": friendly, **spec.to_dict()}
        item["needs"] = spec.needs + (f" ({family.name})" if family else "")
        try:
            if spec.variant == "instantid":  # InsightFace antelopev2 + its IdentityNet ControlNet
                item.update(instantid.listing(entry, store))
            elif spec.variant.startswith("pulid"):  # InsightFace antelopev2 + an EVA02-CLIP tower
                item.update(pulid.listing(entry, store))
            elif spec.consumes == "faceid_embeds" and not spec.clip_width:  # InsightFace, or face_embeddings given
                item.update(encoder="InsightFace", encoder_present=True)
            else:
                encoder, _ = pick_encoder(entry, store)
                faceid = "InsightFace + " if spec.clip_width else ""
                item.update(encoder=f"{faceid}{encoder.name}", encoder_present=True)
        except ImpromptError as exc:
            item.update(encoder=None, encoder_present=False, encoder_problem=str(exc))
        item["fits_models"] = [p.name for p in store.pipelines if fits(entry, p)]
        adapters.append(item)
    controlnets = []
    for entry in store.of_kind("controlnet"):
        spec = entry.spec
        fits_models = [p.name for p in store.pipelines if not spec.unsupported and spec.mismatch(p.spec) is None]
        controlnets.append({"name": entry.name, **spec.to_dict(), "fits_models": fits_models})

    def parts(model: Entry) -> dict:
        """A transformer alone: the files it would run with now (role -> name and why), or why it cannot."""
        if not model.spec.parts or model.spec.unsupported:
            return {}
        try:
            return {"model_parts": model_parts.choose_parts(model, store, None, []).describe()}
        except ImpromptError as exc:
            return {"parts_problem": str(exc)}

    return {
        "models": [
            {"name": m.name, **m.spec.to_dict(), "adapters": [a["friendly_name"] or a["name"] for a in adapters
                                                              if m.name in a["fits_models"]],
             "controlnets": [c["name"] for c in controlnets if m.name in c["fits_models"]], **parts(m)}
            for m in store.pipelines
        ],  # fmt: skip
        "controlnets": controlnets,
        "adapters": adapters,
        "encoders": [{"name": e.name, **e.spec.to_dict(), "outputs": e.spec.outputs} for e in store.encoders],
        "other": {kind: [{"name": e.name, **e.spec.to_dict(), **lora_models(e, store)} for e in store.of_kind(kind)]
                  for kind in OTHER_KINDS},  # fmt: skip
        "unreadable": [{"name": e.name, "path": str(e.path), "error": str(e.error)} for e in store.unreadable],
    }
