"""`imprompt download`: fetch published adapters, and the encoder each one needs, into a models folder.

Needs internet (users have it; the test machine does not, so tests pass a fake `fetch`).
"""

from __future__ import annotations

import logging
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
    """Download the adapters called `names` (friendly names) and the encoders they need. Returns their paths.

    Files land in the hub repository's own layout under `DIR/<repository name>/` (h94's: `IP-Adapter/models/`,
    `IP-Adapter/models/image_encoder/`, `IP-Adapter/sdxl_models/...`), which the store understands and where the
    encoder sits beside its adapters. `hf_hub_download(local_dir=...)` writes each file there once (no copy from
    the hub cache) and only moves it into place when it is complete."""
    if fetch is None:
        from huggingface_hub import hf_hub_download as fetch
    models = Path(models)
    written = []
    for name in names:
        known = catalog.known_adapter(name)
        if known is None:
            available = ", ".join(a.name for a in catalog.KNOWN_ADAPTERS)
            raise UnknownAdapterError(f"no published adapter called {name!r}; known: {available}")
        written.append(_fetch(fetch, models, known.hub_repo, known.hub_subfolder, f"{known.stems[0]}.safetensors"))
        family = TRAINED_WITH.get(known.name, catalog.VIT_H)
        for file in ("config.json", "model.safetensors"):
            path = _fetch(fetch, models, family.hub_repo, family.hub_subfolder, file)
        written.append(path.parent)
    return written


def _fetch(fetch, models: Path, repo: str, subfolder: str, filename: str) -> Path:
    local = models / repo.split("/")[-1]
    target = local / subfolder / filename
    if not target.exists():
        log.info("downloading %s from %s", f"{subfolder}/{filename}".lstrip("/"), repo)
        target = Path(fetch(repo_id=repo, filename=filename, subfolder=subfolder or None, local_dir=local))
    return target
