"""`imprompt download`: fetch published adapters, and what each one runs with, into a models folder.

What an adapter runs with depends on its family: an h94-style IP-Adapter its CLIP encoder, FLUX Redux SigLIP
so400m, InstantID its IdentityNet and InsightFace's antelopev2 pack, PuLID EVA02-CLIP-L-14-336, antelopev2 and
facexlib's two face networks. Each file lands where imprompt's own lookups find it: the store (any folder under
DIR, read from its tensors), `<models>/insightface/models/<pack>/` (`ipadapter/faces.insightface_roots`) and
`<models>/facexlib/` (`ipadapter/facexlib_files.facexlib_folders`).

Needs internet (users have it; the test machine does not, so tests pass a fake `fetch` and `fetch_url`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingFaceAnalysisError, UnknownAdapterError
from . import catalog

log = logging.getLogger("imprompt")

# Which CLIP encoder each h94-style adapter was trained with (ViT-H unless named here). Only used to decide what to
# download: at generation time the encoder is chosen from the adapter's tensors.
TRAINED_WITH = {
    "Base ViT-G": catalog.VIT_BIGG,
    "Base SDXL": catalog.VIT_BIGG,
}

# InstantX/InstantID's files as its README downloads them: the adapter is a pickle, beside its IdentityNet folder
INSTANTID_FILES = ("ip-adapter.bin", "ControlNetModel/config.json", "ControlNetModel/diffusion_pytorch_model.safetensors")
# PuLID's EVA tower, as its `eva_clip/pretrained.py` names it (hf_hub 'QuanSun/EVA-CLIP/EVA02_CLIP_L_336_psz14_s6B.pt')
EVA_REPO, EVA_FILE = "QuanSun/EVA-CLIP", "EVA02_CLIP_L_336_psz14_s6B.pt"
# antelopev2 as PuLID's pipelines fetch it (`snapshot_download('DIAMONIK7777/antelopev2', ...)`): the pack's five files
ANTELOPE_PACK, ANTELOPE_REPO = "antelopev2", "DIAMONIK7777/antelopev2"
ANTELOPE_FILES = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")
INSIGHTFACE_FOLDER = "insightface"  # <models>/insightface/models/<pack>/: the first InsightFace root of a models folder
FACEXLIB_FOLDER = "facexlib"  # <models>/facexlib/: the first folder facexlib's files are looked for in
# facexlib's two files (`ipadapter/facexlib_files`, which gives their release URLs when they are fetched: it imports
# torch, which the command line does not load to build its help)
FACEXLIB_FILES = {"detection_Resnet50_Final.pth": "facexlib RetinaFace detector",
                  "parsing_bisenet.pth": "facexlib BiSeNet parser"}  # fmt: skip
PULID = ("PuLID FLUX v0.9.1", "PuLID FLUX v0.9.0", "PuLID SDXL v1.1")


@dataclass(frozen=True)
class HubFile:
    """A file of a Hugging Face hub repository (`path` in it), fetched into DIR/`local`/`path`."""

    repo: str
    path: str
    local: str
    role: str
    in_folder: bool = False  # one file of a folder the lookups take whole (an encoder, a ControlNet, a face pack)

    def target(self, models: Path) -> Path:
        return models / self.local / self.path

    def reported(self, path: Path) -> Path:
        return path.parent if self.in_folder else path


@dataclass(frozen=True)
class ReleaseFile:
    """One of facexlib's files, published on its GitHub releases (a plain URL), fetched to DIR/`local`."""

    name: str
    local: str
    role: str

    @property
    def url(self) -> str:
        from ..ipadapter.facexlib_files import RELEASES

        return RELEASES[self.name]

    def target(self, models: Path) -> Path:
        return models / self.local

    def reported(self, path: Path) -> Path:
        return path


def hub_files(repo: str, subfolder: str, names, role: str, local: str | None = None,
              in_folder: bool = False) -> list[HubFile]:  # fmt: skip
    """Files of `repo` in the repository's own layout under DIR/<repository name>/ (or DIR/`local`)."""
    local = local if local is not None else repo.split("/")[-1]
    return [HubFile(repo, f"{subfolder}/{name}".lstrip("/"), local, role, in_folder) for name in names]


def encoder_folder(family: catalog.EncoderFamily) -> list[HubFile]:
    """A transformers encoder folder (config.json + model.safetensors), which the store lists as an image encoder."""
    role = family.name if family in catalog.SIGLIP_FAMILIES else f"CLIP {family.name}"
    return hub_files(family.hub_repo, family.hub_subfolder, ("config.json", "model.safetensors"), role, in_folder=True)


def antelopev2() -> list[HubFile]:
    """InsightFace's antelopev2 pack at <models>/insightface/models/antelopev2/*.onnx, where `FaceAnalyzer.find_pack`
    looks first in a models folder."""
    local = f"{INSIGHTFACE_FOLDER}/models/{ANTELOPE_PACK}"
    return hub_files(ANTELOPE_REPO, "", ANTELOPE_FILES, f"InsightFace {ANTELOPE_PACK}", local, True)


def facexlib() -> list[ReleaseFile]:
    """facexlib's RetinaFace detector and BiSeNet parser from its GitHub releases, into <models>/facexlib/."""
    return [ReleaseFile(name, f"{FACEXLIB_FOLDER}/{name}", role) for name, role in FACEXLIB_FILES.items()]


