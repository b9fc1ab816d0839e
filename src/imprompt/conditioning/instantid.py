"""An InstantID unit: InstantX's face adapter and its IdentityNet ControlNet, both fed by InsightFace's antelopev2.

What InstantX's published pipeline (`pipeline_stable_diffusion_xl_instantid.py`, read for its rules) does, and this
unit does with imprompt's own parts:
- the face: InsightFace's `antelopev2` pack, the image in BGR order, the face of largest box, its raw `embedding`
  (not `normed_embedding`, which FaceID reads) and its five keypoints;
- the adapter (`ip-adapter.bin`): a Resampler fed the embedding as one token ([1, 1, 512]; the negative branch is a
  zero embedding through the same Resampler), giving 16 face tokens that IP attention reads in every
  cross-attention layer at the unit's scale (the pipeline's `ip_adapter_scale`); attached like any IP-Adapter;
- the IdentityNet (an SDXL ControlNet): its control image is the keypoints drawn as InstantID's `draw_kps` draws
  them (limbs from each point to the nose as filled ellipses at 60 %, then a disc of radius 10 on each point), at
  the face image's size and resized as diffusers' control image processor resizes; its cross-attention reads the
  face tokens, not the prompt; its scale is the unit's `controlnet_scale` (the pipeline's
  `controlnet_conditioning_scale`), over all the steps. It runs through the request's ControlNets
  (`controlnet.py`), beside their units; those read the prompt, as they would alone (InstantX's multi-ControlNet
  demo gives every net the face tokens: imprompt does so only for the IdentityNet, which was trained on them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import ImpromptError, IncompatibleError, RequestError, UnknownControlNetError, renamed
from ..models import catalog
from ..models.store import Entry, ModelStore
from ..request import IPAdapterUnit
from ..util.images import image_to_base64
from .ip_adapter import UnitInputs, UnitPlan, unit_weights

FACE_PACK = "antelopev2"  # the pack InstantID was trained with (ipadapter/faces.ANTELOPE_PACK)
FACE_WIDTH = 512
FACE_KIND = "InsightFace antelopev2's raw `embedding`, 512 floats, not normed_embedding"
MIN_RAW_NORM = 2.0  # antelopev2's raw embeddings have norms of about 20-30; a normed one is 1
IDENTITYNET_SCALE = 0.8  # imprompt's default controlnet_scale: InstantX's README example (SD.Next's id_conditioning is 0.5)
# InstantID's keypoint drawing: a colour per keypoint (eyes, nose, mouth corners), limbs from points 0, 1, 3, 4 to
# the nose (point 2) in the colour of their first point, 4 px wide, dimmed to 60 %; then a disc of radius 10 per point
KPS_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH, LIMB_DIM, POINT_RADIUS = 4, 0.6, 10


def is_instantid(entry: Entry) -> bool:
    return entry.spec.variant == "instantid"


def find_adapter(store: ModelStore, name: str) -> Entry | None:
    """"InstantID" (or an alias) names the adapter whose tensors say InstantID: InstantX ships it as
    `ip-adapter.bin`, a name other adapters share (InstantX's SD 3.5 one among them). None: not that name."""
    known = catalog.known_adapter(name)
    if known is None or known.name != "InstantID":
        return None
    found = [e for e in store.adapters if is_instantid(e)]
    if not found:  # a pickle is read when first needed, and InstantX's file is one (read once: the probe cache keeps it)
        store.read_all()
        found = [e for e in store.adapters if is_instantid(e)]
    return found[0] if found else None


@dataclass
class IdentityLink:
    """What the unit's IdentityNet needs from the unit's preparation: set when the image prompts are prepared, read
    when the ControlNets are (they come after, in plan order)."""

    built: object = None  # the adapter's modules (ipadapter.build.BuiltAdapter): its Resampler makes the face tokens
    embeddings: object = None  # the unit's UnitEmbeddings (their `faces` hold the keypoints)
    inputs: UnitInputs | None = None
    keypoints: Image.Image | None = None  # the control image drawn, for the result's info


@dataclass
class InstantIDInputs(UnitInputs):
    """A unit's images, and the picture whose face's keypoints the IdentityNet reads instead (`pose_image`)."""

    pose: Image.Image | None = None


@dataclass(frozen=True)
class InstantIDUnitPlan(UnitPlan):
    identitynet: Entry | None = None
    link: IdentityLink = field(default_factory=IdentityLink, compare=False, hash=False)

    @property
    def controlnet_scale(self) -> float:
        return IDENTITYNET_SCALE if self.unit.controlnet_scale is None else self.unit.controlnet_scale

    def encode(self, state, inputs: UnitInputs, events: list, true_cfg: bool):
        """antelopev2's raw embedding of the largest face (or the one given), shaped as InstantX's pipeline
        reshapes it: one image of one 512-wide token; the negative a zero embedding."""
        import torch

        from ..ipadapter.embeddings import face_embeddings, given_face_embeddings

        where = f"ip_adapters.{self.index}"
        if self.unit.face_embeddings is not None:
            result = given_face_embeddings(self.unit.face_embeddings, FACE_WIDTH, False, state.limits.allow_paths,
                                           f"{where}.face_embeddings", state.device, state.encoder_dtype,
                                           FACE_KIND)  # fmt: skip
            if result.positive.shape[0] != 1:
                raise RequestError(f"{where}.face_embeddings: {result.positive.shape[0]} faces, but InstantID reads "
                                   f"one face embedding; give one")  # fmt: skip
            norm = float(result.positive.float().norm())
            if norm < MIN_RAW_NORM:  # refused, not warned: the face would be weakened many-fold, with no error
                raise IncompatibleError(f"{where}.face_embeddings: an embedding of norm {norm:.3g} (a unit-length "
                                        f"normed_embedding, FaceID's kind, has norm 1); InstantID reads {FACE_KIND} "
                                        f"(norm about 20-30); send antelopev2's `embedding`")  # fmt: skip
        else:
            face, origin = state.faces.face(inputs.images[0], f"{where}.images.0", events, FACE_PACK, largest=True)
            result = face_embeddings(torch.from_numpy(face.embedding)[None], FACE_WIDTH, False, f"{where}.images",
                                     state.device, state.encoder_dtype, [origin])  # fmt: skip
            result.faces = [face]
        result.positive = result.positive.reshape(1, 1, FACE_WIDTH)
        result.negative = torch.zeros_like(result.positive)
        return result

    def served_by(self, faces) -> tuple:
        if self.unit.face_embeddings is not None:
            return "face embeddings given", None, None
        pack = faces.packs.get(FACE_PACK)
        return f"InsightFace {FACE_PACK}", str(pack) if pack else None, None

    def describe(self, faces, embeddings, active_steps: list[int]) -> dict:
        """The unit's info: the face found, the IdentityNet, its scale, and the keypoints image it read."""
        info = super().describe(faces, embeddings, active_steps)
        info.update(
            faces=[{"score": round(f.score, 4), "box": list(f.box), "faces_found": f.faces_found,
                    "crop": image_to_base64(f.crop_preview().resize((112, 112)))} for f in embeddings.faces],
            face_source="face_embeddings" if self.unit.face_embeddings is not None else "InsightFace",
            identitynet=self.identitynet.name if self.identitynet else None,
            identitynet_file=str(self.identitynet.path) if self.identitynet else None,
            controlnet_scale=self.controlnet_scale, pose_image=self.unit.pose_image is not None,
            keypoints=image_to_base64(self.link.keypoints) if self.link.keypoints is not None else None,
        )  # fmt: skip
        return info


@dataclass
class IdentityNetUnit:
    """The IdentityNet of an InstantID unit, run by the request's ControlNets with the unit's keypoints as its
    control image and the unit's face tokens for its cross-attention (`controlnet.ControlNets.fed`)."""

    index: int  # the InstantID unit's
    entry: Entry
    weight: float
    link: IdentityLink
    start: float = 0.0  # InstantX's pipeline runs the IdentityNet over every step
    end: float = 1.0

    @property
    def where(self) -> str:
        return f"ip_adapters.{self.index}"

    def control_map(self, state, events: list) -> Image.Image:
        """The keypoints of the pose image's largest face (else of the unit's face), drawn at that picture's size."""
        inputs = self.link.inputs
        pose = getattr(inputs, "pose", None)
        if pose is not None:
            face, _ = state.faces.face(pose, f"{self.where}.pose_image", events, FACE_PACK, largest=True)
            size = pose.size
        else:
            face, size = self.link.embeddings.faces[0], inputs.images[0].size
        self.link.keypoints = draw_keypoints(size, face.kps)
        return self.link.keypoints

    @staticmethod
    def fitted(image: Image.Image, width: int, height: int) -> Image.Image:
        """As diffusers' control image processor resizes it (Lanczos, no crop): InstantX's pipeline's rule."""
        return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)

    def hidden_states_for(self, call):
        """What the IdentityNet's cross-attention reads at each row: the unit's face tokens, the Resampler's output
        for the face embedding (rows of the negative: for the zero embedding)."""
        import torch

        unet = call.loaded.pipeline.unet
        embeddings, projection = self.link.embeddings, self.link.built.image_projection
        with torch.no_grad():
            both = embeddings.for_pipeline(True).to(device=unet.device, dtype=unet.dtype)  # [2, 1, 1, 512]
            negative, positive = projection(both.reshape(2, 1, FACE_WIDTH)).chunk(2)

        def rows(unconditional: list[bool]):
            return torch.cat([negative if u else positive for u in unconditional])

        return rows


