"""What earlier runs learnt about the files of a models tree, kept on disk: a rescan of an unchanged tree reads none.

One JSON file (`$IMPROMPT_CACHE_DIR/probes.json`, by default `~/.cache/imprompt/probes.json`) maps a file's path to
its fingerprint (size, modification time, inode) and its spec, and, once computed, its sha256 (A1111's model, VAE
and LoRA hashes in the infotext: seconds to read a multi-GB checkpoint, which A1111 also keeps on disk). Each is
used again only while the fingerprint is the same, so what it says was read from the file's own bytes, by this
version of the probe (`PROBE_VERSION`).
Nothing is written into the user's models folders (they may be read-only, or shared by several machines).

Several processes (servers, the CLI) and several stores in one process share the file. A save never drops what
another wrote: under a lock file beside it (`probes.json.lock`), it reads what is on disk, lays its own new results
over it, and replaces the file through a temporary file of a unique name.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from filelock import FileLock

from .specs import Spec, spec_from_json, spec_to_json

log = logging.getLogger("imprompt")
PROBE_VERSION = 15  # raise when what the probe reads from files changes, so old results are not used
LOCK_TIMEOUT = 10.0  # seconds a save waits for another writer of the file before giving up (the next save retries)


def cache_file() -> Path:
    root = os.environ.get("IMPROMPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imprompt"
    return Path(root) / "probes.json"


class ProbeCache:
    def __init__(self, path: Path | None = None):
        self.path = path or cache_file()
        self._lock = threading.Lock()
        self._entries, self._digests = self._read()
        self._new_entries: set[str] = set()  # learnt since the last save: what a save lays over the file
        self._new_digests: set[str] = set()

    def _read(self) -> tuple[dict, dict]:
        """(files, sha256) as the file on disk has them; empty if there is none, or one that cannot be used."""
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == PROBE_VERSION:
                return dict(data.get("files", {})), dict(data.get("sha256", {}))
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # no cache yet, or an unreadable one: everything is probed again
        return {}, {}

    def get(self, path: Path, fingerprint: tuple) -> Spec | None:
        with self._lock:
            entry = self._entries.get(str(path))
        if entry is None or tuple(tuple(f) if isinstance(f, list) else f for f in entry["fingerprint"]) != fingerprint:
            return None
        try:
            return spec_from_json(entry["spec"])
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, path: Path, fingerprint: tuple, spec: Spec) -> None:
        with self._lock:
            self._entries[str(path)] = {"fingerprint": fingerprint, "spec": spec_to_json(spec)}
            self._new_entries.add(str(path))

    def sha256(self, path: Path, fingerprint: tuple) -> str | None:
        with self._lock:
            entry = self._digests.get(str(path))
        if entry is None or tuple(tuple(f) if isinstance(f, list) else f for f in entry.get("fingerprint", ())) != fingerprint:
            return None
        return entry.get("sha256")

    def put_sha256(self, path: Path, fingerprint: tuple, digest: str) -> None:
        with self._lock:
            self._digests[str(path)] = {"fingerprint": fingerprint, "sha256": digest}
            self._new_digests.add(str(path))

    def save(self) -> None:
        """Merge what was learnt into the file on disk (read again under the lock file, so another writer's results
        are kept) and replace it atomically; this cache then knows what the others learnt too. A cache that cannot
        be written only costs the next scan time (and the next save tries again)."""
        with self._lock:
            if not self._new_entries and not self._new_digests:
                return
            entries = {k: self._entries[k] for k in self._new_entries}
            digests = {k: self._digests[k] for k in self._new_digests}
            self._new_entries, self._new_digests = set(), set()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{self.path}.lock", timeout=LOCK_TIMEOUT):
                on_disk, on_disk_digests = self._read()
                on_disk.update(entries)
                on_disk_digests.update(digests)
                self._write({"version": PROBE_VERSION, "files": on_disk, "sha256": on_disk_digests})
        except OSError as exc:  # filelock's Timeout is one too
            log.warning("could not keep probe results in %s (%s); the next scan probes again", self.path, exc)
            with self._lock:
                self._new_entries.update(entries)
                self._new_digests.update(digests)
            return
        with self._lock:  # what was learnt while writing stays on top
            self._entries = {**on_disk, **{k: self._entries[k] for k in self._new_entries}}
            self._digests = {**on_disk_digests, **{k: self._digests[k] for k in self._new_digests}}

    def _write(self, data: dict) -> None:
        """Through a temporary file of a unique name in the same folder, then one rename: a reader never sees half a
        file, and two writers never share a temporary file."""
        handle, partial = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "w") as f:
                json.dump(data, f)
            os.replace(partial, self.path)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
