"""A PuLID unit: a face made into ID tokens that FLUX's blocks (v0.9.x) or SDXL's cross-attentions (v1.1) read.

What it reads, as PuLID's `get_id_embedding` does (ToTheBeginning/PuLID, `pulid/pipeline_flux.py`):
- the image, its long edge resized to at most 1024 (OpenCV's Lanczos, sizes floored); InsightFace's `antelopev2`
  pack, the face of largest box, its raw (not normed) 512-d `embedding`;
- facexlib's RetinaFace (`ipadapter/retinaface.py`, `detection_Resnet50_Final.pth`): the face nearest the image's
  centre, its five landmarks, the face aligned on them to facexlib's FFHQ template at 512 px; where antelopev2 found
  no face, the embedding is antelopev2's glintr100 on that aligned crop, as PuLID's fallback;
- facexlib's BiSeNet (`ipadapter/face_parsing.py`, `parsing_bisenet.pth`) parses the crop: background, hat, ears,
  earrings, neck, necklace and cloth white, the rest gray; resized to the EVA tower's 336 and normalised with
  OpenAI's mean and std, through EVA02-CLIP-L-14-336 (`ipadapter/eva_clip.py`): its L2-normed cls output and the
  inputs of its blocks 4, 8, 12, 16, 20;
- the IDFormer makes 32 ID tokens of that, and 32 "uncond" tokens of zeros (`ipadapter/pulid.py`).
facexlib's two files are looked for where users keep them (`ipadapter/facexlib_files.py`), and for a face image
InsightFace and its antelopev2 pack, in the plan, before anything loads. A client may instead give the embedding (`face_embeddings`, one of 512 floats) and the aligned
crop (`aligned_face`), which are used as given (the crop still parsed, so only the parser's file is needed).

Parameters: `scale` is PuLID's `id_weight` (ComfyUI's ApplyPulidFlux `weight`; SD.Next's Strength); `start_step`
PuLID's integer start step, or else `start` / `end` as fractions of the steps (ComfyUI's `start_at` / `end_at`,
applied to step indices as every imprompt unit is). Under FLUX's true CFG (`true_cfg_scale` > 1 with a negative
prompt) the negative pass reads the uncond tokens, as PuLID's sampler does (diffusers runs true CFG at every step;
PuLID's from its step 1). One PuLID unit per request, one face (PuLID's FLUX code reads one image; v1.1's takes
up to four, which imprompt does not yet).

SDXL v1.1 (`pulid_v1.1.safetensors`, PuLID's `pipeline_v1_1.py` and `IDAttnProcessor2_0`): the same ID tokens, read
by every cross-attention through the file's `id_to_k` / `id_to_v` beside the text (`num_zero` zero tokens appended:
SD.Next's Zero, default 20; `ortho` "off" / "v1" / "v2": SD.Next's Ortho, default v2), the negative row reading the
uncond tokens; `scale` is PuLID's `id_scale` (SD.Next's Strength). It takes the UNet's cross-attention processors
for the call, so it runs without IP-Adapter units beside it. Its EVA tower, IDFormer and ID projections run in
float32 whatever the UNet's dtype, as PuLID's v1.1 code runs them (SD.Next's runs EVA in float16); the ID keys and
values are cast to the UNet's dtype in the attention (`id_dtype`). FLUX's run in the transformer's dtype, as PuLID's.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, IncompatibleError, MissingEncoderError, RequestError, UnsupportedError
from ..models import catalog
from ..models.store import Entry, ModelStore, fingerprint_of
from ..request import IPAdapterUnit
from .ip_adapter import UnitInputs, UnitPlan, fits

log = logging.getLogger("imprompt")

FACE_PACK = "antelopev2"  # the pack PuLID was trained with (ipadapter/faces.ANTELOPE_PACK)
SDXL_NUM_ZERO, SDXL_ORTHO = 20, "v2"  # PuLID v1.1's app defaults (and SD.Next's Zero / Ortho)
MAX_SIDE = 1024  # PuLID resizes the image's long edge to at most this before finding the face


def is_pulid(entry: Entry) -> bool:
    return entry.spec.variant in ("pulid", "pulid-sdxl")


EVA_LAST_HIDDEN = 20  # PuLID reads the inputs of blocks 4..20 (`ipadapter/eva_clip.HIDDEN_LAYERS`): 21 blocks at least
EVA_L = (1024, 768, 336)  # EVA02-CLIP-L-14-336's width, cls width and image size: the tower PuLID was trained on


def eva_mismatch(encoder: Entry) -> str | None:
    """Why an EVA tower of the right widths still is not one PuLID reads, or None. Its depth must reach the hidden
    states PuLID reads; a tower of EVA02-L's widths must be PuLID's L-14-336: EVA02-CLIP-L-14 at 224 px
    (EVA02_CLIP_L_psz14_s4B) is another model, whose features the IDFormer was not trained on. Towers of other
    widths (only made for tests: no released PuLID file reads them) are held to the depth alone."""
    e = encoder.spec
    if e.num_layers <= EVA_LAST_HIDDEN:
        return f"{e.num_layers} blocks, and PuLID reads the inputs of blocks 4 to {EVA_LAST_HIDDEN}"
    if (e.hidden_size, e.projection_dim) == EVA_L[:2] and e.image_size != EVA_L[2]:
        return f"{e.image_size} px ({e.architecture}), and PuLID reads EVA02-CLIP-L-14-336 at {EVA_L[2]} px"
    return None


def pick_eva(adapter: Entry, store: ModelStore, requested: str | None = None) -> tuple[Entry, str]:
    """The EVA02-CLIP tower whose widths the file's IDFormer reads (hidden states and cls output), deep enough and at
    PuLID's image size (`eva_mismatch`), and why."""
    spec, name = adapter.spec, label_of(adapter)
    wanted = (spec.clip_width, spec.eva_projection)
    needs = f"eva-clip hidden_states[{spec.clip_width}] and cls[{spec.eva_projection}]"
    if requested:
        encoder = store.encoder(requested)
        if (encoder.spec.model_type, encoder.spec.hidden_size, encoder.spec.projection_dim) != ("eva-clip", *wanted):
            raise IncompatibleError(f"encoder {encoder.name} gives {encoder.spec.outputs}, but PuLID {name} reads "
                                    f"{needs}. Leave the encoder unset and imprompt picks the right one")  # fmt: skip
        if problem := eva_mismatch(encoder):
            raise IncompatibleError(f"encoder {encoder.name} ({Path(encoder.path).name}) has {problem}. Use "
                                    f"EVA02_CLIP_L_336_psz14_s6B.pt, or leave the encoder unset")  # fmt: skip
        return encoder, f"{name} reads {needs}; encoder chosen in the request"
    widths = [e for e in store.current_of_kind("image-encoder")
              if (e.spec.model_type, e.spec.hidden_size, e.spec.projection_dim) == ("eva-clip", *wanted)]  # fmt: skip
    found = [e for e in widths if eva_mismatch(e) is None]
    if widths and not found:
        raise IncompatibleError(
            f"PuLID {name} ({Path(spec.path).name}) reads {needs} of EVA02-CLIP-L-14-336 (336 px, 24 blocks); the "
            f"EVA-CLIP checkpoints of those widths are not it: "
            f"{'; '.join(f'{Path(e.path).name} has {eva_mismatch(e)}' for e in widths)}. Add "
            f"EVA02_CLIP_L_336_psz14_s6B.pt (QuanSun/EVA-CLIP) to DIR/clip/ or DIR/clip_vision/"
        )
    if not found:
        raise MissingEncoderError(
            f"PuLID {name} ({Path(spec.path).name}) reads {needs} (EVA02-CLIP-L-14-336), and no EVA-CLIP checkpoint "
            f"in the models folder gives it. Add EVA02_CLIP_L_336_psz14_s6B.pt (QuanSun/EVA-CLIP) to DIR/clip/ or "
            f"DIR/clip_vision/"
        )
    found.sort(key=lambda e: (e.path.parent != Path(spec.path).parent, len(e.path.parts), str(e.path)))
    return found[0], f"{name} reads {needs}; {found[0].name} gives it ({found[0].spec.architecture})"


