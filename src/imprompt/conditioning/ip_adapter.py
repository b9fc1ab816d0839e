"""An IP-Adapter unit: its adapter file, the encoder its weights need, and its images made into embeddings.

The unit's reference images (or saved embeddings) become the embeddings the adapter consumes.

Everything that can be wrong with a pairing is found here, from tensor shapes, before anything is loaded or
computed. `pick_encoder` is the one place where an encoder is chosen for an adapter (FaceID Plus's face-crop
encoder included). A unit is one member of the request's image prompts (`image_prompts.py`), which attaches them
together; a FaceID unit (`faceid.py`) is this unit with faces for images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import IncompatibleError, MissingEncoderError, RequestError
from ..ipadapter.block_weights import layer_weights
from ..models import catalog
from ..models.store import Entry, ModelStore
from ..request import IPAdapterUnit

if TYPE_CHECKING:  # torch-heavy modules are imported where used: planning stays light (no torch)
    from ..ipadapter.embeddings import UnitEmbeddings


@dataclass
class UnitInputs:
    """Every image a unit brings, decoded (and so checked) before anything else happens."""

    images: list
    negatives: list | None
    masks: list | None


@dataclass(frozen=True)
class UnitPlan:
    index: int
    unit: IPAdapterUnit
    adapter: Entry
    encoder: Entry | None  # None when the unit brings saved embeddings (or FaceID reads faces alone)
    why: str  # why this encoder (or these saved embeddings), in words
    layer_weights: tuple[float, ...] = ()  # one per attention layer or block (InstantStyle), multiplied by scale
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

    def embed(self, state, inputs: UnitInputs, events: list, true_cfg: bool = True) -> UnitEmbeddings:
        """The unit's embeddings: saved ones read from their file, else `encode`d. `true_cfg`: FLUX's negative
        branch is used (saved embeddings keep it, for later)."""
        from ..ipadapter.embeddings import load_saved_embeddings

        if self.embeddings is not None:
            return load_saved_embeddings(self.embeddings, state.device, state.encoder_dtype, self.unit.average)
        return self.encode(state, inputs, events, true_cfg)

    def encode(self, state, inputs: UnitInputs, events: list, true_cfg: bool) -> UnitEmbeddings:
        """The images through the encoder the plan picked, with the engine's encoder and embedding caches."""
        from ..ipadapter.embeddings import unconditional

        return state.embedder.embed(
            self.encoder, self.output, inputs.images, self.label, self.why, events, inputs.negatives,
            self.unit.average, unconditional(self.adapter.spec, true_cfg),
        )

    def lora_use(self, unet):
        """The LoRA its adapter file embeds, acting while the unit is in the request (FaceID's): None here."""
        return None

    def face_crop(self, embeddings: UnitEmbeddings, cfg: bool, device, dtype):
        """What the FaceID Plus projection reads beside the face embedding (`attach.set_face_crops`): none here."""
        return (None, False, 1.0)

    def served_by(self, faces) -> tuple:
        """The encoder that made the embeddings: its name, file and architecture (`faces`: the engine's face
        analyser, for FaceID's)."""
        if self.encoder is not None:
            return self.encoder.name, str(self.encoder.path), self.encoder.spec.architecture
        saved = self.embeddings.spec  # saved embeddings: the encoder they came from, as recorded in the file
        return saved.encoder, saved.path, saved.encoder_architecture

    def describe(self, faces, embeddings: UnitEmbeddings, active_steps: list[int]) -> dict:
        """The unit's part of `info["ip_adapters"]`: what served it, and how."""
        a = self.adapter.spec
        encoder, encoder_file, architecture = self.served_by(faces)
        return {
            "adapter": self.label,
            "file": str(a.path),
            "variant": a.variant,
            "consumes": a.consumes,
            "embed_dim": a.embed_dim,
            "tokens": a.tokens,
            "encoder": encoder,
            "encoder_file": encoder_file,
            "encoder_architecture": architecture,
            "encoder_source": embeddings.encoder_source,
            "encoder_why": self.why,
            "embeddings": embeddings.embeddings,
            "images": len(embeddings.embeddings),
            "scale": self.unit.scale,
            "start": self.unit.start,
            "end": self.unit.end,
            "active_steps": active_steps,
            "masked": self.unit.masks is not None,
            "averaged": self.unit.average,
            "layers": self.unit.layers,
        }


