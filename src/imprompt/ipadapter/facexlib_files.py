"""Where facexlib's two weight files that PuLID's face preprocessing runs are found, and the error when one is not.

PuLID (ToTheBeginning/PuLID `get_id_embedding`) detects and aligns the face with facexlib's RetinaFace
(`detection_Resnet50_Final.pth`) and parses it with facexlib's BiSeNet (`parsing_bisenet.pth`); facexlib downloads
them on first use into its own package folder (`facexlib/weights/`), ComfyUI's PuLID nodes into
`ComfyUI/models/facexlib/`. imprompt never downloads at request time: it looks where users have them, before
anything loads, and a missing one is a `MissingFaceAnalysisError` naming the file, its release URL and the folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import MissingFaceAnalysisError

DETECTOR = "detection_Resnet50_Final.pth"
PARSER = "parsing_bisenet.pth"
# facexlib's own URLs (`facexlib/detection/__init__.py`, `facexlib/parsing/__init__.py`): the parser is v0.2.0's
RELEASES = {
    DETECTOR: "https://github.com/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth",
    PARSER: "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
}
ROLES = {DETECTOR: "RetinaFace face detector", PARSER: "BiSeNet face parser"}
SUBFOLDERS = ("", "weights", "detection", "parsing")  # below a facexlib folder: flat, or as some installs sort them


def facexlib_package_weights() -> Path | None:
    """facexlib's own download folder (`<site-packages>/facexlib/weights/`) where the package is installed; found
    without importing it (facexlib imports torchvision)."""
    try:
        spec = importlib.util.find_spec("facexlib")
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    return Path(locations[0]) / "weights" if locations else None


def facexlib_folders(models_roots: list[Path], face_roots: list[Path]) -> list[Path]:
    """Where the files are looked for, in order: `facexlib/` in each models folder (ComfyUI's `models/facexlib`),
    the InsightFace roots (`faces.insightface_roots`: where the antelopev2 pack already is) and their `models/`,
    then facexlib's own `facexlib/weights/`."""
    folders = [Path(root) / "facexlib" / sub for root in models_roots for sub in SUBFOLDERS]
    folders += [folder for root in face_roots for folder in (Path(root), Path(root) / "models")]
    if (package := facexlib_package_weights()) is not None:
        folders.append(package)
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
        searched += [f"{r} (and its models/)" for r in face_roots]
        if (package := facexlib_package_weights()) is not None:
            searched.append(str(package))
        instead = (" (or give the face embedding with its aligned crop, face_embeddings and aligned_face, which need no "
                   "detector)" if missing == [DETECTOR] else "")  # fmt: skip
        raise MissingFaceAnalysisError(
            f"{needed_by} needs {files}; found in none of: {'; '.join(searched)}. Download "
            f"{'them' if len(missing) > 1 else 'it'} into {place} (ComfyUI's models/facexlib){instead}"
        )
    return found  # type: ignore[return-value]


def presence(models_roots: list[Path], face_roots: list[Path]) -> dict:
    """`imprompt models`' words: each file's path, or None where it is missing."""
    folders = facexlib_folders(models_roots, face_roots)
    return {name: (str(path) if (path := find_file(name, folders)) else None) for name in (DETECTOR, PARSER)}