def draw_keypoints(size: tuple[int, int], kps) -> Image.Image:
    """InstantID's keypoint image (its `draw_kps` rule, written here from its description in the module
    docstring): OpenCV's rasterisation, as the IdentityNet was trained on it."""
    import math

    import cv2
    import numpy as np

    width, height = size
    points = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for a, b in KPS_LIMBS:
        (xa, ya), (xb, yb) = points[a], points[b]
        centre = (int((xa + xb) / 2), int((ya + yb) / 2))
        half_length = int(math.hypot(xa - xb, ya - yb) / 2)
        angle = int(math.degrees(math.atan2(ya - yb, xa - xb)))
        outline = cv2.ellipse2Poly(centre, (half_length, LIMB_HALF_WIDTH), angle, 0, 360, 1)
        canvas = cv2.fillConvexPoly(canvas, outline, KPS_COLOURS[a])
    dimmed = (canvas * LIMB_DIM).astype(np.uint8)
    for (x, y), colour in zip(points, KPS_COLOURS):
        dimmed = cv2.circle(dimmed, (int(x), int(y)), POINT_RADIUS, colour, -1)
    return Image.fromarray(dimmed)


IDENTITYNET_WORDS = ("instantid", "instant_id", "instant-id", "identitynet")


def identitynet_candidates(adapter: Entry, store: ModelStore) -> tuple[list[Entry], list[Entry]]:
    """The SDXL ControlNets that may be the adapter's IdentityNet, best first: those beside the adapter and named
    InstantID / IdentityNet (InstantX's own `ControlNetModel/` beside its `ip-adapter.bin` counts as named), else
    those named so anywhere; and the other nets beside the adapter (the A1111 extension keeps every ControlNet in
    models/ControlNet/, so there "beside" says nothing)."""
    fitting = [e for e in store.controlnets
               if not e.spec.unsupported and not e.spec.union and e.spec.architecture == "unet"
               and e.spec.cross_attention_dim == adapter.spec.cross_attention_dim]  # fmt: skip
    beside = [e for e in fitting if e.path.parent == adapter.path.parent]

    def named(e: Entry) -> bool:
        return any(w in e.name.lower() for w in IDENTITYNET_WORDS) or (e in beside and e.path.name == "ControlNetModel")

    best = [e for e in beside if named(e)] or [e for e in fitting if named(e)]
    return best, [e for e in beside if not named(e)]


