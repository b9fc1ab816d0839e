"""`imprompt download`: fetch published adapters, and the encoder each one needs, into a models folder.

Needs internet (users have it; the test machine does not, so tests pass a fake `fetch`). Files land where the
store finds them: adapters in `DIR/ipadapter/`, encoders as folders in `DIR/clip_vision/<family>/`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..errors import UnknownAdapterError
from . import catalog

log = logging.getLogger("imprompt")

# Which encoder each published adapter was trained with. Only used to decide what to download: at generation
# time the encoder is chosen from the adapter's tensors.
TRAINED_WITH = {
    "Base ViT-G": catalog.VIT_BIGG,
    "Base SDXL": catalog.VIT_BIGG,
}


def download(names: list[str], models: Path, fetch=None) -> list[Path]:
    """Download the adapters called `names` (friendly names) and their encoders. Returns the paths written."""
    if fetch is None:
        from huggingface_hub import hf_hub_download as fetch
    models = Path(models)
    written = []
    for name in names:
        known = catalog.known_adapter(name)
        if known is None:
            available = ", ".join(a.name for a in catalog.KNOWN_ADAPTERS)
            raise UnknownAdapterError(f"no published adapter called {name!r}; known: {available}")
        filename = f"{known.stems[0]}.safetensors"
        target = models / "ipadapter" / filename
        if not target.exists():
            log.info("downloading %s from %s", filename, known.hub_repo)
            source = fetch(repo_id=known.hub_repo, filename=filename, subfolder=known.hub_subfolder or None)
            _place(Path(source), target)
        written.append(target)
        family = TRAINED_WITH.get(known.name, catalog.VIT_H)
        folder = models / "clip_vision" / family.name
        if not (folder / "model.safetensors").exists():
            log.info("downloading the %s image encoder from %s/%s", family.name, family.hub_repo, family.hub_subfolder)
            for file in ("config.json", "model.safetensors"):
                source = fetch(repo_id=family.hub_repo, filename=file, subfolder=family.hub_subfolder or None)
                _place(Path(source), folder / file)
        written.append(folder)
    return written


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)  # never leave a half-copied checkpoint where the store would find it