def label_of(adapter: Entry) -> str:
    return catalog.friendly_name(adapter.name) or adapter.name


@dataclass
class PuLIDInputs(UnitInputs):
    """A unit's images, and the aligned face crop a client gave with its `face_embeddings` (decoded with them)."""

    aligned_face: object = None


@dataclass(frozen=True)
class PuLIDUnitPlan(UnitPlan):
    """A PuLID unit: its file, the EVA02-CLIP tower its IDFormer reads, its face."""

    def embed(self, state, inputs: UnitInputs, events: list, true_cfg: bool = True):
        raise UnsupportedError(f"ip_adapters.{self.index}: {self.label} is PuLID, whose ID tokens are made for the "
                               f"request that runs them; saved or remote embeddings are not supported for it")  # fmt: skip

    def face(self, state, inputs: UnitInputs, events: list):
        """(the 512-d embedding [1, 512], the aligned 512 crop as RGB uint8, what found the face), as PuLID's
        `get_id_embedding` makes them: antelopev2's largest face gives the embedding, RetinaFace's face nearest the
        centre gives the aligned crop; where antelopev2 finds none, its glintr100 embeds the aligned crop."""
        import cv2
        import numpy as np
        import torch
        from PIL import Image

        from ..errors import NoFaceError
        from ..ipadapter.facexlib_files import DETECTOR
        from ..ipadapter.faces import ANTELOPE_PACK
        from ..ipadapter.pulid import FACE_SIZE, aligned_face
        from ..ipadapter.retinaface import center_face_landmarks
        from ..util.images import image_digest, image_to_base64

        where = f"ip_adapters.{self.index}"
        if self.unit.face_embeddings is not None:
            vectors = self.unit.face_embeddings  # its shape checked in the plan (`plan_pulid_unit`)
            crop = inputs.aligned_face.convert("RGB")
            crop = np.asarray(crop.resize((FACE_SIZE, FACE_SIZE)) if crop.size != (FACE_SIZE, FACE_SIZE) else crop)
            return torch.tensor(vectors, dtype=torch.float32), crop, {"found_by": "face embedding and aligned crop given"}
        rgb = np.asarray(inputs.images[0].convert("RGB"))
        if max(rgb.shape[:2]) > MAX_SIDE:  # PuLID's resize_numpy_image_long: sizes floored, cv2's Lanczos
            ratio = MAX_SIDE / max(rgb.shape[:2])
            size = (int(rgb.shape[1] * ratio), int(rgb.shape[0] * ratio))
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4)
        image = Image.fromarray(rgb)
        try:  # PuLID's order: antelopev2 first (a missing pack or InsightFace is refused here, as before)
            found, origin = state.faces.face(image, f"{where}.images.0", events, pack=ANTELOPE_PACK, largest=True)
        except NoFaceError:
            found, origin = None, None
        path = face_file(state, self, DETECTOR)
        key = ("retinaface-centre", str(path), fingerprint_of(path), image_digest(image))
        centre, aligned_by = state.faces.faces.get(key), "cache"  # the engine's face cache keeps each image's result
        if centre is None:
            model = facexlib_model(state, path, events, self.label)
            started = time.perf_counter()
            centre, aligned_by = center_face_landmarks(model, rgb) or (None, None), "detected"
            seconds = time.perf_counter() - started
            state.faces.faces.put(key, centre, 256, label=f"RetinaFace {key[-1][:12]}")
            faces = centre[1]["faces_found"] if centre[1] else 0
            log.info("RetinaFace (%s) found %d face(s) in %s's image (%dx%d) in %.2f s", path.name, faces, where,
                     image.width, image.height, seconds)  # fmt: skip
            events.append({"event": "face_detected", "detector": "RetinaFace", "file": str(path), "for": self.label,
                           "faces": faces, "seconds": round(seconds, 4)})  # fmt: skip
        else:
            log.info("RetinaFace's result for %s's image %s from the face cache", where, key[-1][:12])
            events.append({"event": "face_reused", "detector": "RetinaFace", "file": str(path), "for": self.label})
        kps, box = centre
        if kps is None:  # PuLID raises 'facexlib align face fail'
            raise NoFaceError(f"{where}.images.0: no face found in the image ({image.width}x{image.height}) by "
                              f"facexlib's RetinaFace ({path}), which aligns the face PuLID reads; give a photo where "
                              f"one face is clearly visible, or face_embeddings with the aligned_face")  # fmt: skip
        crop = aligned_face(rgb, kps)
        if crop is None:  # imprompt beyond facexlib, which crashes here: a typed error naming the image
            raise NoFaceError(f"{where}.images.0: RetinaFace's five landmarks of the face nearest the centre (box "
                              f"{[round(v, 1) for v in box['box']]}, score {box['score']:.3f}) fit no alignment; give "
                              f"a photo where one face is clearly visible, or face_embeddings with the aligned_face")  # fmt: skip
        shown = {"score": round(box["score"], 4), "box": [round(v, 1) for v in box["box"]],
                 "faces_found": box["faces_found"], "retinaface": aligned_by,
                 "crop": image_to_base64(Image.fromarray(crop).resize((112, 112))),  # the page shows the aligned crop
                 "embedding_face": None if found is None else {"score": round(found.score, 4), "box": list(found.box),
                                                                "faces_found": found.faces_found}}  # fmt: skip
        if found is None:  # PuLID: "fail to detect face using insightface, extract embedding on align face"
            recognizer = state.faces.recognizer(events, ANTELOPE_PACK)
            embedding = np.asarray(recognizer.get_feat(cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)), np.float32).reshape(1, -1)
            log.info("PuLID %s: InsightFace %s found no face in %s's image; its recognition model embeds the face "
                     "RetinaFace aligned (PuLID's fallback)", self.label, ANTELOPE_PACK, where)  # fmt: skip
            found_by = (f"facexlib RetinaFace ({aligned_by}) aligned the face; InsightFace {ANTELOPE_PACK} found none in "
                        f"the image, so its recognition model embedded the aligned crop (PuLID's fallback)")  # fmt: skip
            return torch.from_numpy(embedding), crop, {"found_by": found_by, "faces": [shown], "fallback": True}
        found_by = f"InsightFace {ANTELOPE_PACK} ({origin}); facexlib RetinaFace ({aligned_by}) aligned the face"
        return torch.from_numpy(found.embedding[None].copy()), crop, {"found_by": found_by, "faces": [shown]}

    def active(self, step: int, total: int) -> bool:
        if self.unit.start_step is not None:
            return step >= self.unit.start_step and step / total < self.unit.end
        return self.unit.active_at(step, total)

    def describe(self, faces, face: dict, active_steps: list[int]) -> dict:
        """The unit's part of `info["ip_adapters"]`: what served it, and how."""
        a = self.adapter.spec
        info = {"adapter": self.label, "file": str(a.path), "variant": a.variant, "consumes": a.consumes,
                "embed_dim": a.embed_dim, "tokens": a.tokens, "encoder": self.encoder.name,
                "encoder_file": str(self.encoder.path), "encoder_architecture": self.encoder.spec.architecture,
                "encoder_why": self.why, "face": {k: v for k, v in face.items() if k != "faces"},
                "faces": face.get("faces", []), "images": 1, "scale": self.unit.scale, "id_weight": self.unit.scale,
                "start": self.unit.start, "end": self.unit.end, "start_step": self.unit.start_step,
                "active_steps": active_steps, "masked": False, "averaged": False, "layers": None}  # fmt: skip
        if a.variant == "pulid-sdxl":  # what its ID attention ran with
            info |= {"num_zero": SDXL_NUM_ZERO if self.unit.num_zero is None else self.unit.num_zero,
                     "ortho": self.unit.ortho or SDXL_ORTHO}  # fmt: skip
        return info