def find_identitynet(adapter: Entry, store: ModelStore, name: str | None, where: str) -> Entry:
    """The unit's `identitynet`, else the one net `identitynet_candidates` finds: an IdentityNet's tensors are those
    of any SDXL ControlNet, so place and name find it (the tensors then check it: an SDXL-layout ControlNet of the
    adapter's width), and where they leave several, or only nets named otherwise, nothing is guessed."""
    if name:
        try:
            return store.controlnet(name)
        except ImpromptError as exc:
            raise renamed(exc, f"{where}.identitynet: {exc}") from None
    best, others = identitynet_candidates(adapter, store)
    if len(best) == 1:
        return best[0]
    if best:
        raise RequestError(f"{where}: the IdentityNet of InstantID {adapter.path.name} is ambiguous: "
                           f"{len(best)} SDXL ControlNets are named InstantID / IdentityNet "
                           f"({', '.join(e.name for e in best)}); name one in the unit's identitynet")  # fmt: skip
    if others:
        raise RequestError(f"{where}: the IdentityNet of InstantID {adapter.path.name} is ambiguous: no ControlNet is "
                           f"named InstantID / IdentityNet, and the SDXL ControlNets beside it "
                           f"({', '.join(e.name for e in others)}) may be any kind (their tensors cannot tell); name "
                           f"the IdentityNet in the unit's identitynet, or rename its file to control_instant_id_sdxl")  # fmt: skip
    raise UnknownControlNetError(
        f"{where}: InstantID {adapter.path.name} runs with its IdentityNet (an SDXL ControlNet fed the face's "
        f"keypoints), and none was found: none beside the adapter, none whose path names InstantID or IdentityNet. "
        f"Put InstantX/InstantID's ControlNetModel/ folder (config.json + diffusion_pytorch_model.safetensors) "
        f"beside {adapter.path.name} or in the tree's controlnet/ folder as controlnet/instantid/, or name it in the "
        f"unit's identitynet"
    )


