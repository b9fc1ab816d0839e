"""A FaceID unit: an IP-Adapter unit whose images are faces, with the LoRA its adapter file embeds.

InsightFace's face embedding of each image (or face embeddings the client computed, or saved ones), and for the
Plus family CLIP hidden states of each aligned face crop, from the encoder its weights need (picked as for any
adapter). The LoRA its file embeds acts exactly while the unit is in the request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import IncompatibleError, RequestError
from ..models import catalog
from ..models.store import Entry, ModelStore
from ..request import IPAdapterUnit
from ..util.images import image_to_base64
from .ip_adapter import UnitInputs, UnitPlan, pick_encoder, plan_saved

if TYPE_CHECKING:  # torch-heavy modules are imported where used: planning stays light (no torch)
    from ..ipadapter.embeddings import UnitEmbeddings
    from ..loading.loras import LoraUse


@dataclass(frozen=True)
class FaceIDUnitPlan(UnitPlan):
    def encode(self, state, inputs: UnitInputs, events: list, true_cfg: bool) -> UnitEmbeddings:
        """The face embeddings given, or InsightFace's of each image (normed, or raw for Portrait unnorm) and, for the
        Plus family, the CLIP hidden states of each aligned face crop."""
        import numpy as np
        import torch

        from ..ipadapter.embeddings import face_embeddings, given_face_embeddings

        where, spec = f"ip_adapters.{self.index}", self.adapter.spec
        if self.unit.face_embeddings is not None:
            return given_face_embeddings(self.unit.face_embeddings, spec.embed_dim, self.unit.average,
                                         state.limits.allow_paths, f"{where}.face_embeddings", state.device,
                                         state.encoder_dtype)  # fmt: skip
        found = [state.faces.face(image, f"{where}.images.{j}", events) for j, image in enumerate(inputs.images)]
        raw = spec.face_embedding == "raw"
        vectors = torch.from_numpy(np.stack([face.embedding if raw else face.normed_embedding for face, _ in found]))
        result = face_embeddings(vectors, spec.embed_dim, self.unit.average, f"{where}.images", state.device,
                                 state.encoder_dtype, [origin for _, origin in found])  # fmt: skip
        if spec.clip_width:
            crops = [face.crop_image() for face, _ in found]
            result.clip = state.embedder.embed(self.encoder, "hidden_states", crops, self.label, self.why, events,
                                               None, self.unit.average)  # fmt: skip
            result.encoder_source = result.clip.encoder_source
        result.faces = [face for face, _ in found]
        return result

    def served_by(self, faces) -> tuple:
        """Base and Portrait from images: InsightFace alone; with the faces given: nobody here."""
        if self.encoder is not None or self.embeddings is not None:
            return super().served_by(faces)
        if self.unit.face_embeddings is not None:
            return "face embeddings given", None, None
        return f"InsightFace {faces.pack.name}", str(faces.pack), None

    def lora_use(self, unet) -> LoraUse | None:
        """The LoRA the adapter file embeds, at 1.0 (as diffusers' FaceID loading sets it)."""
        from ..ipadapter.build import load_adapter_state_dict
        from ..loading.loras import LoraUse

        spec = self.adapter.spec
        if not spec.lora_rank:
            return None
        return LoraUse(self.adapter.key("faceid-lora"), f"{self.label} (its LoRA)", 1.0,
                       lambda: unet._load_ip_adapter_loras([load_adapter_state_dict(spec)])[0])  # fmt: skip

    def face_crop(self, embeddings: UnitEmbeddings, cfg: bool, device, dtype):
        """FaceID Plus: the face crops' hidden states as the pipeline batches them, v2's shortcut, its scale."""
        clip = embeddings.clip.for_pipeline(cfg).to(device=device, dtype=dtype) if embeddings.clip else None
        return (clip, self.faceid_version == "v2", self.unit.structure)

    def describe(self, faces, embeddings: UnitEmbeddings, active_steps: list[int]) -> dict:
        """A unit's info, with how the FaceID version was decided and the face found in each image (with the
        aligned crop the Plus family's encoder read, shown by the web page)."""
        info = super().describe(faces, embeddings, active_steps)
        a, unit = self.adapter.spec, self.unit
        decided = "the request's faceid_version" if unit.faceid_version else a.faceid_from
        faces = [{"score": round(face.score, 4), "box": list(face.box), "faces_found": face.faces_found,
                  "crop": image_to_base64(face.crop_preview().resize((112, 112)))} for face in embeddings.faces]  # fmt: skip
        info.update(faceid_version=self.faceid_version, faceid_version_from=decided, faces=faces,
                    face_source=("face_embeddings" if unit.face_embeddings is not None else
                                 "saved embeddings" if self.embeddings is not None else "InsightFace"))  # fmt: skip
        if a.variant == "faceid-plus":
            info["structure"] = unit.structure if self.faceid_version == "v2" else None
        if a.lora_rank:
            info["lora"] = {"rank": a.lora_rank, "weight": 1.0}
        return info


def plan_face_unit(index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore, weights: tuple) -> FaceIDUnitPlan:
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
        return plan_saved(FaceIDUnitPlan, index, unit, adapter, store, weights)
    if spec.variant == "faceid-plus" and unit.face_embeddings:
        raise IncompatibleError(
            f"{where}: IP-Adapter {name} ({Path(spec.path).name}) is FaceID Plus: besides the face embedding it reads "
            f"CLIP hidden states [{spec.clip_width}] of the aligned face crop, which face_embeddings do not carry. Give "
            f"images of the face (InsightFace finds and crops it), or embeddings saved with "
            f"`imprompt embed --adapter {name!r} FACE.jpg`"
        )
    if spec.variant != "faceid-plus":
        source = "face embeddings given" if unit.face_embeddings else "InsightFace face embeddings of the images"
        return FaceIDUnitPlan(index, unit, adapter, None, f"{name} consumes {spec.needs}: {source} (no image encoder)",
                              weights)  # fmt: skip
    encoder, why = pick_encoder(adapter, store, unit.encoder)
    return FaceIDUnitPlan(index, unit, adapter, encoder, f"InsightFace face embeddings and, for the face crop, {why}",
                          weights)  # fmt: skip