def plan_pulid_unit(index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore,
                    pipeline: Entry | None) -> PuLIDUnitPlan:  # fmt: skip
    """A PuLID unit checked against the model and against what PuLID reads, its EVA tower picked from the file's
    widths. Names only: no image is read."""
    spec, where, name = adapter.spec, f"ip_adapters.{index}", label_of(adapter)
    sdxl = spec.variant == "pulid-sdxl"
    if pipeline is not None and not fits(adapter, pipeline):
        p = pipeline.spec
        if p.architecture != ("unet" if sdxl else "flux") or (sdxl and p.family != spec.family):
            problem = f"is for {spec.family} models, but model {pipeline.name} is {p.family}"
        elif sdxl:
            problem = (f"has ID projections for {len(spec.layer_widths)} cross-attentions, but model {pipeline.name}'s "
                       f"UNet has {len(p.layer_widths)}: it was made for another UNet")  # fmt: skip
        else:
            problem = (f"has {len(spec.layer_widths)} CAs reading width {spec.cross_attention_dim}, but model "
                       f"{pipeline.name} has {len(p.layer_widths)} double blocks of width {p.layer_widths[0]} and "
                       f"{p.single_blocks or 'unknown'} single blocks (PuLID: one CA per 2 double + one per 4 "
                       f"single blocks)")  # fmt: skip
        models = [m.name for m in store.pipelines if fits(adapter, m)]
        raise IncompatibleError(f"{where}: PuLID {name} ({Path(spec.path).name}) {problem}. Use a {spec.family} model "
                                f"({', '.join(models) or 'none in the models folder'}), or another image prompt "
                                f"for {p.family}")  # fmt: skip
    refused = {
        "embeddings": (unit.embeddings, "give the face image"),
        "masks": (unit.masks is not None, "its CAs act on the whole image; remove them"),
        "negative_images": (unit.negative_images is not None, "its negative pass reads the uncond ID tokens; remove them"),
        "layers": (unit.layers is not None, "its CAs sit after fixed blocks; remove them"),
        "average": (unit.average, "PuLID FLUX reads one face; give one image"),
        "structure": (unit.structure != 1.0, "that is FaceID Plus v2's; leave it at 1"),
        "faceid_version": (unit.faceid_version, "that is FaceID Plus's; leave it out"),
        "downsample": (unit.downsample != 1, "that is FLUX Redux's; leave it at 1"),
        "controlnet_scale": (unit.controlnet_scale is not None, "that is InstantID's; leave it out"),
        "pose_image": (unit.pose_image is not None, "that is InstantID's; leave it out"),
        "identitynet": (unit.identitynet, "that is InstantID's; leave it out"),
        "num_zero": (unit.num_zero is not None and not sdxl, "that is PuLID SDXL v1.1's; leave it out"),
        "ortho": (unit.ortho is not None and not sdxl, "that is PuLID SDXL v1.1's; leave it out"),
    }
    for field_name, (given, fix) in refused.items():
        if given:
            raise RequestError(f"{where}.{field_name}: {name} is PuLID, which does not read {field_name}: {fix}")
    if len(unit.images) > 1:
        raise RequestError(f"{where}.images: PuLID FLUX reads one face, {len(unit.images)} images given; give one")
    if (unit.face_embeddings is not None) != (unit.aligned_face is not None):
        raise RequestError(f"{where}: PuLID reads face_embeddings with the aligned_face they belong to (or an image "
                           f"alone); give both, or an image")  # fmt: skip
    vectors = unit.face_embeddings
    if vectors is not None and not (isinstance(vectors, list) and len(vectors) == 1 and isinstance(vectors[0], list)
                                    and len(vectors[0]) == spec.embed_dim):  # fmt: skip
        found = (f"a file name ({vectors!r})" if isinstance(vectors, str) else
                 f"{len(vectors)} embedding(s) of {[len(v) if isinstance(v, list) else 1 for v in vectors][:4]} floats"
                 if isinstance(vectors, list) else type(vectors).__name__)  # fmt: skip
        raise RequestError(f"{where}.face_embeddings: PuLID reads one antelopev2 embedding of {spec.embed_dim} floats "
                           f"given inline, but got {found}; give one list of {spec.embed_dim} floats")  # fmt: skip
    if unit.start_step is not None and unit.start != 0:
        raise RequestError(f"{where}.start: give start_step or start, not both (start_step {unit.start_step}, "
                           f"start {unit.start} given)")  # fmt: skip
    encoder, why = pick_eva(adapter, store, unit.encoder)
    return PuLIDUnitPlan(index, unit, adapter, encoder, why)