def plan_instantid_unit(index: int, unit: IPAdapterUnit, adapter: Entry, store: ModelStore,
                        pipeline: Entry | None) -> InstantIDUnitPlan:  # fmt: skip
    """Everything that can be wrong with an InstantID unit, before anything loads: the model's family, the fields
    that mean nothing to it, its IdentityNet."""
    where, spec = f"ip_adapters.{index}", adapter.spec
    name = catalog.friendly_name(adapter.name) or adapter.name
    if pipeline is not None and (pipeline.spec.architecture != spec.architecture
                                 or pipeline.spec.cross_attention_dim != spec.cross_attention_dim):  # fmt: skip
        p = pipeline.spec
        raise IncompatibleError(
            f"{where}: InstantID {name} ({Path(spec.path).name}) is for {spec.family} models (it reads InsightFace "
            f"antelopev2 face_embeds[{spec.embed_dim}] and attends at width {spec.cross_attention_dim}), but model "
            f"{pipeline.name} is {p.family}. Use an SDXL model, or a FaceID adapter made for {p.family}"
        )
    for field_name, given in (("embeddings", unit.embeddings), ("masks", unit.masks),
                              ("negative_images", unit.negative_images), ("encoder", unit.encoder),
                              ("faceid_version", unit.faceid_version), ("structure", unit.structure != 1.0),
                              ("average", unit.average)):  # fmt: skip
        if given:
            raise RequestError(f"{where}.{field_name}: not read by InstantID units (one face, its embedding and "
                               f"keypoints); remove it")  # fmt: skip
    if len(unit.images) > 1:
        raise RequestError(f"{where}.images: {len(unit.images)} images, but InstantID reads one face; give one")
    if unit.face_embeddings is not None and unit.pose_image is None and unit.controlnet_scale != 0:
        raise RequestError(f"{where}.face_embeddings: the IdentityNet reads the face's keypoints, which face "
                           f"embeddings do not carry; give the face image, or a pose_image with them")  # fmt: skip
    weights = unit_weights(index, unit, adapter, store, pipeline)
    source = "face embeddings given" if unit.face_embeddings is not None else "InsightFace antelopev2 of the image"
    why = f"{name} consumes {spec.needs}: {source} (no image encoder)"
    if unit.controlnet_scale == 0:  # the adapter alone (the extension's embedding unit without a keypoints unit)
        if unit.pose_image is not None or unit.identitynet:
            raise RequestError(f"{where}.controlnet_scale: 0 runs no IdentityNet, so pose_image and identitynet "
                               f"would change nothing; remove them, or give a scale")  # fmt: skip
        return InstantIDUnitPlan(index, unit, adapter, None, f"{why}; no IdentityNet (controlnet_scale 0)", weights)
    identitynet = find_identitynet(adapter, store, unit.identitynet, where)
    if identitynet.spec.unsupported:
        raise IncompatibleError(f"{where}.identitynet: {identitynet.spec.unsupported}")
    if pipeline is not None:
        problem = identitynet.spec.mismatch(pipeline.spec)
        if problem:
            raise IncompatibleError(f"{where}.identitynet: {problem}")
    why = f"{why}; IdentityNet {identitynet.name}"
    return InstantIDUnitPlan(index, unit, adapter, None, why, weights, None, identitynet)


