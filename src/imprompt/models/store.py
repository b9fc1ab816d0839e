"""Model roots -> an index of what is on disk, and name -> file resolution.

Layouts understood (scanned recursively, hidden folders skipped):
- diffusers pipeline folders (`model_index.json`), e.g. `DIR/diffusers/<name>/`; the model name is the folder name;
- image encoders as transformers folders (`config.json` + weights), e.g. h94's `models/image_encoder/`;
- single files (`.safetensors`, `.bin`, ...): IP-Adapters in h94 format, or CLIP vision encoders with transformers
  key names (ComfyUI's `clip_vision/`). A file's kind comes from its tensors, never from its name or folder.

Every lookup re-checks the file's size and modification time, so a file replaced on disk is probed again and
never served from a stale index (callers key their caches on `Entry.fingerprint` for the same reason).

Symlinks are followed (A1111 and ComfyUI trees are often linked into each other), but each real folder is walked
once (known by device and inode) and each file is listed once per name: a link loop ends, and a folder reachable
through a link and by its real path is listed at its real path (links are walked after every real folder).

A name that is not in the index makes the store walk the roots again (a file may have been added), unless another
unknown name did less than `rescan_interval` seconds ago: a burst of typos costs one walk per interval, and a file
added just before it is asked for is still found. `refresh()` (the `/refresh` endpoints) always walks. Lookups
never wait for a walk: it runs outside the lock they take, and its index is swapped in at the end.

Scanning is cheap: a safetensors file is probed from its header (a few KB), a pickle (`.ckpt`, `.pt`, `.bin`,
`.pth`) is not unpickled until it is first needed (a request names it, an encoder is looked for, or the tree is
listed), and what was probed is kept on disk (`probe_cache.py`), so a rescan of an unchanged tree reads no file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    CheckpointError,
    ImpromptError,
    MissingPartError,
    UnknownAdapterError,
    UnknownControlNetError,
    UnknownEmbeddingsError,
    UnknownEncoderError,
    UnknownLoraError,
    UnknownModelError,
    UnknownVaeError,
)
from ..loading.tensors import PICKLE_SUFFIXES, WEIGHT_SUFFIXES
from . import catalog
from .probe import probe
from .probe_cache import ProbeCache
from .specs import Spec

log = logging.getLogger("imprompt")


@dataclass(frozen=True)
class Entry:
    """One thing on disk: its name, where it is, what probing found (a spec, or the error it raised)."""

    name: str
    path: Path
    fingerprint: tuple
    spec: Spec | None = None
    error: ImpromptError | None = None

    @property
    def kind(self) -> str:
        """What the file is; "unread" for a pickle not unpickled yet, "unreadable" for one that failed."""
        if self.spec is not None:
            return self.spec.kind
        return "unreadable" if self.error is not None else "unread"

    def key(self, *how) -> tuple:
        """Cache key for something loaded from this entry: path first, then the fingerprint (so a changed file
        never matches), then how it was loaded (dtype, device)."""
        return (str(self.path), self.fingerprint, *map(str, how))


RESCAN_INTERVAL = 2.0  # seconds between two walks that unknown names start (explicit refreshes always walk)


class ModelStore:
    def __init__(self, roots, allow_paths: bool = True, rescan_interval: float = RESCAN_INTERVAL):
        """`roots`: one folder or several. `allow_paths`: whether names may also be filesystem paths outside the
        roots (the CLI and Python API allow it; the HTTP server does not). `rescan_interval`: an unknown name walks
        the roots again unless another one did less than this many seconds ago (0: every miss walks)."""
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        self.roots = [Path(r).expanduser().resolve() for r in roots]
        for root in self.roots:
            if not root.exists():
                raise UnknownModelError(f"models folder {root} does not exist. Pass --models DIR (or set IMPROMPT_MODELS)")
        self.allow_paths = allow_paths
        self.rescan_interval = rescan_interval
        self._lock = threading.RLock()  # the index (`entries`, `_probed`); never held while walking the roots
        self._walking = threading.Lock()  # one walk at a time; taken before `_lock`, never while holding it
        self._missed_at = float("-inf")  # time.monotonic() when the last walk that a miss started ended
        self.scans = 0  # walks of the roots (the first one included)
        self._probed: dict[Path, Entry] = {}
        self._disk = ProbeCache()
        self.probes = 0  # files read to learn what they are (not counting the cache on disk)
        self.entries: list[Entry] = []
        self.refresh()

    # ------------------------------------------------------------------------------------------------- scanning

    def refresh(self) -> None:
        """Walk the roots again; files whose fingerprint did not change are not probed again, and pickles are left
        unread until needed. Waits for a walk under way, then walks (what is on disk now is asked for)."""
        with self._walking:
            self._scan()

    def refresh_if_stale(self) -> bool:
        """For a name not found (a file may have been added since): walk the roots again, unless this method walked
        less than `rescan_interval` seconds ago or a walk is under way (its index comes soon; a lookup never waits
        for it). True if it walked."""
        if time.monotonic() - self._missed_at < self.rescan_interval:
            return False
        if not self._walking.acquire(blocking=False):
            return False
        try:
            if time.monotonic() - self._missed_at < self.rescan_interval:
                return False  # another miss walked just before this one took the lock
            self._scan()
            self._missed_at = time.monotonic()
            return True
        finally:
            self._walking.release()

    def _scan(self) -> None:
        """Walk and probe without `_lock` (lookups go on meanwhile), then swap the new index in. Under `_walking`."""
        self.scans += 1
        found = walk_roots(self.roots)
        entries = [self._entry(name, path, lazy=True) for name, path in found]
        with self._lock:
            self.entries = entries
        self._disk.save()

    def a1111_hash(self, path: Path, digits: int = 10) -> str:
        """A1111's short hash: the first hex digits of the file's sha256 (10 for "Model hash" and "VAE hash", 12
        for "Lora hashes" and "TI hashes"). Computed once per version of the file and kept with the probes on
        disk, so a new process does not read a multi-GB checkpoint again before its first image."""
        fingerprint = fingerprint_of(path)
        key = (str(path), fingerprint)
        if key not in _HASHES:
            known = self._disk.sha256(path, fingerprint)
            if known is None:
                started = time.perf_counter()
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(2**20), b""):
                        digest.update(block)
                known = digest.hexdigest()
                log.info("sha256 of %s (%.1f GB) in %.2f s, kept on disk", path.name, fingerprint[0] / 1e9,
                         time.perf_counter() - started)  # fmt: skip
                self._disk.put_sha256(path, fingerprint, known)
                self._disk.save()
            _HASHES[key] = known
        return _HASHES[key][:digits]

    def read_all(self) -> None:
        """Probe what the scan left unread (pickles), for a listing that says what every file is."""
        with self._lock:
            self.entries = [self._entry(e.name, e.path) if e.kind == "unread" else e for e in self.entries]
        self._disk.save()  # outside the lock: it may wait for another process's save

    def _entry(self, name: str, path: Path, lazy: bool = False) -> Entry:
        """The entry for `path`, probed again only if its fingerprint changed since last time (in this process or,
        through the cache on disk, in an earlier one). `lazy`: leave a pickle unread."""
        fingerprint = fingerprint_of(path)
        cached = self._probed.get(path)
        if cached is not None and cached.fingerprint == fingerprint and cached.name == name:
            if lazy or cached.kind != "unread":
                return cached
        spec = self._disk.get(path, fingerprint)
        if spec is not None:
            entry = Entry(name, path, fingerprint, spec=spec)
        elif lazy and path.suffix in PICKLE_SUFFIXES and path.is_file():
            entry = Entry(name, path, fingerprint)
        else:
            self.probes += 1
            try:
                entry = Entry(name, path, fingerprint, spec=probe(path))
                self._disk.put(path, fingerprint, entry.spec)
            except ImpromptError as exc:
                entry = Entry(name, path, fingerprint, error=exc)
        self._probed[path] = entry
        return entry

    def current(self, entry: Entry) -> Entry:
        """`entry` as the disk has it now (probed again if the file changed; raises if it is gone)."""
        with self._lock:
            if not entry.path.exists():  # out of the index, without a walk (which is never made under the lock)
                self.entries = [e for e in self.entries if e.path != entry.path]
                raise CheckpointError(entry.path, "was removed from disk", "Restore the file or choose another")
            current = self._entry(entry.name, entry.path)
        self._disk.save()
        return current

    # ------------------------------------------------------------------------------------------------- listings

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]

    @property
    def pipelines(self) -> list[Entry]:
        return self.of_kind("pipeline")

    @property
    def adapters(self) -> list[Entry]:
        return self.of_kind("ip-adapter")

    @property
    def encoders(self) -> list[Entry]:
        return self.of_kind("image-encoder")

    def current_of_kind(self, kind: str) -> list[Entry]:
        """Every entry of `kind` as the disk has it now: changed files probed again, removed ones left out.
        Used where a choice is made among all entries (the encoder for an adapter), so it never rests on a stale
        index."""
        with self._lock:
            updated = []
            for e in self.entries:
                if e.kind in (kind, "unreadable", "unread"):  # fixed meanwhile, or a pickle not read yet
                    if not e.path.exists():
                        continue
                    e = self._entry(e.name, e.path)
                updated.append(e)
            self.entries = updated  # the index follows what was found
        self._disk.save()
        return [e for e in updated if e.kind == kind]

    @property
    def unreadable(self) -> list[Entry]:
        return [e for e in self.entries if e.error is not None]

    # ------------------------------------------------------------------------------------------------ resolution

    def pipeline(self, name: str) -> Entry:
        entry = self._resolve(name, "pipeline")
        if entry is None:
            available = ", ".join(e.name for e in self.pipelines) or "none"
            raise UnknownModelError(
                f"model {name!r} not found in {self._where()}. Available models: {available}. "
                f"Put a diffusers pipeline folder under DIR/diffusers/<name>/"
            )
        return entry

    def adapter(self, name: str) -> Entry:
        """Resolve a friendly name ("Base ViT-G"), a file stem, a path relative to a root, or (if allowed) a path."""
        known = catalog.known_adapter(name)
        stems = known.stems if known else (name,)
        for stem in stems:
            entry = self._resolve(stem, "ip-adapter")
            if entry is not None:
                return entry
        present = sorted({catalog.friendly_name(e.name) or e.name for e in self.adapters})
        hint = ""
        if known:
            hint = (
                f" The {known.name!r} adapter is the file {known.stems[0]}.safetensors from "
                f"{known.hub_repo}/{known.hub_subfolder}; put it in DIR/ipadapter/ (or run "
                f"`imprompt download {known.name!r}` on a machine with internet)."
            )
        raise UnknownAdapterError(
            f"IP-Adapter {name!r} not found in {self._where()}. Available adapters: "
            f"{', '.join(present) or 'none'}.{hint}"
        )

    def embeddings(self, name: str) -> Entry:
        entry = self._resolve(name, "ip-embeddings")
        if entry is None:
            available = ", ".join(e.name for e in self.of_kind("ip-embeddings")) or "none"
            raise UnknownEmbeddingsError(
                f"saved embeddings {name!r} not found in {self._where()}. Available: {available}. "
                f"Save some with `imprompt embed`"
            )
        return entry

    def lora(self, name: str) -> Entry:
        """A LoRA by file stem (as `<lora:NAME:...>` names it, case-insensitive), relative path, or path."""
        entry = self._resolve(name, "lora")
        if entry is None:
            available = ", ".join(sorted(e.name for e in self.of_kind("lora"))) or "none"
            raise UnknownLoraError(
                f"LoRA {name!r} not found in {self._where()}. Available LoRAs: {available}. "
                f"Put the .safetensors file in the tree's Lora/ (A1111) or loras/ (ComfyUI) folder"
            )
        return entry

    def vae(self, name: str) -> Entry:
        """A VAE by file name (A1111's `sd_vae` names it with its extension), stem, relative path, or path
        (`_resolve_file`)."""
        entry = self._resolve_file(name, "vae")
        if entry is None:
            available = ", ".join(sorted(vae_listing_name(e, self) for e in self.of_kind("vae"))) or "none"
            raise UnknownVaeError(
                f"VAE {name!r} not found in {self._where()}. Available VAEs: {available}. "
                f"Put the file in the tree's VAE/ (A1111) or vae/ (ComfyUI) folder"
            )
        return entry

    @property
    def text_encoders(self) -> list[Entry]:
        return self.of_kind("text-encoder")

    def text_encoder(self, name: str) -> Entry:
        """A text encoder alone (ComfyUI's `text_encoders/` or `clip/`) by file name, stem, relative path, or path."""
        entry = self._resolve_file(name, "text-encoder")
        if entry is None:
            available = ", ".join(sorted(e.path.name for e in self.text_encoders)) or "none"
            raise MissingPartError(
                f"text encoder {name!r} not found in {self._where()}. Available text encoders: {available}. "
                f"Put the file in the tree's text_encoders/ or clip/ folder (ComfyUI)"
            )
        return entry

    @property
    def controlnets(self) -> list[Entry]:
        """ControlNets and the files kept beside them (T2I-Adapters, Control-LoRAs, ...: their spec's `unsupported`
        says why they cannot run), by name."""
        return sorted((e for e in self.entries if e.kind in CONTROLNET_KINDS), key=lambda e: e.name.lower())

    def controlnet(self, name: str) -> Entry:
        """A ControlNet by what clients send: the A1111 extension's "name [hash]" (its legacy 8-hex hash, or the
        10-hex sha256 prefix A1111 shows), a file name or stem (case-insensitive), a diffusers folder's name, a
        path relative to a root, or (if allowed) a path. A name not found, with a hash that one ControlNet has,
        finds that one (the file was renamed since the client listed it); checking that a name's hash still
        matches is the caller's (a warning, as for IP-Adapter units)."""
        named = HASHED_NAME.fullmatch(name.strip())
        bare, digest = (named.group("name"), named.group("hash").lower()) if named else (name.strip(), None)
        stem = Path(bare).stem if Path(bare).suffix in WEIGHT_SUFFIXES and not Path(bare).is_absolute() else bare
        for candidate in dict.fromkeys((bare, stem)):
            entry = self._resolve_controlnet(candidate)
            if entry is not None:
                return entry
        if digest is not None:
            for entry in self.controlnets:
                if digest in (controlnet_hash(entry.path), self.a1111_hash(controlnet_file(entry.path), len(digest))):
                    return self.current(entry)
        available = ", ".join(self.controlnet_title(e) for e in self.controlnets) or "none"
        raise UnknownControlNetError(
            f"ControlNet {name!r} not found in {self._where()}. Available ControlNets: {available}. Put the file in "
            f"the tree's ControlNet/ (A1111) or controlnet/ (ComfyUI) folder, or a diffusers ControlNet folder beside it"
        )

    def _resolve_controlnet(self, name: str) -> Entry | None:
        """By entry name or relative path, else by a diffusers folder's own name; on a miss as `_resolve` (a walk
        again, a path outside the roots; a file of another kind is an error saying what it is)."""
        with self._lock:
            matches = [e for e in self._matches(name) if e.kind in CONTROLNET_KINDS]
            if not matches:
                matches = [e for e in self.entries if e.kind in CONTROLNET_KINDS and e.path.is_dir()
                           and e.path.name.lower() == name.lower()]  # fmt: skip
        if matches:
            return self._choose(name, matches[0].kind, matches)
        return self._resolve(name, "controlnet")

    def controlnet_title(self, entry: Entry) -> str:
        """How the A1111 extension lists a ControlNet: "stem [legacy hash]" (a folder: its name and its weights'
        hash). `controlnet()` finds it again from that."""
        shown = entry.path.name if entry.path.is_dir() else entry.path.stem
        return f"{shown} [{controlnet_hash(entry.path)}]"

    def encoder(self, name: str) -> Entry:
        entry = self._resolve(name, "image-encoder")
        if entry is None:
            available = ", ".join(e.name for e in self.encoders) or "none"
            raise UnknownEncoderError(f"image encoder {name!r} not found in {self._where()}. Available: {available}")
        return entry

    def _resolve(self, name: str, kind: str) -> Entry | None:
        """The entry called `name` of `kind`; raises the probe error if the only match is unreadable or of
        another kind. On a miss, walks the roots again if the last walk is old enough (`refresh_if_stale`): a file
        may have been added since. The walk is made without the lock, so other lookups go on meanwhile."""
        for attempt in range(2):
            with self._lock:
                matches = self._matches(name)
            if matches:
                return self._choose(name, kind, matches)
            if attempt == 0 and not self.refresh_if_stale():
                break
        return self._outside_path(name, kind)

    def _resolve_file(self, name: str, kind: str) -> Entry | None:
        """A file by its file name (that very file where several share its stem: `t5xxl_fp16.gguf` is not
        `t5xxl_fp16.safetensors`), stem, path relative to a root, or path (one in the roots is found even where
        outside paths are not allowed). A path that is not there is not found: it never falls back to another file
        of the same name (Forge's paths from another machine are read by `find`, for its modules only)."""
        bare = Path(name.strip())
        if bare.suffix in WEIGHT_SUFFIXES and len(bare.parts) == 1:
            with self._lock:
                same_file = [e for e in self.entries if e.path.name.lower() == bare.name.lower() and e.kind == kind]
            if same_file:
                return self._choose(name, kind, same_file)
            return self._resolve(bare.stem, kind)
        return self._resolve(name, kind)  # a path not found is not found (never another file of the same name)

    def find(self, name: str, kinds: tuple[str, ...] = ()) -> Entry | None:
        """The file `name` stands for whatever its kind (those of `kinds` first; as `_resolve_file` reads names),
        or None: to say what a name given for one kind of file is, or to sort files by kind (Forge's modules)."""
        bare = Path(name.strip().replace("\\", "/"))
        tries = dict.fromkeys([name.strip(), bare.name, bare.stem if bare.suffix in WEIGHT_SUFFIXES else bare.name])
        for attempt in range(2):
            for tried in tries:
                with self._lock:
                    matches = self._matches(tried) or [e for e in self.entries if e.path.name.lower() == tried.lower()]
                matches = [self.current(e) for e in matches if e.path.exists()]
                if matches:
                    return min(matches, key=lambda e: (e.kind not in kinds, *lookup_order(e)))
            if attempt == 0 and not self.refresh_if_stale():
                break
        return None

    def name_of(self, entry: Entry) -> str:
        """A name that resolves to exactly this file, readable where it can be: its stem when no other file in
        the index has that name, else its path relative to its models root (unique there), else its path. What
        info reports and the cluster forwards, so a client or worker that sends it back gets the same file."""
        with self._lock:
            entries = list(self.entries)
        if not any(e.path == entry.path for e in entries):
            return str(entry.path)  # a path outside the roots (the CLI's and Python API's)
        if all(e.path == entry.path for e in entries if e.name.lower() == entry.name.lower()):
            return entry.name
        for root in self.roots:
            if _relative(entry.path, root) is None:
                continue
            relative = entry.path.relative_to(root).as_posix()
            named = [e for e in entries if e.name.lower() == relative.lower()]
            same = {e.path for e in entries for r in self.roots if _relative(e.path, r) == relative.lower()}
            if not named and same == {entry.path}:
                return relative
        return str(entry.path)

    def _matches(self, name: str) -> list[Entry]:
        """Entries called `name`, else at that path relative to a root, else at that path (a path in the roots)."""
        lowered = name.strip().lower()
        by_name = [e for e in self.entries if e.name.lower() == lowered]
        if by_name:
            return by_name
        relative = [e for e in self.entries for root in self.roots if _relative(e.path, root) == lowered]
        if relative or not Path(name.strip()).is_absolute():
            return relative
        return [e for e in self.entries if e.path == Path(name.strip())]

    def _choose(self, name: str, kind: str, matches: list[Entry]) -> Entry:
        matches = [self.current(e) for e in matches]
        good = [e for e in matches if e.kind == kind]
        if good:
            good.sort(key=lookup_order)
            if len(good) > 1:
                log.debug("%s %r matches %s; using %s", kind, name, [str(e.path) for e in good], good[0].path)
            return good[0]
        broken = [e for e in matches if e.error is not None]
        if broken:
            raise broken[0].error
        other = matches[0]
        raise CheckpointError(other.path, f"is {_article(other.kind)} {other.kind}, not {_article(kind)} {kind}")

    def _outside_path(self, name: str, kind: str) -> Entry | None:
        path = Path(name).expanduser()
        if not self.allow_paths or not path.exists():
            return None
        path = path.resolve()
        entry = self._entry(path.name if path.is_dir() else path.stem, path)
        return self._choose(name, kind, [entry])

    def _where(self) -> str:
        return ", ".join(str(r) for r in self.roots)


def lookup_order(entry: Entry) -> tuple:
    """How the store orders files one name matches: .safetensors before the rest (pickles, GGUF), then the
    shortest path (the most canonical place), then the path. Whatever chooses among files (`models/parts.py`
    breaking ties) uses it too, so a name it reports resolves to the file it chose."""
    return (entry.path.suffix != ".safetensors", len(entry.path.parts), str(entry.path))


def walk_roots(roots: list[Path]) -> list[tuple[str, Path]]:
    """(name, path) of every model file and model folder below `roots`: the real tree in sorted walk order, then
    what symlinks lead to. Links are followed, but each real folder (device, inode) is walked once and each model
    is listed once per name, so link loops end, and what is reachable both ways is listed at its real path."""
    walk = _Walk()
    for root in roots:
        walk.visit(root, root, top=True)
    while walk.links:  # links found meanwhile join the end: a deterministic, breadth-first order for them
        root, path = walk.links.pop(0)
        walk.visit(root, path)
    return walk.found


class _Walk:
    """What one walk of the roots has seen: the real folders walked, what was listed (identity and name), the
    symlinks left for after the real tree."""

    def __init__(self):
        self.found: list[tuple[str, Path]] = []
        self.links: list[tuple[Path, Path]] = []
        self.folders: set[tuple[int, int]] = set()
        self.listed: set[tuple[int, int, str]] = set()

    def visit(self, root: Path, path: Path, top: bool = False) -> None:
        """A root (`top`: a single file is listed whatever its suffix) or a symlink found below one."""
        try:
            st = path.stat()
        except OSError as exc:  # a dangling link, or no permission
            if path.suffix in WEIGHT_SUFFIXES or not path.suffix:  # a model, or a folder of them: say why it is absent
                log.warning("cannot read %s: %s", path, exc.strerror or exc)
            return
        if stat.S_ISDIR(st.st_mode):
            self.folder(root, path, st)
        elif stat.S_ISREG(st.st_mode) and (top or path.suffix in WEIGHT_SUFFIXES):  # never a FIFO: it would block
            self.add(path.stem, path, st)

    def folder(self, root: Path, folder: Path, st: os.stat_result) -> None:
        if _is_model_folder(folder):  # listed, never walked into: no loop can start there
            self.add(_folder_name(root, folder), folder, st)
            encoder = folder / "image_encoder"  # diffusers' prior-redux folder keeps its SigLIP there: listed too
            if (folder / "image_embedder" / "config.json").is_file() and (encoder / "config.json").is_file():
                self.add(_folder_name(root, encoder), encoder, encoder.stat())
            return
        if _identity(st) in self.folders:
            return  # walked already: by its real path, through another link, or a loop back to it
        self.folders.add(_identity(st))
        try:
            children = sorted(folder.iterdir())
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc.strerror)
            return
        for child in children:
            if child.name.startswith("."):
                continue
            if child.is_symlink():
                self.links.append((root, child))
                continue
            try:
                child_st = child.stat()
            except OSError:
                continue  # gone since the listing
            if stat.S_ISDIR(child_st.st_mode):
                self.folder(root, child, child_st)
            elif stat.S_ISREG(child_st.st_mode) and child.suffix in WEIGHT_SUFFIXES:
                self.add(child.stem, child, child_st)

    def add(self, name: str, path: Path, st: os.stat_result) -> None:
        """A file or model folder, listed once per name: a hard link or a link under the same name is the same
        model; a link under another name is an alias its user made, listed under that name too."""
        if (*_identity(st), name) not in self.listed:
            self.listed.add((*_identity(st), name))
            self.found.append((name, path))


def _is_model_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def _folder_name(root: Path, folder: Path) -> str:
    """Pipelines are called by their folder name; encoder folders by their path under the root."""
    if (folder / "model_index.json").is_file():
        return folder.name
    return folder.relative_to(root).as_posix() if folder != root else folder.name


def vae_listing_name(entry: Entry, store: ModelStore) -> str:
    """A VAE as listings name it: its file name (A1111's `sd_vae`), or where two share it a name for that file."""
    same = [e for e in store.of_kind("vae") if e.path.name.lower() == entry.path.name.lower()]
    return entry.path.name if len(same) == 1 else store.name_of(entry)


def _relative(path: Path, root: Path) -> str | None:
    try:
        return path.relative_to(root).as_posix().lower()
    except ValueError:
        return None


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


_HASHES: dict[tuple, str] = {}


def legacy_hash(path: Path) -> str:
    """A1111's old short hash, which the ControlNet extension still shows in its model names ("name [6a3f6166]"):
    sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits (a file under 1 MiB hashes the empty string)."""
    key = ("legacy", str(path), fingerprint_of(path))
    if key not in _HASHES:
        with open(path, "rb") as f:
            f.seek(0x100000)
            _HASHES[key] = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return _HASHES[key]


CONTROLNET_KINDS = ("controlnet", "t2i-adapter")
HASHED_NAME = re.compile(r"(?P<name>.+?)\s*\[(?P<hash>[0-9a-fA-F]{8,64})\]")  # the extension's "name [hash]"
CONTROLNET_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                      "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors.index.json")  # fmt: skip