def built(state, entry: Entry, what: str, dtype, label: str, events: list):
    """The PuLID module of `entry`, from the engine's adapter cache (under its budget) or built now."""
    from ..ipadapter.pulid import build_pulid, build_pulid_sdxl
    from ..loading.tensors import read_tensors
    from ..util.cache import module_bytes

    key = entry.key(what, dtype, state.device)
    module = state.adapters.get(key)
    if module is not None:
        return module
    stale = state.adapters.discard_older_versions(key)
    started = time.perf_counter()
    tensors = read_tensors(Path(entry.path))
    builder = {"pulid": build_pulid, "pulid-sdxl": build_pulid_sdxl}[what]
    module = builder(tensors, entry.path, state.device, dtype)
    seconds = time.perf_counter() - started
    kept(state, key, module, module_bytes(module), entry.name, events, stale)
    log.info("PuLID %s %s (%s) loaded in %.2f s", what, label, Path(entry.path).name, seconds)
    events.append({"event": "adapter_loaded", "adapter": label if what == "pulid" else entry.name,
                   "file": str(entry.path), "seconds": round(seconds, 4)})  # fmt: skip
    return module


def eva_tower(state, entry: Entry, dtype, label: str, events: list):
    """The EVA tower of `entry`: an image encoder, so in the engine's encoder cache (its budget, its events), as
    every unit's encoder is; built from its file when not there."""
    from ..ipadapter.eva_clip import build_eva
    from ..loading.tensors import read_tensors

    return in_encoder_cache(state, entry.key("eva", dtype, state.device), f"EVA tower {entry.name}", entry.name,
                            lambda: build_eva(read_tensors(Path(entry.path)), entry.path, state.device, dtype),
                            {"why": "PuLID reads EVA-CLIP's hidden states"}, label, events)  # fmt: skip


