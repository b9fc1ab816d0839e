"""Reference images -> embeddings, each by the encoder its adapter needs; both cached.

The engine, not the diffusion pipeline, owns the encoders: each unit is encoded by the encoder its adapter needs
(chosen in `plan.py`) and the pipeline only ever sees finished embeddings. Embeddings are cached by encoder
identity + image content + output kind, so a reference image used again costs a dictionary lookup, and an
encoder is loaded only when some embedding is actually missing. Saved embeddings (`imprompt embed`) are written
and read here too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace

import torch
from PIL import Image

from ..errors import IncompatibleError, RequestError
from ..loading.encoders import image_processor, load_encoder
from ..loading.tensors import read_tensors
from ..models.specs import EMBEDDINGS_FORMAT, EncoderSpec
from ..models.store import Entry
from ..util.cache import ByteLRU, module_bytes
from ..util.images import image_digest

log = logging.getLogger("imprompt")


@dataclass
class LoadedEncoder:
    key: tuple
    spec: EncoderSpec
    model: torch.nn.Module
    processor: object


@dataclass
class UnitEmbeddings:
    """What a unit hands the pipeline, and how it was obtained (for the result's info)."""

    positive: torch.Tensor  # [images, ...] — image_embeds [n, D] or hidden states [n, tokens, H]
    negative: torch.Tensor  # same shape: zeros (image_embeds) or the encoding of an all-zero image
    encoder_source: str  # "loaded" | "cache" | "not needed" (every embedding was cached)
    embeddings: list[str] = field(default_factory=list)  # per image: "cache" | "encoded"
    clip: UnitEmbeddings | None = None  # FaceID Plus: CLIP hidden states of the aligned face crops
    faces: list = field(default_factory=list)  # FaceID from images: the `Face` InsightFace found in each

    def to(self, device) -> UnitEmbeddings:
        """A copy whose tensors are on `device` (the CPU, to travel between a cluster's workers)."""
        clip = self.clip.to(device) if self.clip is not None else None
        return replace(self, positive=self.positive.to(device), negative=self.negative.to(device), clip=clip)

    def for_pipeline(self, classifier_free_guidance: bool) -> torch.Tensor:
        """diffusers' `ip_adapter_image_embeds` element: [1, n, ...], or cat([negative, positive]) under CFG."""
        positive = self.positive.unsqueeze(0)
        if not classifier_free_guidance:
            return positive
        return torch.cat([self.negative.unsqueeze(0), positive])


BLACK_IMAGE = Image.new("RGB", (64, 64))  # what diffusers' FluxPipeline encodes as its default negative image


def unconditional(spec, true_cfg: bool = True) -> str:
    """What diffusers' pipeline for an adapter's family feeds its negative (unconditional) branch: zeros of the
    image_embeds (SD 1.5 / SDXL Base) or of SigLIP's hidden states (SD3: `torch.zeros_like`), the encoding of an
    all-zero input (Plus / Full Face hidden states), or of a black image (FLUX, under true CFG; without it FLUX's
    pipeline reads no negative, so none is encoded)."""
    if spec.architecture == "flux":
        return "black-image" if true_cfg else "zeros"
    if spec.architecture == "sd3" or spec.consumes == "image_embeds":
        return "zeros"
    return "zero-input"


class ImageEmbedder:
    """Reference images -> embeddings, each by the encoder its unit's adapter needs; loaded encoders and computed
    embeddings are both kept, in byte-bounded caches."""

    def __init__(self, device: torch.device, dtype: torch.dtype, budget_bytes: int, embedding_budget_bytes: int):
        self.device, self.dtype = device, dtype
        self.encoders = ByteLRU("encoders", budget_bytes)
        self.embeddings = ByteLRU("embeddings", embedding_budget_bytes)

    def embed(
        self,
        entry: Entry,
        output: str,
        images: list,
        adapter: str,
        why: str,
        events: list,
        negatives: list | None = None,
        average: bool = False,
        unconditional_kind: str | None = None,
    ) -> UnitEmbeddings:
        """Embeddings of `images` as `output` ("image_embeds" | "hidden_states") from the encoder at `entry`.

        The negative branch is what diffusers' pipeline for the adapter's family uses (`unconditional`; by default
        zeros for image_embeds, the encoding of an all-zero input for hidden states), unless `negatives` gives
        images to encode instead (one, or one per image). `average` folds all images into one set of tokens."""
        unconditional_kind = unconditional_kind or ("zeros" if output == "image_embeds" else "zero-input")
        encoder_key = entry.key(self.dtype, self.device)
        self._forget_older_versions(encoder_key, events)
        source = {"value": "not needed"}
        encoder = None

        def embedding(image) -> tuple[torch.Tensor, str]:
            """One image's embedding and where it came from ("cache" | "encoded"); None: the all-zero input."""
            nonlocal encoder
            key = (encoder_key, output, image_digest(image) if image is not None else "all-zero input")
            cached = self.embeddings.get(key)
            if cached is not None:
                return cached, "cache"
            if encoder is None:
                encoder = self._encoder(entry, encoder_key, adapter, why, events, source)
            tensor = _encode(encoder, output, image=image)
            self.embeddings.put(key, tensor, _nbytes(tensor), label=f"{output} {key[2][:12]}")
            return tensor, "encoded"

        encoded = [embedding(image) for image in images]
        positive = torch.stack([tensor for tensor, _ in encoded])
        if negatives:
            negative = torch.stack([embedding(image)[0] for image in negatives]).expand_as(positive)
        elif unconditional_kind == "zeros":
            negative = torch.zeros_like(positive)  # diffusers' unconditional image embedding
        elif unconditional_kind == "black-image":
            negative = embedding(BLACK_IMAGE)[0].unsqueeze(0).expand_as(positive)
        else:
            negative = embedding(None)[0].unsqueeze(0).expand_as(positive)
        if average:
            positive, negative = positive.mean(0, keepdim=True), negative.mean(0, keepdim=True)
        return UnitEmbeddings(positive, negative, source["value"], [origin for _, origin in encoded])

    def _encoder(self, entry: Entry, key: tuple, adapter: str, why: str, events: list, source: dict) -> LoadedEncoder:
        name = entry.name
        loaded = self.encoders.get(key)
        if loaded is not None:
            source["value"] = "cache"
            log.info("encoder %s reused from cache for %s", name, adapter)
            events.append({"event": "encoder_reused", "encoder": name, "for": adapter, "why": why})
            return loaded
        started = time.perf_counter()
        model = load_encoder(entry.spec, self.device, self.dtype)
        loaded = LoadedEncoder(key, entry.spec, model, image_processor(entry.spec))
        seconds = time.perf_counter() - started
        nbytes = module_bytes(model)
        evicted = self.encoders.put(key, loaded, nbytes, label=name)
        source["value"] = "loaded"
        log.info("encoder %s loaded for %s in %.2f s (%s): %s", name, adapter, seconds, _mib(nbytes), why)
        events.append(
            {"event": "encoder_loaded", "encoder": name, "for": adapter, "why": why, "seconds": round(seconds, 4),
             "bytes": nbytes}
        )  # fmt: skip
        for old in evicted:
            reason = f"cache budget {_mib(self.encoders.budget_bytes)} needed room for {name}"
            log.info("encoder %s evicted (%s)", old.label, reason)
            events.append({"event": "encoder_evicted", "encoder": old.label, "why": reason})
        return loaded

    def _forget_older_versions(self, key: tuple, events: list) -> None:
        """Drop the encoder and embeddings made from an earlier version of this file (same path, other
        fingerprint): they are never served (their keys differ) but they should not hold the budget either."""
        for old in self.encoders.discard_older_versions(key):
            log.info("encoder %s dropped: its file changed on disk", old.label)
            events.append({"event": "encoder_evicted", "encoder": old.label, "why": "its file changed on disk"})
        self.embeddings.discard_where(lambda k: k[0][0] == key[0] and k[0] != key)

    def load(self, entry: Entry, why: str, events: list) -> LoadedEncoder:
        """The encoder at `entry`, loaded now unless it is loaded already."""
        key = entry.key(self.dtype, self.device)
        self._forget_older_versions(key, events)
        return self._encoder(entry, key, "no unit yet", why, events, {})

    def unload(self, key: tuple) -> bool:
        """Drop one loaded encoder (its embeddings stay: they are valid as long as its file is unchanged)."""
        found = key in self.encoders
        self.encoders.discard(key)
        if found:
            log.info("encoder %s unloaded", key[0])
        return found

    def clear(self) -> dict:
        return {"encoders": self.encoders.clear(), "embeddings": self.embeddings.clear()}


@torch.no_grad()
def _encode(encoder: LoadedEncoder, output: str, image=None) -> torch.Tensor:
    """One image at a time (batch of 1), so an embedding is bit-identical whether it is computed alone, with
    others, or taken from the cache. `image=None` encodes an all-zero input (the negative for hidden states)."""
    if image is None:
        size = encoder.spec.image_size
        pixels = torch.zeros(1, 3, size, size)
    else:
        pixels = encoder.processor(images=image, return_tensors="pt").pixel_values
    pixels = pixels.to(device=encoder.model.device, dtype=encoder.model.dtype)
    if output == "image_embeds":
        return encoder.model(pixels).image_embeds[0]
    if output == "last_hidden_state":  # after the tower's final norm: what FLUX Redux reads (diffusers' prior does)
        return encoder.model(pixels).last_hidden_state[0]
    return encoder.model(pixels, output_hidden_states=True).hidden_states[-2][0]


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------- saved embeddings


def save_embeddings(embeddings: UnitEmbeddings, path, output: str, encoder: Entry | None, image_hashes: list[str],
                    face_embedding: str | None = None):  # fmt: skip
    """Write a unit's embeddings with what pairing needs to know: output kind and width, encoder identity. FaceID
    units save their face embeddings (`face_embedding`: normed | raw) and, for Plus, the face crops' hidden states."""
    from safetensors.torch import save_file

    metadata = {
        "format": EMBEDDINGS_FORMAT,
        "output": output,
        "width": str(embeddings.positive.shape[-1]),
        "image_hashes": json.dumps(image_hashes),
    }
    if encoder is not None:
        metadata.update(encoder=encoder.name, encoder_architecture=encoder.spec.architecture,
                        encoder_hidden_size=str(encoder.spec.hidden_size),
                        encoder_projection_dim=str(encoder.spec.projection_dim))  # fmt: skip
    if face_embedding:
        metadata["face_embedding"] = face_embedding
        metadata.setdefault("encoder", "InsightFace")
    parts = {"": embeddings, "clip_": embeddings.clip}
    tensors = {f"{prefix}{branch}": getattr(part, branch).detach().to("cpu", torch.float32).contiguous()
               for prefix, part in parts.items() if part is not None for branch in ("positive", "negative")}  # fmt: skip
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_saved_embeddings(entry: Entry, device, dtype, average: bool = False) -> UnitEmbeddings:
    """Saved embeddings as a unit hands them on; `average` folds several images' into one, as for images."""
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in read_tensors(entry.path).items()}
    origins = ["saved"] * tensors["positive"].shape[0]  # one per image saved, averaged or not
    if average:
        tensors = {k: v.mean(0, keepdim=True) for k, v in tensors.items()}
    clip = None
    if "clip_positive" in tensors:
        clip = UnitEmbeddings(tensors["clip_positive"], tensors["clip_negative"], "saved embeddings", origins)
    return UnitEmbeddings(tensors["positive"], tensors["negative"], "saved embeddings", origins, clip)