def controlnet_file(path: Path) -> Path:
    """The file a ControlNet's hash is of: itself, or a diffusers folder's weights (its config.json if none)."""
    if not path.is_dir():
        return path
    return next((path / n for n in CONTROLNET_WEIGHTS if (path / n).is_file()), path / "config.json")


def controlnet_hash(path: Path) -> str:
    """The legacy hash the A1111 extension shows for a ControlNet file or folder."""
    return legacy_hash(controlnet_file(path))


def fingerprint_of(path: Path) -> tuple:
    """Identity of what is on disk now: (size, mtime, inode) of the file, or of every file in a folder."""
    try:
        if path.is_dir():
            return tuple(sorted(_walk_stats(str(path), "")))
        return _stat(os.stat(path))
    except OSError:
        return ("unreadable",)


def _walk_stats(folder: str, prefix: str):
    """(relative path, size, mtime, inode) of every file below `folder` (os.scandir: this runs per request).
    Symlinks are followed, each real folder walked once (a loop ends); linked folders are walked after the real
    ones, each in a fixed order, so the same tree always gives the same fingerprint."""
    real, links, seen = [(folder, prefix)], [], set()
    while real or links:
        path, relative = real.pop() if real else links.pop()
        try:
            identity = _identity(os.stat(path))
        except OSError:
            continue  # a link to a folder that is gone
        if identity in seen:
            continue
        seen.add(identity)
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name, reverse=True):  # popped from the end: sorted order
                if entry.is_dir(follow_symlinks=True):
                    (links if entry.is_symlink() else real).append((entry.path, relative + entry.name + "/"))
                elif entry.is_file(follow_symlinks=True):
                    yield (relative + entry.name, *_stat(entry.stat()))


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _stat(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ino)