def in_encoder_cache(state, key, what: str, name: str, build, loaded: dict, label: str, events: list):
    """The module under `key` in the engine's encoder cache, or `build()` put there: older versions of its file and
    what the budget pushes out evicted, each step an event (`loaded`: the fields the load event adds)."""
    from ..util.cache import module_bytes

    encoders = state.embedder.encoders
    module = encoders.get(key)
    if module is not None:
        events.append({"event": "encoder_reused", "encoder": name, "for": label})
        return module
    for old in encoders.discard_older_versions(key):
        events.append({"event": "encoder_evicted", "encoder": old.label, "why": "its file changed on disk"})
    started = time.perf_counter()
    module = build()
    seconds = time.perf_counter() - started
    for old in encoders.put(key, module, module_bytes(module), label=name):
        events.append({"event": "encoder_evicted", "encoder": old.label, "why": "encoder cache budget"})
    log.info("%s for %s loaded in %.2f s", what, label, seconds)
    events.append({"event": "encoder_loaded", "encoder": name, "for": label, "seconds": round(seconds, 4), **loaded})
    return module


FACEXLIB_WHY = {"detection_Resnet50_Final.pth": "PuLID aligns the face on RetinaFace's landmarks (facexlib)",
                "parsing_bisenet.pth": "PuLID parses the aligned face with BiSeNet (facexlib)"}  # fmt: skip


