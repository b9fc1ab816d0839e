"""Reference images of faces -> InsightFace face embeddings and aligned face crops, for FaceID units.

InsightFace (the optional extra `pip install 'imprompt[faceid]'`) detects the face, aligns it on its five landmarks
(`face_align.norm_crop`) and computes the ArcFace embedding, called exactly as h94's FaceID examples, diffusers'
FaceID docs and SD.Next call it: the image in BGR order, the first (highest-scoring) face, `normed_embedding`, a
224-pixel aligned crop for the Plus family's CLIP encoder. imprompt finds the model pack where users keep it, loads
it once, keeps each image's result by content, and turns a missing install, a missing pack or an image without a
face into a typed error that says what to do.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MissingFaceAnalysisError, NoFaceError
from ..util.cache import ByteLRU
from ..util.images import image_digest

log = logging.getLogger("imprompt")

MODEL_PACK = "buffalo_l"  # the pack every FaceID tool uses: SCRFD detector + ArcFace (w600k_r50) recognizer
DETECTION_SIZE = (640, 640)  # as h94's examples, diffusers' docs and SD.Next prepare it
CROP_SIZE = 224  # the aligned crop the Plus family's CLIP encoder reads


@dataclass(frozen=True)
class Face:
    """The face InsightFace found in one image: what FaceID adapters consume, and what the result reports."""

    normed_embedding: np.ndarray  # [512], unit length: what FaceID adapters were trained on
    embedding: np.ndarray  # [512], raw: what the Portrait SDXL "unnorm" adapter was trained on
    crop: np.ndarray  # [224, 224, 3] uint8, aligned, in InsightFace's BGR order (as upstream feeds it to CLIP)
    score: float
    box: tuple[float, float, float, float]
    faces_found: int

    def crop_image(self) -> Image.Image:
        """The crop as the CLIP image processor receives it: the BGR array taken as RGB channels, which is what
        h94's IP-Adapter, diffusers' FaceID docs and SD.Next all pass (the Plus adapters were used that way)."""
        return Image.fromarray(self.crop)

    def crop_preview(self) -> Image.Image:
        """The crop in true colours, for people to look at."""
        return Image.fromarray(self.crop[:, :, ::-1].copy())


def insightface_roots(models_roots: list[Path], configured: str | os.PathLike | None = None) -> list[Path]:
    """Where a model pack is looked for, in order: the configured folder (`--insightface-root`,
    `IMPROMPT_INSIGHTFACE_ROOT`), `insightface/` in a models folder (ComfyUI's `models/insightface`), and
    InsightFace's own default `~/.insightface`. Each holds `models/buffalo_l/*.onnx`."""
    roots = []
    if configured or os.environ.get("IMPROMPT_INSIGHTFACE_ROOT"):
        roots.append(Path(configured or os.environ["IMPROMPT_INSIGHTFACE_ROOT"]).expanduser())
    roots += [root / "insightface" for root in models_roots]
    roots.append(Path("~/.insightface").expanduser())
    return roots


class FaceAnalyzer:
    """InsightFace's FaceAnalysis, loaded on first use, and each image's face kept by image content."""

    def __init__(self, roots: list[Path], budget_bytes: int = 64 * 2**20):
        self.roots = roots
        self.app = None
        self.pack: Path | None = None
        self.faces = ByteLRU("faces", budget_bytes)

    def face(self, image: Image.Image, where: str, events: list) -> tuple[Face, str]:
        """The first face InsightFace finds in `image`, and whether it came from the cache ("cache" | "detected")."""
        key = image_digest(image)
        cached = self.faces.get(key)
        if cached is not None:
            return cached, "cache"
        app = self._app(events)
        import cv2

        bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
        found = app.get(bgr)
        if not found:
            raise NoFaceError(
                f"{where}: no face found in the image ({image.width}x{image.height}) by InsightFace's detector "
                f"({self.pack}); give a photo where one face is clearly visible, or the face embeddings themselves "
                f"(face_embeddings)"
            )
        from insightface.utils import face_align

        first = found[0]
        with warnings.catch_warnings():  # scikit-image deprecates what norm_crop calls; not the user's concern
            warnings.simplefilter("ignore", FutureWarning)
            crop = face_align.norm_crop(bgr, landmark=first.kps, image_size=CROP_SIZE)
        face = Face(
            normed_embedding=np.asarray(first.normed_embedding, dtype=np.float32),
            embedding=np.asarray(first.embedding, dtype=np.float32),
            crop=crop,
            score=float(first.det_score),
            box=tuple(round(float(v), 1) for v in first.bbox),
            faces_found=len(found),
        )
        self.faces.put(key, face, face.crop.nbytes + 2 * face.embedding.nbytes, label=f"face {key[:12]}")
        return face, "detected"

    def _app(self, events: list):
        if self.app is not None:
            return self.app
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise MissingFaceAnalysisError(
                f"FaceID from images needs InsightFace, which is not installed ({exc}). Install it with "
                f"`pip install 'imprompt[faceid]'`, or give the face embeddings themselves (face_embeddings)"
            ) from None
        pack = next((root / "models" / MODEL_PACK for root in self.roots
                     if any((root / "models" / MODEL_PACK).glob("*.onnx"))), None)  # fmt: skip
        if pack is None:
            searched = ", ".join(str(root / "models" / MODEL_PACK) for root in self.roots)
            raise MissingFaceAnalysisError(
                f"FaceID from images needs InsightFace's {MODEL_PACK} model pack, found in none of: {searched}. "
                f"Unzip {MODEL_PACK}.zip (InsightFace's release, or `FaceAnalysis(name='{MODEL_PACK}')` downloads it "
                f"to ~/.insightface/models) into one of them, or set --insightface-root / IMPROMPT_INSIGHTFACE_ROOT"
            )
        started = time.perf_counter()
        # onnxruntime's providers as installed (CUDA with onnxruntime-gpu), as SD.Next and the upstream examples use
        # the pack's absolute path as its name: InsightFace 0.7 joins it to root, 2.x takes a folder as it is
        app = FaceAnalysis(name=str(pack), root=str(pack.parent.parent), allowed_modules=["detection", "recognition"])
        if "recognition" not in app.models:
            raise MissingFaceAnalysisError(
                f"InsightFace's {MODEL_PACK} pack in {pack} has no recognition model (w600k_r50.onnx); "
                f"unzip the whole pack there"
            )
        app.prepare(ctx_id=0, det_size=DETECTION_SIZE)
        seconds = time.perf_counter() - started
        log.info("InsightFace %s loaded from %s in %.2f s", MODEL_PACK, pack, seconds)
        events.append({"event": "face_analysis_loaded", "pack": str(pack), "seconds": round(seconds, 4)})
        self.app, self.pack = app, pack
        return app

    def clear(self) -> int:
        return self.faces.clear()