def files_for(known: catalog.KnownAdapter) -> list[HubFile | ReleaseFile]:
    """Everything `known` runs with, the adapter first. Where imprompt goes beyond diffusers: diffusers' loaders
    download one repository's files; this also fetches what each family's own code fetches beside them."""
    if known.name == "InstantID":  # no CLIP encoder: the face embedding comes from antelopev2
        adapter, *net = INSTANTID_FILES
        return (hub_files(known.hub_repo, known.hub_subfolder, (adapter,), known.name)
                + hub_files(known.hub_repo, known.hub_subfolder, net, "IdentityNet ControlNetModel/", in_folder=True)
                + antelopev2())  # fmt: skip
    adapter = hub_files(known.hub_repo, known.hub_subfolder, (f"{known.stems[0]}.safetensors",), known.name)
    if known.name == "FLUX Redux":  # BFL's file reads SigLIP so400m's last hidden state
        return adapter + encoder_folder(catalog.SIGLIP_SO400M)
    if known.name in PULID:
        eva = hub_files(EVA_REPO, "", (EVA_FILE,), "EVA02-CLIP-L-14-336")
        return adapter + eva + antelopev2() + facexlib()
    return adapter + encoder_folder(TRAINED_WITH.get(known.name, catalog.VIT_H))


def describe(known: catalog.KnownAdapter) -> str:
    """What `imprompt download NAME` fetches beside the adapter, in words (the command's help)."""
    _, *others = files_for(known)
    words = [f"{i.role} ({i.repo if isinstance(i, HubFile) else 'GitHub releases'})" for i in others]
    return " + ".join(dict.fromkeys(words))


def help_lines() -> list[str]:
    """The command's help: the known names (aliases in brackets) grouped by what each fetches beside its adapter."""
    groups: dict[str, list[str]] = {}
    for known in catalog.KNOWN_ADAPTERS:
        shown = f"{known.name} ({', '.join(known.aliases)})" if known.aliases else known.name
        groups.setdefault(describe(known), []).append(shown)
    return [f"{', '.join(names)}: + {what}" for what, names in groups.items()]


def download(names: list[str], models: Path, fetch=None, fetch_url=None) -> list[Path]:
    """Download the adapters called `names` (friendly names) and what they run with. Returns the adapter files,
    encoder folders or files, face pack folders and facexlib files, each once.

    Hub files land in their repository's own layout under `DIR/<repository name>/` (h94's: `IP-Adapter/models/`,
    `IP-Adapter/models/image_encoder/`, ...; InstantX's `InstantID/ip-adapter.bin` beside `InstantID/ControlNetModel/`,
    where InstantID's lookup takes it for the adapter's IdentityNet), antelopev2 in `DIR/insightface/models/antelopev2/`
    and facexlib's files in `DIR/facexlib/`. `hf_hub_download(local_dir=...)` writes each file there once (no copy
    from the hub cache) and only moves it into place when it is complete; `fetch_url` (default `fetch_release`)
    does the same for plain URLs. A file already there is not fetched again."""
    if fetch is None:
        from huggingface_hub import hf_hub_download as fetch
    fetch_url = fetch_url or fetch_release
    models = Path(models)
    wanted = []
    for name in names:
        known = catalog.known_adapter(name)
        if known is None:
            available = ", ".join(a.name for a in catalog.KNOWN_ADAPTERS)
            raise UnknownAdapterError(f"no published adapter called {name!r}; known: {available}")
        wanted += files_for(known)
    written: dict[Path, None] = {}
    for item in dict.fromkeys(wanted):  # two names sharing a file (PuLID's EVA tower) fetch it once
        if isinstance(item, HubFile):
            path = fetch_hub(fetch, models, item)
        else:
            path = fetch_release_file(fetch_url, models, item)
        written[item.reported(path)] = None
    return list(written)


def fetch_hub(fetch, models: Path, item: HubFile) -> Path:
    """`item` from the hub into its place under `models`, unless it is there already."""
    target = item.target(models)
    if not target.exists():
        log.info("downloading %s from %s", item.path, item.repo)
        subfolder, _, filename = item.path.rpartition("/")
        target = Path(fetch(repo_id=item.repo, filename=filename, subfolder=subfolder or None,
                            local_dir=models / item.local))  # fmt: skip
    return target


def fetch_release_file(fetch_url, models: Path, item: ReleaseFile) -> Path:
    """`item` from its release URL into its place under `models`, unless it is there already; a failed download is
    the error a missing facexlib file is, saying where to put it by hand."""
    target = item.target(models)
    if not target.exists():
        log.info("downloading %s from %s", target.name, item.url)
        try:
            fetch_url(item.url, target)
        except OSError as exc:  # urllib's URLError and HTTPError among them
            raise MissingFaceAnalysisError(
                f"{item.role} {target.name} could not be downloaded from {item.url} ({exc}); expected the file at "
                f"{target}. Download it by hand into {target.parent}, or run `imprompt download` again"
            ) from None
    return target


def fetch_release(url: str, target: Path) -> Path:
    """Download `url` to `target`: into a hidden temporary file beside it, moved into place only once complete, so
    an interrupted download never leaves a partial file where a lookup would take it."""
    import urllib.request  # here: it loads ssl and http, which the command line's help does not need

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out, 2**20)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target
