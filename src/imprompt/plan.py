"""Request -> checked plan: which pipeline, which adapter file per unit, and which encoder serves each unit.

Everything that can be wrong with a pairing is found here, from tensor shapes, before anything is loaded or
computed. `pick_encoder` is the one place where an encoder is chosen for an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import (
    ImpromptError,
    IncompatibleError,
    MissingEncoderError,
    RequestError,
    UnknownModelError,
    UnsupportedError,
)
from .ipadapter.block_weights import layer_weights
from .models import catalog
from .models.single_file import require_t5_tokenizer
from .models.store import Entry, ModelStore
from .prompting.syntax import BREAK as BREAK_MARK
from .prompting.syntax import parse_attention, scheduling_syntax, take_lora_tags
from .request import LORA_WEIGHT_RANGE, GenerateRequest, IPAdapterUnit


@dataclass(frozen=True)
class UnitPlan:
    index: int
    unit: IPAdapterUnit
    adapter: Entry
    encoder: Entry | None  # None when the unit brings saved embeddings
    why: str  # why this encoder (or these saved embeddings), in words
    layer_weights: tuple[float, ...] = ()  # one per cross-attention layer (InstantStyle), multiplied by scale
    embeddings: Entry | None = None  # saved embeddings used instead of images

    @property
    def output(self) -> str:
        return self.adapter.spec.consumes

    @property
    def faceid_version(self) -> str | None:
        """FaceID Plus v1 / v2 (the request's override, else what the file name says), Portrait "unnorm", or None."""
        return self.unit.faceid_version or self.adapter.spec.faceid_version

    @property
    def label(self) -> str:
        """How the unit is named to users: the friendly name if the file has one, else the file stem."""
        return catalog.friendly_name(self.adapter.name) or self.adapter.name


UNREAD_LORA_FORMATS = {"lycoris-loha": "LyCORIS LoHa", "lycoris-lokr": "LyCORIS LoKr"}


@dataclass(frozen=True)
class LoraPlan:
    entry: Entry
    weight: float
    source: str  # "prompt" (a <lora:...> tag) or "loras" (the request field)


@dataclass(frozen=True)
class Plan:
    pipeline: Entry
    units: tuple[UnitPlan, ...]
    prompt: str = ""  # what the text encoders read: the prompt without its <lora:...> tags
    negative_prompt: str = ""
    loras: tuple[LoraPlan, ...] = ()
    vae: Entry | None = None  # None: the model's own
    inversions: tuple[Entry, ...] = ()  # textual inversions that fit the model and whose names the prompts contain


def make_plan(request: GenerateRequest, store: ModelStore, default_model: str | None = None) -> Plan:
    model = request.model or default_model or _only_pipeline(store)
    pipeline = store.pipeline(model)
    check_runnable(pipeline)
    units = tuple(plan_unit(i, unit, store, pipeline) for i, unit in enumerate(request.ip_adapters))
    if pipeline.spec.architecture != "unet":
        return plan_transformer(request, pipeline, units, store)
    if request.true_cfg_scale != 1.0:
        raise RequestError(f"true_cfg_scale is FLUX's true classifier-free guidance; model {pipeline.name} is "
                           f"{pipeline.spec.family}, whose guidance is cfg_scale. Leave true_cfg_scale at 1")  # fmt: skip
    prompt, tags = take_lora_tags(request.prompt, "prompt")
    negative_prompt, negative_tags = take_lora_tags(request.negative_prompt, "negative_prompt")
    if negative_tags:
        raise RequestError(
            f"negative_prompt: <lora:{negative_tags[0].name}:...> — LoRA tags act only in the prompt (as in A1111); "
            f"move it to the prompt or remove it"
        )
    check_prompt_syntax(prompt, "prompt", composable=True)
    check_prompt_syntax(negative_prompt, "negative_prompt", composable=False)  # A1111 reads no AND there
    asked = [(tag.name, tag.weight, "prompt") for tag in tags] + [(lo.name, lo.weight, "loras") for lo in request.loras]
    loras = tuple(plan_lora(name, weight, source, store, pipeline) for name, weight, source in asked)
    seen: dict[str, LoraPlan] = {}
    for lora in loras:
        if lora.entry.path in seen:
            raise RequestError(
                f"LoRA {lora.entry.name} is asked for twice ({seen[lora.entry.path].source} and {lora.source}); "
                f"give it once, with the weight you want"
            )
        seen[lora.entry.path] = lora
    vae = store.vae(request.vae) if request.vae else None
    if vae is not None and vae.spec.latent_channels != 4:
        raise IncompatibleError(
            f"VAE {vae.path.name} has {vae.spec.latent_channels} latent channels ({vae.spec.family}), but model "
            f"{pipeline.name} ({pipeline.spec.family}) works on 4; choose an SD 1.x / 2.x / SDXL VAE"
        )
    texts = f"{prompt}\n{negative_prompt}".lower()
    inversions = tuple(e for e in store.current_of_kind("textual-inversion")
                       if e.spec.fits(pipeline.spec) and e.name.lower() in texts)  # fmt: skip
    return Plan(pipeline, units, prompt, negative_prompt, loras, vae, inversions)


def check_prompt_syntax(text: str, field: str, composable: bool) -> None:
    """A1111 prompt syntax that imprompt reads (weights, BREAK) must parse; what it does not compute yet (prompt
    editing, alternation, AND) is refused rather than read as words, which would give another picture."""
    parse_attention(text, field)
    found = scheduling_syntax(text, composable)
    if found:
        raise UnsupportedError(
            f"{field}: {found} is A1111 syntax computed per step (or per composable prompt), which imprompt does not "
            f"do yet; read as words it would give another picture than A1111's. Remove it, or write the prompt as it "
            f"should read throughout (escape literal brackets as \\[ \\])"
        )


TRANSFORMER_SAMPLERS = ("Default", "Euler")  # SD 3.5 and FLUX run their own flow-matching Euler scheduler


def plan_transformer(request: GenerateRequest, pipeline: Entry, units: tuple, store: ModelStore) -> Plan:
    """SD 3.5 and FLUX: what imprompt runs for them, and a refusal naming the field for what it does not (yet).
    Limits of diffusers that imprompt keeps, documented: SD 3.5 takes one IP-Adapter (its transformer holds one
    image projection), one image per unit (or averaged); FLUX's and SD3's attention processors take no masks."""
    family, name = pipeline.spec.family, pipeline.name

    def refuse(field: str, why: str):
        raise UnsupportedError(f"{field}: {why} for {family} models (model {name}); remove it")

    require_t5_tokenizer(pipeline.spec)  # a single file that holds T5 needs its tokenizer from elsewhere
    _, tags = take_lora_tags(request.prompt, "prompt")
    if tags or request.loras:
        refuse("loras" if request.loras else "prompt", "LoRAs are not supported yet")
    if take_lora_tags(request.negative_prompt, "negative_prompt")[1]:
        refuse("negative_prompt", "LoRA tags are not supported")
    for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if any(f is BREAK_MARK or f[1] != 1.0 for f in parse_attention(text, field)):
            raise UnsupportedError(
                f"{field}: A1111 attention weights ((word:1.2), [word]) and BREAK are not applied for {family} models "
                f"(model {name}), whose prompts go to their text encoders as written; remove them")
    if request.vae:
        refuse("vae", "another VAE than the model's own is not supported yet")
    if request.init_images:
        refuse("init_images", "image-to-image is not supported yet")
    if request.clip_skip != 1:
        refuse("clip_skip", "clip_skip is not supported")
    if request.sampler not in TRANSFORMER_SAMPLERS:
        refuse("sampler", f"{request.sampler!r}: these models run their own flow-matching Euler scheduler "
                          f"({' or '.join(TRANSFORMER_SAMPLERS)})")  # fmt: skip
    flux = pipeline.spec.architecture == "flux"
    if request.true_cfg_scale != 1.0 and not flux:
        refuse("true_cfg_scale", "true_cfg_scale is FLUX's; the guidance is cfg_scale")
    if not flux and len(units) > 1:
        raise UnsupportedError(
            f"ip_adapters: model {name} is {family}, whose transformer holds one IP-Adapter (as in diffusers' "
            f"SD3IPAdapterMixin); the request has {len(units)} units. Use one unit"
        )
    for unit in units:
        where, u = f"ip_adapters.{unit.index}", unit.unit
        if u.masks is not None:
            refuse(f"{where}.masks", "IP-Adapter masks are not supported (diffusers' SD3 and FLUX attention "
                                     "processors take none)")  # fmt: skip
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
    if flux and request.true_cfg_scale > 1.0 and not request.negative_prompt:
        raise RequestError("true_cfg_scale: FLUX's true CFG needs a negative_prompt (diffusers runs it only with "
                           "one); give one, or set true_cfg_scale to 1")  # fmt: skip
    return Plan(pipeline, units, request.prompt, request.negative_prompt)


def plan_lora(name: str, weight: float, source: str, store: ModelStore, pipeline: Entry) -> LoraPlan:
    """Resolve one LoRA and check it against the model, from its tensors, before anything is loaded."""
    low, high = LORA_WEIGHT_RANGE
    if not low <= weight <= high:
        raise RequestError(f"LoRA {name}: weight {weight} is outside {low}..{high}; use a weight in that range")
    entry = store.lora(name)
    if entry.spec.format in UNREAD_LORA_FORMATS:
        raise UnsupportedError(
            f"LoRA {entry.name} ({entry.path.name}) is a {UNREAD_LORA_FORMATS[entry.spec.format]} file: diffusers, "
            f"whose loader imprompt uses, reads kohya / A1111 LoRAs (LoCon included) and diffusers / PEFT LoRAs for "
            f"SD 1.5 and SDXL, not this format. Use a LoRA in one of those formats"
        )
    if not lora_fits(entry, pipeline):
        fitting = sorted(e.name for e in store.of_kind("lora") if lora_fits(e, pipeline))
        raise IncompatibleError(
            f"LoRA {entry.name} ({entry.path.name}) is for {entry.spec.family} models (cross-attention width "
            f"{entry.spec.width}), but model {pipeline.name} is {pipeline.spec.family} (width "
            f"{pipeline.spec.cross_attention_dim}). Use a LoRA made for {pipeline.spec.family} "
            f"({', '.join(fitting) or 'none in the models folder'})"
        )
    return LoraPlan(entry, weight, source)


def lora_fits(lora: Entry, pipeline: Entry) -> bool:
    """A LoRA fits a model whose cross-attention width is the one it was trained for (unknown: let diffusers try)."""
    return lora.spec.width is None or lora.spec.width == pipeline.spec.cross_attention_dim


def plan_unit(index: int, unit: IPAdapterUnit, store: ModelStore, pipeline: Entry | None = None) -> UnitPlan:
    """Resolve and check one unit. Without `pipeline` (saving embeddings) the UNet checks are skipped."""
    adapter = store.adapter(unit.adapter)
    weights: tuple[float, ...] = ()
    if pipeline is not None:
        check_fits(adapter, pipeline, store)
        weights = layer_weights(unit.layers, pipeline.spec, where=f"ip_adapters.{index}.layers")
    if adapter.spec.consumes == "faceid_embeds":
        return plan_faceid_unit(index, unit, adapter, store, weights)
    if unit.face_embeddings:
        name = catalog.friendly_name(adapter.name) or adapter.name
        raise IncompatibleError(
            f"ip_adapters.{index}: face_embeddings are for FaceID adapters, but IP-Adapter {name} consumes "
            f"{adapter.spec.needs}; give images, or choose a FaceID adapter"
        )
    if unit.embeddings:
        saved = store.embeddings(unit.embeddings)
        check_saved_embeddings(saved, adapter)
        why = f"saved embeddings {saved.name} ({saved.spec.gives} from {saved.spec.encoder})"
        return UnitPlan(index, unit, adapter, None, why, weights, saved)
    encoder, why = pick_encoder(adapter, store, unit.encoder)
    return UnitPlan(index, unit, adapter, encoder, why, weights)


def plan_faceid_unit(index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore, weights) -> UnitPlan:
    """FaceID: face embeddings come from the unit's images through InsightFace, from `face_embeddings`, or from
    saved embeddings. The Plus family also reads CLIP hidden states of the aligned face crop: its encoder is picked
    from the weights (`perceiver_resampler.proj_in` width) like any adapter's, and given face embeddings alone
    cannot serve it (they carry no crop)."""
    spec = adapter.spec
    name = catalog.friendly_name(adapter.name) or adapter.name
    where = f"ip_adapters.{index}"
    if unit.faceid_version and spec.variant != "faceid-plus":
        raise RequestError(
            f"{where}.faceid_version: {unit.faceid_version!r} is for FaceID Plus adapters (v1 / v2 files have the "
            f"same tensors), but {name} ({Path(spec.path).name}) is {spec.variant}; leave it unset"
        )
    if (unit.faceid_version or spec.faceid_version) != "v2" and unit.structure != 1.0:
        raise RequestError(
            f"{where}.structure: {unit.structure} acts only on FaceID Plus v2 (its face-structure shortcut), but "
            f"{name} ({Path(spec.path).name}) is {' '.join(filter(None, (spec.variant, unit.faceid_version or spec.faceid_version)))}; "
            f"leave it at 1"
        )
    if unit.negative_images is not None:
        raise RequestError(f"{where}.negative_images: FaceID's negative branch is a zero face embedding; remove them")
    if unit.encoder and spec.variant != "faceid-plus":
        raise RequestError(f"{where}.encoder: {name} reads InsightFace face embeddings, no image encoder; remove it")
    if unit.embeddings:
        saved = store.embeddings(unit.embeddings)
        check_saved_embeddings(saved, adapter)
        why = f"saved embeddings {saved.name} ({saved.spec.gives} from {saved.spec.encoder})"
        return UnitPlan(index, unit, adapter, None, why, weights, saved)
    if spec.variant == "faceid-plus" and unit.face_embeddings:
        raise IncompatibleError(
            f"{where}: IP-Adapter {name} ({Path(spec.path).name}) is FaceID Plus: besides the face embedding it reads "
            f"CLIP hidden states [{spec.clip_width}] of the aligned face crop, which face_embeddings do not carry. Give "
            f"images of the face (InsightFace finds and crops it), or embeddings saved with "
            f"`imprompt embed --adapter {name!r} FACE.jpg`"
        )
    if spec.variant != "faceid-plus":
        source = "face embeddings given" if unit.face_embeddings else "InsightFace face embeddings of the images"
        return UnitPlan(index, unit, adapter, None, f"{name} consumes {spec.needs}: {source} (no image encoder)", weights)
    encoder, why = pick_encoder(adapter, store, unit.encoder)
    return UnitPlan(index, unit, adapter, encoder, f"InsightFace face embeddings and, for the face crop, {why}", weights)


def check_runnable(pipeline: Entry) -> None:
    """Every reason a model cannot run (another pipeline class, an inpainting UNet, a single file of another type),
    read when it was probed and raised here, before anything (the current model included) is unloaded."""
    if pipeline.spec.unsupported:
        raise UnsupportedError(pipeline.spec.unsupported)


def check_saved_embeddings(saved: Entry, adapter: Entry) -> None:
    """Saved embeddings pair with an adapter exactly as an encoder would: same output kind, same width; FaceID Plus
    also needs the face crop's hidden states of its width, and Portrait unnorm the raw face embedding."""
    a, e = adapter.spec, saved.spec
    fits = (e.output, e.width) == (a.consumes, a.embed_dim)
    if fits and a.variant == "faceid-plus":
        fits = e.clip_width == a.clip_width
    if fits and a.consumes == "faceid_embeds":
        fits = e.face_embedding == a.face_embedding
    if not fits:
        name = catalog.friendly_name(adapter.name) or adapter.name
        wants = f" ({a.face_embedding})" if a.face_embedding else ""
        raise IncompatibleError(
            f"saved embeddings {saved.name} hold {e.gives} (from {e.encoder}), but IP-Adapter {name} consumes "
            f"{a.needs}{wants}. Save embeddings for this adapter with `imprompt embed --adapter {name!r} ...`"
        )


def _only_pipeline(store: ModelStore) -> str:
    pipelines = store.pipelines
    if len(pipelines) == 1:
        return pipelines[0].name
    names = ", ".join(p.name for p in pipelines) or "none"
    raise UnknownModelError(f"no model named in the request and {len(pipelines)} models in the store ({names}); name one")


def check_fits(adapter: Entry, pipeline: Entry, store: ModelStore | None = None) -> None:
    """The adapter's to_k_ip/to_v_ip must match the UNet's cross-attention layers: same input width (768 for
    SD 1.5, 2048 for SDXL) and the same output width per layer. With `store`, the error suggests what fits."""
    a, p = adapter.spec, pipeline.spec
    name = catalog.friendly_name(adapter.name) or adapter.name
    if _fits(adapter, pipeline):
        return
    if a.architecture != p.architecture or a.architecture != "unet":
        problem = (
            f"IP-Adapter {name} ({Path(a.path).name}) is for {a.family} models ({_layout(a)}), but model "
            f"{pipeline.name} is {p.family} ({_layout(p)})"
        )
    elif a.cross_attention_dim != p.cross_attention_dim:
        problem = (
            f"IP-Adapter {name} ({Path(a.path).name}) is for {a.family} UNets (cross-attention width "
            f"{a.cross_attention_dim}), but model {pipeline.name} is {p.family} (cross-attention width "
            f"{p.cross_attention_dim})"
        )
    else:
        problem = (
            f"IP-Adapter {name} ({Path(a.path).name}) has {len(a.layer_widths)} cross-attention layers of widths "
            f"{_compact(a.layer_widths)}, but model {pipeline.name}'s UNet has {len(p.layer_widths)} of widths "
            f"{_compact(p.layer_widths)}: it was trained for another UNet"
        )
    fix = f"Use an adapter made for {pipeline.name}"
    if store is not None:
        fitting = [catalog.friendly_name(e.name) or e.name for e in store.adapters if _fits(e, pipeline)]
        models = [m.name for m in store.pipelines if _fits(adapter, m)]
        fix += f" ({', '.join(fitting) or 'none in the models folder'})"
        fix += f", or a model that {name} fits ({', '.join(models) or 'none in the models folder'})"
    raise IncompatibleError(f"{problem}. {fix}")


def _layout(spec) -> str:
    """What a family's IP-Adapters attach to and how wide, in words."""
    blocks = len(spec.layer_widths)
    if spec.architecture == "sd3":
        return f"{blocks} joint blocks of width {spec.cross_attention_dim}"
    if spec.architecture == "flux":
        return f"{blocks} double-stream blocks of width {spec.layer_widths[0]}, image tokens of width {spec.cross_attention_dim}"
    return f"cross-attention width {spec.cross_attention_dim}"


def pick_encoder(adapter: Entry, store: ModelStore, requested: str | None = None) -> tuple[Entry, str]:
    """The encoder whose output (kind and width) the adapter's tensors consume, and why it was chosen.

    Among several that fit: an encoder beside the adapter (h94 layout: `models/image_encoder` next to
    `models/*.safetensors`), then a published architecture over a custom one, then the shortest path."""
    spec = adapter.spec
    name = catalog.friendly_name(adapter.name) or adapter.name
    output, width = (("hidden_states", spec.clip_width) if spec.variant == "faceid-plus"  # its face crop's encoder
                     else (spec.consumes, spec.embed_dim))  # fmt: skip
    tower = spec.encoder_type if spec.variant != "faceid-plus" else "clip"
    needs = f"{'siglip ' if tower == 'siglip' else ''}{output}[{width}]"
    if output == "faceid_embeds":
        raise MissingEncoderError(
            f"IP-Adapter {name} ({Path(spec.path).name}) consumes {needs} InsightFace face embeddings, which no CLIP "
            f"image encoder produces; give images (InsightFace reads the face) or face_embeddings"
        )
    if requested:
        encoder = store.encoder(requested)
        if encoder.spec.produces(output, tower) != width:
            raise IncompatibleError(
                f"encoder {encoder.name} gives {encoder.spec.outputs}, but IP-Adapter {name} consumes "
                f"{needs}. Leave the encoder unset and imprompt picks the right one"
            )
        return encoder, f"{name} consumes {needs}; encoder chosen in the request"
    for attempt in range(2):  # on a miss, scan the folders again: an encoder may have been added or restored
        encoders = store.current_of_kind("image-encoder")
        candidates = [e for e in encoders if e.spec.produces(output, tower) == width]
        if candidates or attempt:
            break
        store.refresh_if_stale()
    if not candidates:
        family = catalog.family_by_output(output, width, tower)
        usual = f" ({family.name}: {' or '.join(family.usual_files)})" if family else ""
        present = ", ".join(f"{e.name} gives {e.spec.outputs}" for e in encoders) or "none"
        unreadable = "".join(f" Unreadable, perhaps the one: {e.error}." for e in store.current_of_kind("unreadable")[:3])
        raise MissingEncoderError(
            f"IP-Adapter {name} ({Path(spec.path).name}) consumes {needs}, and no image encoder in the "
            f"models folder produces it. Encoders present: {present}.{unreadable} Add the encoder it was trained "
            f"with{usual} to DIR/clip_vision/"
        )
    beside = Path(spec.path).parent / "image_encoder"
    candidates.sort(
        key=lambda e: (e.path != beside, e.spec.architecture == "custom", len(e.path.parts), str(e.path))
    )
    chosen = candidates[0]
    if len(candidates) == 1:
        why = f"{name} consumes {needs}; {chosen.name} is the encoder that produces it"
    else:
        reason = "it sits beside the adapter" if chosen.path == beside else "first of them by architecture and path"
        why = f"{name} consumes {needs}; {len(candidates)} encoders produce it, chose {chosen.name} ({reason})"
    return chosen, why


def _compact(widths) -> str:
    widths = list(widths)
    return str(widths) if len(widths) <= 6 else f"[{', '.join(map(str, widths[:3]))}, ..., {widths[-1]}]"


OTHER_KINDS = ("lora", "vae", "textual-inversion", "controlnet", "t2i-adapter", "upscaler", "face-restorer",
               "text-encoder", "diffusion-model", "image-encoder-other", "ip-embeddings", "unknown")  # fmt: skip


def describe_store(store: ModelStore) -> dict:
    """Everything in the store, each file as what its tensors say it is; for each adapter the encoder it needs,
    whether one is present, and which of the store's models it fits (the same checks a request goes through)."""
    store.read_all()
    adapters = []
    for entry in store.adapters:
        spec = entry.spec
        family = catalog.family_by_output(spec.consumes, spec.embed_dim, spec.encoder_type)
        item = {"name": entry.name, "friendly_name": catalog.friendly_name(entry.name), **spec.to_dict()}
        item["needs"] = spec.needs + (f" ({family.name})" if family else "")
        try:
            if spec.consumes == "faceid_embeds" and not spec.clip_width:  # InsightFace, or face_embeddings given
                item.update(encoder="InsightFace", encoder_present=True)
            else:
                encoder, _ = pick_encoder(entry, store)
                faceid = "InsightFace + " if spec.clip_width else ""
                item.update(encoder=f"{faceid}{encoder.name}", encoder_present=True)
        except ImpromptError as exc:
            item.update(encoder=None, encoder_present=False, encoder_problem=str(exc))
        item["fits_models"] = [p.name for p in store.pipelines if _fits(entry, p)]
        adapters.append(item)
    return {
        "models": [
            {"name": m.name, **m.spec.to_dict(), "adapters": [a["friendly_name"] or a["name"] for a in adapters
                                                              if m.name in a["fits_models"]]}
            for m in store.pipelines
        ],  # fmt: skip
        "adapters": adapters,
        "encoders": [{"name": e.name, **e.spec.to_dict(), "outputs": e.spec.outputs} for e in store.encoders],
        "other": {kind: [{"name": e.name, **e.spec.to_dict()} for e in store.of_kind(kind)] for kind in OTHER_KINDS},
        "unreadable": [{"name": e.name, "path": str(e.path), "error": str(e.error)} for e in store.unreadable],
    }


def _fits(adapter: Entry, pipeline: Entry) -> bool:
    a, p = adapter.spec, pipeline.spec
    return (a.architecture == p.architecture and a.cross_attention_dim == p.cross_attention_dim
            and tuple(a.layer_widths) == tuple(p.layer_widths))  # fmt: skip