def face_files_needed(u: PuLIDUnitPlan) -> tuple[str, ...]:
    """facexlib's files a unit runs: the parser always (a given crop is parsed too), the detector for an image."""
    from ..ipadapter.facexlib_files import DETECTOR, PARSER

    return (PARSER,) if u.unit.face_embeddings is not None else (DETECTOR, PARSER)


def check_face_files(units, state) -> None:
    """The plan's check, before the model or the PuLID file loads: every PuLID unit's facexlib files are where users
    keep them (`facexlib_files.facexlib_folders`), else refused naming each file, its URL and folder; and a unit
    from an image has InsightFace installed and the antelopev2 pack found, else refused as loading them would be."""
    from ..ipadapter.facexlib_files import locate

    for u in units:
        locate(face_files_needed(u), state.store.roots, state.faces.roots, f"ip_adapters.{u.index}: PuLID {u.label}",
               models_root(state.store, u.adapter))  # fmt: skip
        if u.unit.face_embeddings is None:
            state.faces.check(FACE_PACK, "PuLID", f"ip_adapters.{u.index}")


def models_root(store: ModelStore, entry: Entry) -> Path | None:
    """The models folder holding `entry` (where its facexlib/ folder belongs), if one does."""
    return next((root for root in store.roots if root in Path(entry.path).parents), None)


def face_file(state, u: PuLIDUnitPlan, name: str) -> Path:
    """Where facexlib's `name` is now (checked in the plan; a file removed since is refused the same way)."""
    from ..ipadapter.facexlib_files import locate

    where = f"ip_adapters.{u.index}: PuLID {u.label}"
    return locate((name,), state.store.roots, state.faces.roots, where, models_root(state.store, u.adapter))[name]


def facexlib_model(state, path: Path, events: list, label: str):
    """facexlib's RetinaFace or BiSeNet of the file at `path`: face models like the EVA tower, so in the engine's
    encoder cache (its budget, its events), keyed by the file's fingerprint; built from the file when not there."""
    from ..ipadapter.face_parsing import build_bisenet
    from ..ipadapter.facexlib_files import PARSER
    from ..ipadapter.retinaface import build_retinaface
    from ..loading.tensors import read_tensors

    builder = build_bisenet if path.name == PARSER else build_retinaface
    return in_encoder_cache(state, (str(path), fingerprint_of(path), "facexlib", str(state.device)),
                            f"facexlib {path.name}", path.name,
                            lambda: builder(read_tensors(path), str(path)).to(state.device),
                            {"file": str(path), "why": FACEXLIB_WHY.get(path.name, "PuLID's face preprocessing")},
                            label, events)  # fmt: skip
    for old in encoders.discard_older_versions(key):
        events.append({"event": "encoder_evicted", "encoder": old.label, "why": "its file changed on disk"})
    started = time.perf_counter()
    builder = build_bisenet if path.name == PARSER else build_retinaface
    model = builder(read_tensors(path), str(path)).to(state.device)
    seconds = time.perf_counter() - started
    for old in encoders.put(key, model, module_bytes(model), label=path.name):
        events.append({"event": "encoder_evicted", "encoder": old.label, "why": "encoder cache budget"})
    log.info("facexlib %s for %s loaded in %.2f s", path.name, label, seconds)
    events.append({"event": "encoder_loaded", "encoder": path.name, "file": str(path), "for": label,
                   "seconds": round(seconds, 4), "why": FACEXLIB_WHY.get(path.name, "PuLID's face preprocessing")})  # fmt: skip
    return model