def check_face_pack(units, state) -> None:
    """The plan's check, before anything loads: an InstantID unit that reads an image (its face, or a pose_image's
    keypoints) has InsightFace installed and the antelopev2 pack found, else refused as loading them would be."""
    for u in units:
        if u.unit.face_embeddings is None:
            state.faces.check(FACE_PACK, "InstantID", f"ip_adapters.{u.index}")
        elif u.unit.pose_image is not None:
            state.faces.check(FACE_PACK, "InstantID", f"ip_adapters.{u.index}.pose_image")


def identity_units(units) -> tuple[IdentityNetUnit, ...]:
    """The IdentityNets the request's InstantID units bring to its ControlNets."""
    return tuple(IdentityNetUnit(u.index, u.identitynet, u.controlnet_scale, u.link)
                 for u in units if isinstance(u, InstantIDUnitPlan) and u.identitynet is not None)  # fmt: skip


def listing(entry: Entry, store: ModelStore) -> dict:
    """`imprompt models`' words for an InstantID file: the face pack and IdentityNet it runs with, and whether each
    is present (the pack looked for where a request looks, without a configured --insightface-root)."""
    from ..ipadapter.faces import FaceAnalyzer, insightface_roots

    pack = FaceAnalyzer(insightface_roots(store.roots)).find_pack(FACE_PACK)
    item = {"encoder": f"InsightFace {FACE_PACK}", "encoder_present": pack is not None, "face_pack": FACE_PACK,
            "face_pack_present": pack is not None, "face_pack_path": str(pack) if pack else None}  # fmt: skip
    try:
        net = find_identitynet(entry, store, None, entry.name)
        item.update(identitynet=net.name, identitynet_present=True)
    except ImpromptError as exc:  # none, or ambiguous: a request must name it (identitynet)
        best, others = identitynet_candidates(entry, store)
        item.update(identitynet=None, identitynet_present=bool(best or others), identitynet_problem=str(exc),
                    identitynet_ambiguous=bool(best or others),
                    identitynet_candidates=[e.name for e in best or others])  # fmt: skip
    return item
