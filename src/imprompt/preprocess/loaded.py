"""The preprocessors' own models, loaded once and kept while their file is unchanged, within one byte budget.

DWPose's ONNX graphs, the lineart and HED networks and Depth Anything are kept by file fingerprint in `MODELS`
(least recently used out first; `cached_model`), which the engine reports with its caches and empties with them. They are the
process's: every engine in it reads the same read-only weights.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from ..util.cache import ByteLRU, module_bytes

MODELS = ByteLRU("annotator models", 2 * 2**30)  # DWPose's two graphs are 0.4 GB, Depth Anything large 1.3 GB
LOCK = threading.Lock()


def cached_model(path, build: Callable[[], object], what: str = "") -> object:
    """The model `build` makes from the file at `path`: from `MODELS` while the file is unchanged, else built now
    (a model built from an earlier version of the file is let go)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, what)
    with LOCK:
        model = MODELS.get(key)
        if model is None:
            model = build()
            MODELS.discard_where(lambda k: k[0] == key[0] and k[3] == what and k != key)
            nbytes = module_bytes(model) if hasattr(model, "parameters") else sum_file_bytes(path)
            MODELS.put(key, model, nbytes, label=f"{path.name} {what}".strip())
    return model


def sum_file_bytes(path: Path) -> int:
    """What a model that is not a torch module (an ONNX Runtime session) holds: about its file's size."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