def kept(state, key, value, nbytes: int, label: str, events: list, stale=()) -> None:
    """`value` put in the engine's adapter cache; what that evicts is let go everywhere (as
    `image_prompts.built_adapter` does: no kept shell keeps an evicted adapter alive)."""
    evicted = state.adapters.put(key, value, nbytes, label=label)
    for old, why in [(e, "its file changed on disk") for e in stale] + [(e, "adapter cache budget") for e in evicted]:
        events.append({"event": "adapter_evicted", "adapter": old.label, "why": why})
    if stale or evicted:
        for resident in state.pipelines.all():
            resident.attached.forget([e.key for e in [*stale, *evicted]])


def id_dtype(u: PuLIDUnitPlan, loaded, state):
    """The dtype a unit's EVA tower, PuLID module and ID tokens run in, as the authors' code runs them. SDXL v1.1:
    float32 (`pipeline_v1_1.py` moves EVA, the IDFormer and the ID processors' id_to_k / id_to_v to the device with
    no dtype, and its IDAttnProcessor2_0 casts their keys and values to the UNet's dtype, as `IDAttnProcessor` does
    here). FLUX: the transformer's (`pipeline_flux.py` runs EVA, the IDFormer and the CAs in its weight_dtype,
    bfloat16, its DiT's dtype; imprompt's FLUX is bfloat16 on CUDA, float32 on the CPU)."""
    import torch

    return torch.float32 if u.adapter.spec.variant == "pulid-sdxl" else (loaded.dtype or state.dtype)


def id_tokens(module, eva, parser, face_vector, crop):
    """The ID tokens and uncond tokens of one face: EVA on PuLID's face features image of the aligned crop (BiSeNet's
    non-face white, the rest gray), the IDFormer on its outputs."""
    import torch

    from ..ipadapter.eva_clip import OPENAI_MEAN, OPENAI_STD
    from ..ipadapter.face_parsing import face_features_image
    from ..ipadapter.pulid import eva_pixels, id_vector

    p = next(eva.parameters())
    features = face_features_image(parser, crop).to(p.device)
    pixels = eva_pixels(features, eva.shape.image_size, OPENAI_MEAN, OPENAI_STD).to(dtype=p.dtype)
    with torch.no_grad():
        cls, hidden = eva(pixels)
        return module.id_tokens(id_vector(face_vector.to(device=p.device), cls), hidden)


@dataclass
class PuLIDPrompts:
    """A request's PuLID unit (at most one), a part of its image prompts (`image_prompts.py` prepares, applies and
    describes it): its ID tokens, made in `prepare`, added by hooks on the transformer for the call."""

    units: tuple[PuLIDUnitPlan, ...]
    inputs: list[UnitInputs]
    tokens: list = field(default_factory=list)
    modules: list = field(default_factory=list)
    faces: list = field(default_factory=list)
    active_steps: list = field(default_factory=list)

    def prepare(self, state, loaded, events: list) -> None:
        from ..ipadapter.facexlib_files import PARSER

        if len(self.units) > 1:
            raise UnsupportedError(f"ip_adapters: {len(self.units)} PuLID units; PuLID's FLUX code runs one. Use one")
        self.tokens, self.modules, self.faces = [], [], []
        for u, inputs in zip(self.units, self.inputs):
            dtype = id_dtype(u, loaded, state)
            module = built(state, u.adapter, u.adapter.spec.variant, dtype, u.label, events)
            face_vector, crop, found = u.face(state, inputs, events)
            parsing = face_file(state, u, PARSER)
            digest = hashlib.sha256(face_vector.numpy().tobytes() + crop.tobytes()).hexdigest()
            # a face's ID tokens are embeddings like any unit's: in the engine's embedding cache (its budget), keyed
            # by face, the three files' versions (PuLID's, EVA's, the parser's) and dtype; a repeated face needs
            # neither the parser, EVA nor the IDFormer
            key = (*u.adapter.key("pulid-tokens", dtype, state.device), *u.encoder.key(), str(parsing),
                   fingerprint_of(parsing), digest)  # fmt: skip
            embeddings = state.embedder.embeddings
            tokens, made = embeddings.get(key), "cache"
            if tokens is None:
                eva = eva_tower(state, u.encoder, dtype, u.label, events)
                if (eva.shape.width, eva.shape.projection) != (u.adapter.spec.clip_width, u.adapter.spec.eva_projection):
                    raise CheckpointError(u.encoder.path, f"EVA tower of width {eva.shape.width} / cls "
                                          f"{eva.shape.projection}, but {u.label} reads {u.adapter.spec.needs}")  # fmt: skip
                parser = facexlib_model(state, parsing, events, u.label)
                tokens, made = id_tokens(module, eva, parser, face_vector, crop), "computed"
                embeddings.discard_older_versions(key)
                embeddings.put(key, tokens, sum(t.numel() * t.element_size() for t in tokens), label=f"{u.label} ID {digest[:12]}")
            self.tokens.append(tokens)
            self.modules.append(module)
            self.faces.append({"found_by": found["found_by"], "id_tokens": made, "faces": found.get("faces", []),
                               "fallback": found.get("fallback", False),
                               "id_dtype": str(dtype).removeprefix("torch.")})  # fmt: skip

    def apply(self, call) -> None:
        """Hooks on the transformer for this call (removed after it, however it ends), switched per step."""
        from ..ipadapter.pulid import PuLIDRun, SDXLRun, attach, attach_sdxl

        self.active_steps = [[] for _ in self.units]
        for u, module, (cond, uncond), steps in zip(self.units, self.modules, self.tokens, self.active_steps):
            unit = u.unit
            try:
                if u.adapter.spec.variant == "pulid-sdxl":  # which rows are unconditional: read per UNet call
                    run = SDXLRun(cond, uncond, unit.scale, SDXL_NUM_ZERO if unit.num_zero is None else unit.num_zero,
                                  unit.ortho or SDXL_ORTHO)  # fmt: skip
                    call.after(attach_sdxl(call.pipeline.unet, module, run, lambda sample: uncond_rows(call, sample)))
                else:
                    run = PuLIDRun(cond, uncond, unit.scale)
                    call.after(attach(call.pipeline.transformer, module, run))
            except CheckpointError as exc:
                raise IncompatibleError(f"ip_adapters.{u.index}: {exc}") from None

            def switch(step: int, total: int, index: int, u=u, run=run, steps=steps) -> None:
                if isinstance(run, PuLIDRun):
                    run.begin_step(u.active(step, total))
                else:
                    run.active = u.active(step, total)
                if index == 0 and run.active:
                    steps.append(step)

            call.schedule.add(switch)

    def warnings(self) -> list[str]:
        """Said with a PuLID result whose embedding came from PuLID's fallback (antelopev2 found no face)."""
        return [f"{u.label}: InsightFace antelopev2 found no face in the image; the embedding is its recognition "
                f"model's on the face facexlib's RetinaFace aligned, as PuLID falls back"
                for u, face in zip(self.units, self.faces) if face.get("fallback")]  # fmt: skip

    def describe(self, faces, steps: int) -> list[dict]:
        return [u.describe(faces, face, active) for u, face, active in zip(self.units, self.faces, self.active_steps)]


