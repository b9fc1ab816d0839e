"""Which workers a request needs: the model ids Ray Serve's multiplexing routes by, read from the request's plan.

A pipeline id names one base model file as it is on disk (path and fingerprint), an encoder id one image encoder
the same way (one cluster loads every model in one dtype, its workers' own). Each worker reports the ids it holds; Ray Serve's router sends a request to a replica that
reports the request's id, so a model is loaded on one replica and found there again. Every worker reads the same
models folder at the same path (one machine, or a shared read-only mount), so an id means the same files on every
node; a worker checks that its own plan gives the id it was sent for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..models.parts import NO_PARTS, ModelParts
from ..models.store import Entry
from ..conditioning.ip_adapter import UnitPlan
from ..plan import Plan


@dataclass(frozen=True)
class Route:
    pipeline: str  # the generator id
    encoders: dict[int, str]  # unit index -> encoder id, for the units an encoder worker encodes


def model_id(entry: Entry, parts: ModelParts = NO_PARTS) -> str:
    """`name@digest`: readable in Ray's logs and state, and a new id whenever the file changes (or, for a
    transformer alone, whenever it runs with other parts: another VAE or text encoder is another pipeline)."""
    digest = hashlib.sha1(repr(entry.key() + parts.key()).encode()).hexdigest()[:12]
    return f"{entry.name}@{digest}"


def encoded_by_encoder_worker(unit: UnitPlan) -> bool:
    """Reference images through a CLIP/SigLIP-style encoder. Saved or given embeddings need no encoder; FaceID from
    images needs InsightFace beside its encoder, so the generator worker makes those (as the single process does)."""
    return (
        unit.encoder is not None
        and unit.embeddings is None
        and unit.unit.face_embeddings is None
        and unit.output != "faceid_embeds"
    )


def route(plan: Plan) -> Route:
    encoders = {u.index: model_id(u.encoder) for u in plan.units if encoded_by_encoder_worker(u)}
    return Route(model_id(plan.pipeline, plan.parts), encoders)
