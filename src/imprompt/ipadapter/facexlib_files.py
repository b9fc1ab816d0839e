"""Where facexlib's two weight files that PuLID's face preprocessing runs are found, and the error when one is not.

PuLID (ToTheBeginning/PuLID `get_id_embedding`) detects and aligns the face with facexlib's RetinaFace
(`detection_Resnet50_Final.pth`) and parses it with facexlib's BiSeNet (`parsing_bisenet.pth`); facexlib downloads
them on first use into its own package folder (`facexlib/weights/`: PuLID's code, SD.Next's SDXL PuLID),
ComfyUI's PuLID nodes into `ComfyUI/models/facexlib/`, nunchaku's FLUX PuLID (so SD.Next's) into the Hugging Face
cache's `facexlib/` (`<models>/huggingface/facexlib/` in SD.Next), A1111's and Forge's GFPGAN the detector into
`models/GFPGAN/`. imprompt never downloads at request time: it looks where users have them, before anything loads,
and a missing one is a `MissingFaceAnalysisError` naming the file, its release URL and the folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import MissingFaceAnalysisError
from .faces import hub_caches

DETECTOR = "detection_Resnet50_Final.pth"
PARSER = "parsing_bisenet.pth"
# facexlib's own URLs (`facexlib/detection/__init__.py`, `facexlib/parsing/__init__.py`): the parser is v0.2.0's
RELEASES = {
    DETECTOR: "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
    PARSER: "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
}
RELEASE_VERSIONS = {DETECTOR: "v0.1.0", PARSER: "v0.2.0"}
ROLES = {DETECTOR: "RetinaFace face detector", PARSER: "BiSeNet face parser"}
SUBFOLDERS = ("", "weights", "detection", "parsing")  # below a facexlib folder: flat, or as some installs sort them
GFPGAN = "GFPGAN"  # A1111's and Forge's models/GFPGAN, where their GFPGAN puts facexlib's detector


def download_fix(name: str) -> str:
    """The fix for a bad copy of facexlib's `name`: its release and URL."""
    return f"Download {name} again from facexlib's release {RELEASE_VERSIONS[name]} ({RELEASES[name]})"


def facexlib_package_weights() -> Path | None:
    """facexlib's own download folder (`<site-packages>/facexlib/weights/`) where the package is installed; found
    without importing it (facexlib imports torchvision)."""
    try:
        spec = importlib.util.find_spec("facexlib")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) / "weights" if locations else None


def sdnext_venv_weights(models_roots: list[Path]) -> list[Path]:
    """facexlib's `weights/` in the SD.Next install a models folder belongs to (`<sdnext>/models` beside
    `<sdnext>/venv`), where SD.Next's SDXL PuLID lets facexlib download them."""
    found = []
    for root in models_roots:
        venv = Path(root).parent / "venv"
        found += sorted(venv.glob("lib/python3*/site-packages/facexlib/weights"))
        found += [venv / "Lib" / "site-packages" / "facexlib" / "weights"]  # Windows
    return [folder for folder in found if folder.is_dir()]


def facexlib_folders(models_roots: list[Path], face_roots: list[Path]) -> list[Path]:
    """Where the files are looked for, in order: `facexlib/` in each models folder (ComfyUI's `models/facexlib`),
    the Hugging Face caches' `facexlib/` (SD.Next's `<models>/huggingface/facexlib`, `faces.hub_caches`), the
    InsightFace roots (`faces.insightface_roots`: where the antelopev2 pack already is) and their `models/`, each
    models folder's `GFPGAN/` (the detector only), facexlib's own `facexlib/weights/`, and that of an SD.Next
    install's venv."""
    folders = [Path(root) / "facexlib" / sub for root in models_roots for sub in SUBFOLDERS]
    folders += [cache / "facexlib" for cache in hub_caches(models_roots)]
    folders += [folder for root in face_roots for folder in (Path(root), Path(root) / "models")]
    folders += [Path(root) / GFPGAN for root in models_roots]
    if (package := facexlib_package_weights()) is not None:
        folders.append(package)
    folders += sdnext_venv_weights(models_roots)
    return list(dict.fromkeys(folders))


def find_file(name: str, folders: list[Path]) -> Path | None:
    return next((folder / name for folder in folders if (folder / name).is_file()), None)


def locate(names: tuple[str, ...], models_roots: list[Path], face_roots: list[Path], needed_by: str,
           home: Path | None = None) -> dict[str, Path]:  # fmt: skip
    """The path of each of `names`; one missing is a `MissingFaceAnalysisError` naming every missing file, its
    release URL, the folder to put it in (`facexlib/` in `home`, the models folder of the file that needs them, else
    in the first) and the folders looked in."""
    folders = facexlib_folders(models_roots, face_roots)
    found = {name: find_file(name, folders) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        home = home or (Path(models_roots[0]) if models_roots else Path("<models>"))
        place = home / "facexlib"
        files = "; ".join(f"{name} (facexlib's {ROLES[name]}, {RELEASES[name]})" for name in missing)
        searched = [f"{Path(r) / 'facexlib'} (and its {', '.join(SUBFOLDERS[1:])}/)" for r in models_roots]
        searched += [str(cache / "facexlib") for cache in hub_caches(models_roots)]
        searched += [f"{r} (and its models/)" for r in face_roots]
        searched += [str(Path(r) / GFPGAN) for r in models_roots]
        if (package := facexlib_package_weights()) is not None:
            searched.append(str(package))
        searched += [str(folder) for folder in sdnext_venv_weights(models_roots)]
        instead = (" (or give the face embedding with its aligned crop, face_embeddings and aligned_face, which need no "
                   "detector)" if missing == [DETECTOR] else "")  # fmt: skip
        raise MissingFaceAnalysisError(
            f"{needed_by} needs {files}; found in none of: {'; '.join(searched)}. Download "
            f"{'them' if len(missing) > 1 else 'it'} into {place} (ComfyUI's models/facexlib; SD.Next keeps them in "
            f"models/huggingface/facexlib, which is looked in too){instead}"
        )
    return found  # type: ignore[return-value]


def presence(models_roots: list[Path], face_roots: list[Path]) -> dict:
    """`imprompt models`' words: each file's path, or None where it is missing."""
    folders = facexlib_folders(models_roots, face_roots)
    return {name: (str(path) if (path := find_file(name, folders)) else None) for name in (DETECTOR, PARSER)}