def uncond_rows(call, sample) -> list[int]:
    """The unconditional rows of the UNet call whose pipeline batch is `sample`: the rows the call's prompt
    conditioning runs (its negative runs without CFG too where the prompt has AND parts or weights, A1111's rule),
    as ControlNets read them (`ConditionedUNet.control_batches`); else the pipeline's [negative, prompt] under CFG."""
    guided = sample.shape[0] == 2  # the pipeline's batch (one image at a time): [negative, prompt], or [prompt]
    if call.conditioned_unet is None:
        return [0] if guided else []
    return [0] if call.conditioned_unet.rows_at(guided)[2] else []


def check_alone(units: tuple, pulid_units: tuple) -> None:
    """PuLID v1.1 replaces the UNet's cross-attention processors for the call: no IP-Adapter unit beside it."""
    for u in pulid_units:
        if u.adapter.spec.variant == "pulid-sdxl" and units:
            raise UnsupportedError(f"ip_adapters.{u.index}: {u.label} (PuLID SDXL v1.1) takes the UNet's cross-attention "
                                   f"processors, which the request's other image prompts ({', '.join(x.label for x in units)}) "
                                   f"also need; run PuLID SDXL alone")  # fmt: skip


def listing(entry: Entry, store: ModelStore) -> dict:
    """`imprompt models`' words for a PuLID file: the EVA-CLIP tower, face pack and facexlib files it runs with,
    and whether each is present (looked for where a request looks, without a configured --insightface-root)."""
    from ..ipadapter.facexlib_files import presence
    from ..ipadapter.faces import FaceAnalyzer, insightface_roots

    roots = insightface_roots(store.roots)
    pack = FaceAnalyzer(roots).find_pack(FACE_PACK)
    files = presence(store.roots, roots)
    item = {"face_pack": FACE_PACK, "face_pack_present": pack is not None, "face_pack_path": str(pack) if pack else None,
            "facexlib": files, "facexlib_present": all(files.values())}  # fmt: skip
    try:
        eva, _ = pick_eva(entry, store)
        item.update(encoder=eva.name, encoder_present=True)
    except (MissingEncoderError, IncompatibleError) as exc:
        item.update(encoder=None, encoder_present=False, encoder_problem=str(exc))
    return item