def face_embeddings(faces: torch.Tensor, width: int, average: bool, where: str, device, dtype,
                    origins: list[str], kind: str = "InsightFace's normed_embedding") -> UnitEmbeddings:  # fmt: skip
    """FaceID: face embeddings [faces, 512] as the pipeline takes them. The negative branch is zeros, as in
    diffusers' FaceID examples; several faces give several token sets (Portrait's way), or one averaged set."""
    if faces.ndim == 1:
        faces = faces.unsqueeze(0)
    if faces.ndim != 2 or faces.shape[1] != width or faces.shape[0] == 0:
        raise IncompatibleError(
            f"{where}: face embeddings of shape {list(faces.shape)}; the adapter consumes {width}-d face embeddings "
            f"({kind}), one row per face"
        )
    if average:
        faces = faces.mean(dim=0, keepdim=True)
    faces = faces.to(device=device, dtype=dtype)
    return UnitEmbeddings(faces, torch.zeros_like(faces), "not needed", origins)


def given_face_embeddings(value, width: int, average: bool, allow_paths: bool, where: str, device, dtype,
                          kind: str = "InsightFace's normed_embedding") -> UnitEmbeddings:  # fmt: skip
    """FaceID: face embeddings the client computed (InsightFace's normed 512-d `normed_embedding`, one per face),
    inline or as a `.npy` / `.safetensors` file. `kind`: what the adapter reads, for the error."""
    if isinstance(value, str):
        faces = _read_face_file(value, allow_paths, where)
    else:
        faces = torch.tensor(value, dtype=torch.float32)
    return face_embeddings(faces, width, average, where, device, dtype, ["given"] * max(1, len(faces)), kind)


def _read_face_file(name: str, allow_paths: bool, where: str) -> torch.Tensor:
    from pathlib import Path

    import numpy as np

    path = Path(name).expanduser()
    if not allow_paths:
        raise RequestError(f"{where}: face embeddings as a file path are not accepted here; send them inline")
    if not path.is_file():
        raise RequestError(f"{where}: face embeddings file {name!r} not found")
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        except ValueError as exc:
            raise RequestError(f"{where}: {path} is not a plain .npy array of numbers ({exc})") from None
    tensors = read_tensors(path)
    if len(tensors) != 1:
        raise RequestError(f"{where}: {path} should hold one tensor of face embeddings, found {sorted(tensors)[:4]}")
    return next(iter(tensors.values())).float()
