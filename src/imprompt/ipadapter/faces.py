"""Reference images of faces -> InsightFace face embeddings, keypoints and aligned crops, for FaceID and InstantID.

InsightFace (the optional extra `pip install 'imprompt[faceid]'`) detects the face, aligns it on its five landmarks
(`face_align.norm_crop`) and computes the ArcFace embedding, called exactly as h94's FaceID examples, diffusers'
FaceID docs and SD.Next call it: the image in BGR order, the first (highest-scoring) face, `normed_embedding`, a
224-pixel aligned crop for the Plus family's CLIP encoder. imprompt finds the model pack where users keep it, loads
it once, keeps each image's result by content, and turns a missing install, a missing pack or an image without a
face into a typed error that says what to do. InstantID's units read another pack, `antelopev2`, found the same
way, and take the largest face's raw `embedding` and its five keypoints, as InstantID's examples do.
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
ANTELOPE_PACK = "antelopev2"  # InstantID's and PuLID's: SCRFD-10G detector + ArcFace (glintr100, ResNet-100)
PACK_FILES = {MODEL_PACK: "det_10g.onnx, w600k_r50.onnx, ...",
              ANTELOPE_PACK: "scrfd_10g_bnkps.onnx, glintr100.onnx, ..."}  # fmt: skip
PACK_USERS = {MODEL_PACK: "FaceID", ANTELOPE_PACK: "InstantID or PuLID"}
INSIGHTFACE_MODULES = ("insightface", "onnxruntime")  # what `from insightface.app import FaceAnalysis` needs
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
    kps: np.ndarray | None = None  # [5, 2]: eyes, nose, mouth corners in the image's pixels (InstantID draws them)

    def crop_image(self) -> Image.Image:
        """The crop as the CLIP image processor receives it: the BGR array taken as RGB channels, which is what
        h94's IP-Adapter, diffusers' FaceID docs and SD.Next all pass (the Plus adapters were used that way)."""
        return Image.fromarray(self.crop)

    def crop_preview(self) -> Image.Image:
        """The crop in true colours, for people to look at."""
        return Image.fromarray(self.crop[:, :, ::-1].copy())


SDNEXT_HF_CACHE = "huggingface"  # SD.Next's Hugging Face cache (`hfcache_dir`): <models>/huggingface by default
PULID_HF_FOLDER = "models--ToTheBeginning--PuLID"  # where SD.Next's SDXL PuLID unpacks antelopev2 in that cache


def hub_caches(models_roots: list[Path]) -> list[Path]:
    """The Hugging Face hub cache folders where PuLID's code put its face files, in order: SD.Next's
    `<models>/huggingface` (it sets HF_HUB_CACHE there), then the hub cache of this environment (`$HF_HUB_CACHE`,
    `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`, `~/.cache/huggingface/hub`). Nothing is downloaded."""
    caches = [Path(root) / SDNEXT_HF_CACHE for root in models_roots]
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            caches.append(Path(os.environ[variable]).expanduser())
    if os.environ.get("HF_HOME"):
        caches.append(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    if os.environ.get("XDG_CACHE_HOME"):
        caches.append(Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub")
    caches.append(Path("~/.cache/huggingface/hub").expanduser())
    return list(dict.fromkeys(caches))


def insightface_roots(models_roots: list[Path], configured: str | os.PathLike | None = None) -> list[Path]:
    """Where a model pack is looked for, in order: the configured folder (`--insightface-root`,
    `IMPROMPT_INSIGHTFACE_ROOT`), `insightface/` in a models folder (ComfyUI's `models/insightface`), the Hugging
    Face caches' `insightface/` (nunchaku's FLUX PuLID, so SD.Next's: `<models>/huggingface/insightface`) and
    `models--ToTheBeginning--PuLID/` (SD.Next's SDXL PuLID), and InsightFace's own default `~/.insightface`. Each
    holds `models/<pack>/*.onnx`."""
    roots = []
    if configured or os.environ.get("IMPROMPT_INSIGHTFACE_ROOT"):
        roots.append(Path(configured or os.environ["IMPROMPT_INSIGHTFACE_ROOT"]).expanduser())
    roots += [root / "insightface" for root in models_roots]
    roots += [cache / name for cache in hub_caches(models_roots) for name in ("insightface", PULID_HF_FOLDER)]
    roots.append(Path("~/.insightface").expanduser())
    return list(dict.fromkeys(roots))


class FaceAnalyzer:
    """InsightFace's FaceAnalysis of each model pack (`buffalo_l` for FaceID, `antelopev2` for InstantID), loaded
    on first use, and each image's face kept by image content, pack and choice."""

    def __init__(self, roots: list[Path], budget_bytes: int = 64 * 2**20):
        self.roots = roots
        self.apps: dict[str, object] = {}
        self.packs: dict[str, Path] = {}  # pack name -> the folder it was loaded from
        self.faces = ByteLRU("faces", budget_bytes)

    @property
    def pack(self) -> Path | None:
        """The FaceID pack's folder, once loaded."""
        return self.packs.get(MODEL_PACK)

    def face(self, image: Image.Image, where: str, events: list, pack: str = MODEL_PACK,
             largest: bool = False) -> tuple[Face, str]:  # fmt: skip
        """A face InsightFace's `pack` finds in `image` (the first, as FaceID tools take it; with `largest`, the one
        of largest box, as InstantID's code takes it), and whether it came from the cache ("cache" | "detected")."""
        key = f"{pack}:{'largest' if largest else 'first'}:{image_digest(image)}"
        cached = self.faces.get(key)
        if cached is not None:
            return cached, "cache"
        app = self._app(events, pack)
        import cv2

        bgr = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)
        found = app.get(bgr)
        if not found:
            raise NoFaceError(
                f"{where}: no face found in the image ({image.width}x{image.height}) by InsightFace's detector "
                f"({self.packs[pack]}); give a photo where one face is clearly visible, or the face embeddings "
                f"themselves (face_embeddings)"
            )
        from insightface.utils import face_align

        first = found[0]
        if largest:  # the last of the faces sorted by box area, as InstantID's examples pick it
            first = sorted(found, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))[-1]
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
            kps=np.asarray(first.kps, dtype=np.float32),
        )
        self.faces.put(key, face, face.crop.nbytes + 2 * face.embedding.nbytes, label=f"face {key[:40]}")
        return face, "detected"

    def recognizer(self, events: list, pack: str = MODEL_PACK):
        """The pack's recognition model (InsightFace's ArcFaceONNX: `get_feat` of aligned BGR crops), loaded with
        the pack: PuLID embeds its aligned crop with it where the detector found no face."""
        return self._app(events, pack).models["recognition"]

    def find_pack(self, pack: str) -> Path | None:
        """Where `pack` is: the first root holding `models/<pack>/*.onnx`; or `models/<pack>/<pack>/*.onnx`, where
        unzipping antelopev2.zip inside a folder of its name leaves it."""
        for root in self.roots:
            for folder in (root / "models" / pack, root / "models" / pack / pack):
                if any(folder.glob("*.onnx")):
                    return folder
        return None

    def check(self, pack: str, needed_by: str, where: str) -> None:
        """The plan's check, before anything loads: InsightFace is installed (found without importing it) and
        `pack` is where it is looked for; else the `MissingFaceAnalysisError` loading it would raise, `where` first."""
        if pack in self.apps:
            return
        import importlib.util

        for module in INSIGHTFACE_MODULES:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise not_installed(f"No module named '{module}'", needed_by, where)
        if self.find_pack(pack) is None:
            raise pack_missing(pack, self.roots, needed_by, where)

    def _app(self, events: list, pack: str = MODEL_PACK):
        if pack in self.apps:
            return self.apps[pack]
        needed_by = PACK_USERS.get(pack, "face analysis")
        try:
            from insightface.app import FaceAnalysis
        except ImportError as exc:
            raise not_installed(str(exc), needed_by) from None
        folder = self.find_pack(pack)
        if folder is None:
            raise pack_missing(pack, self.roots, needed_by)
        started = time.perf_counter()
        # onnxruntime's providers as installed (CUDA with onnxruntime-gpu), as SD.Next and the upstream examples use
        # the pack's absolute path as its name: InsightFace 0.7 joins it to root, 2.x takes a folder as it is
        app = FaceAnalysis(name=str(folder), root=str(folder.parent.parent), allowed_modules=["detection", "recognition"])
        if "recognition" not in app.models:
            raise MissingFaceAnalysisError(
                f"InsightFace's {pack} pack in {folder} has no recognition model ({PACK_FILES.get(pack, '')}); "
                f"unzip the whole pack there"
            )
        app.prepare(ctx_id=0, det_size=DETECTION_SIZE)
        seconds = time.perf_counter() - started
        log.info("InsightFace %s loaded from %s in %.2f s", pack, folder, seconds)
        events.append({"event": "face_analysis_loaded", "pack": str(folder), "seconds": round(seconds, 4)})
        self.apps[pack], self.packs[pack] = app, folder
        return app

    def clear(self) -> int:
        return self.faces.clear()


def not_installed(problem: str, needed_by: str, where: str | None = None) -> MissingFaceAnalysisError:
    """InsightFace (or what it imports) is not installed: the error, said the same in the plan and at load."""
    return MissingFaceAnalysisError(
        f"{where + ': ' if where else ''}{needed_by} from images needs InsightFace, which is not installed "
        f"({problem}). Install it with `pip install 'imprompt[faceid]'`, or give the face embeddings themselves "
        f"(face_embeddings)"
    )


def pack_missing(pack: str, roots: list[Path], needed_by: str, where: str | None = None) -> MissingFaceAnalysisError:
    """`pack` is in none of `roots`: the error, said the same in the plan and at load."""
    searched = ", ".join(str(root / "models" / pack) for root in roots)
    return MissingFaceAnalysisError(
        f"{where + ': ' if where else ''}{needed_by} from images needs InsightFace's {pack} model pack, found in none "
        f"of: {searched}. Unzip {pack}.zip ({PACK_FILES.get(pack, '*.onnx')}; InsightFace's release, or "
        f"`FaceAnalysis(name='{pack}')` downloads it to ~/.insightface/models) into one of them, or set "
        f"--insightface-root / IMPROMPT_INSIGHTFACE_ROOT"
    )