def plan_image_unit(index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore, weights: tuple) -> UnitPlan:
    """An image unit (not FaceID): its encoder picked from the adapter's weights, or its saved embeddings checked."""
    name = catalog.friendly_name(adapter.name) or adapter.name
    if unit.face_embeddings:
        raise IncompatibleError(
            f"ip_adapters.{index}: face_embeddings are for FaceID adapters, but IP-Adapter {name} consumes "
            f"{adapter.spec.needs}; give images, or choose a FaceID adapter"
        )
    for field_name, given in (("structure", unit.structure != 1.0), ("faceid_version", unit.faceid_version)):
        if given:  # FaceID Plus's; they would change nothing here, and nothing a client sends is dropped unsaid
            raise RequestError(f"ip_adapters.{index}.{field_name}: acts on FaceID Plus adapters only, but {name} is "
                               f"{adapter.spec.variant}; leave it out")  # fmt: skip
    if unit.embeddings:
        return plan_saved(UnitPlan, index, unit, adapter, store, weights)
    encoder, why = pick_encoder(adapter, store, unit.encoder)
    return UnitPlan(index, unit, adapter, encoder, why, weights)


def plan_saved(kind: type, index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore, weights: tuple):
    """A unit (of `kind`) that brings saved embeddings instead of images: they pair like an encoder would."""
    saved = store.embeddings(unit.embeddings)
    check_saved_embeddings(saved, adapter)
    why = f"saved embeddings {saved.name} ({saved.spec.gives} from {saved.spec.encoder})"
    return kind(index, unit, adapter, None, why, weights, saved)


def unit_weights(index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore, pipeline: Entry | None) -> tuple:
    """The adapter checked against the model (without one, saving embeddings, nothing to check) and the unit's
    per-layer weights for it."""
    if pipeline is None:
        return ()
    check_fits(adapter, pipeline, store)
    return layer_weights(unit.layers, pipeline.spec, where=f"ip_adapters.{index}.layers")


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


def check_fits(adapter: Entry, pipeline: Entry, store: ModelStore | None = None) -> None:
    """The adapter's to_k_ip/to_v_ip must match the UNet's cross-attention layers: same input width (768 for
    SD 1.5, 2048 for SDXL) and the same output width per layer. With `store`, the error suggests what fits."""
    a, p = adapter.spec, pipeline.spec
    name = catalog.friendly_name(adapter.name) or adapter.name
    if fits(adapter, pipeline):
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
        fitting = [catalog.friendly_name(e.name) or e.name for e in store.adapters if fits(e, pipeline)]
        models = [m.name for m in store.pipelines if fits(adapter, m)]
        fix += f" ({', '.join(fitting) or 'none in the models folder'})"
        fix += f", or a model that {name} fits ({', '.join(models) or 'none in the models folder'})"
    raise IncompatibleError(f"{problem}. {fix}")


def fits(adapter: Entry, pipeline: Entry) -> bool:
    a, p = adapter.spec, pipeline.spec
    if a.variant == "pulid-sdxl":  # PuLID v1.1: ID projections on every cross-attention of an SDXL UNet
        return p.architecture == "unet" and tuple(a.layer_widths) == tuple(p.layer_widths)
    if a.variant == "pulid":  # PuLID FLUX: CAs reading FLUX's hidden width after its double blocks
        cas = -(-len(p.layer_widths) // 2) + -(-p.single_blocks // 4)  # PuLID's num_ca
        return (p.architecture == "flux" and p.layer_widths[:1] == (a.cross_attention_dim,)
                and p.single_blocks > 0 and cas == len(a.layer_widths))  # single blocks unknown (0): refused, not guessed
    if a.variant == "redux":  # no blocks: its tokens join T5's (`redux.py`), so any FLUX model with T5 that wide
        return p.architecture == "flux" and a.cross_attention_dim == p.cross_attention_dim
    return (a.architecture == p.architecture and a.cross_attention_dim == p.cross_attention_dim
            and tuple(a.layer_widths) == tuple(p.layer_widths))  # fmt: skip


def _layout(spec) -> str:
    """What a family's IP-Adapters attach to and how wide, in words."""
    blocks = len(spec.layer_widths)
    if spec.architecture == "sd3":
        return f"{blocks} joint blocks of width {spec.cross_attention_dim}"
    if spec.architecture == "flux":
        return f"{blocks} double-stream blocks of width {spec.layer_widths[0]}, image tokens of width {spec.cross_attention_dim}"
    return f"cross-attention width {spec.cross_attention_dim}"


def _compact(widths) -> str:
    widths = list(widths)
    return str(widths) if len(widths) <= 6 else f"[{', '.join(map(str, widths[:3]))}, ..., {widths[-1]}]"


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
