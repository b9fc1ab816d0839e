"""What earlier runs learnt about the files of a models tree, kept on disk: a rescan of an unchanged tree reads none.

One JSON file (`$IMPROMPT_CACHE_DIR/probes.json`, by default `~/.cache/imprompt/probes.json`) maps a file's path to
its fingerprint (size, modification time, inode) and its spec, and, once computed, its sha256 (A1111's model, VAE
and LoRA hashes in the infotext: seconds to read a multi-GB checkpoint, which A1111 also keeps on disk). Each is
used again only while the fingerprint is the same, so what it says was read from the file's own bytes, by this
version of the probe (`PROBE_VERSION`).
Nothing is written into the user's models folders (they may be read-only, or shared by several machines).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from .specs import Spec, spec_from_json, spec_to_json

log = logging.getLogger("imprompt")
PROBE_VERSION = 8  # raise when what the probe reads from files changes, so old results are not used


def cache_file() -> Path:
    root = os.environ.get("IMPROMPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imprompt"
    return Path(root) / "probes.json"


class ProbeCache:
    def __init__(self, path: Path | None = None):
        self.path = path or cache_file()
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # one writer at a time: writers share the partial file's name
        self._entries: dict[str, dict] = {}
        self._digests: dict[str, dict] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == PROBE_VERSION:
                self._entries = data.get("files", {})
                self._digests = data.get("sha256", {})
        except (OSError, ValueError, AttributeError):
            pass  # no cache yet, or an unreadable one: everything is probed again

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
            self._dirty = True

    def sha256(self, path: Path, fingerprint: tuple) -> str | None:
        with self._lock:
            entry = self._digests.get(str(path))
        if entry is None or tuple(tuple(f) if isinstance(f, list) else f for f in entry.get("fingerprint", ())) != fingerprint:
            return None
        return entry.get("sha256")

    def put_sha256(self, path: Path, fingerprint: tuple, digest: str) -> None:
        with self._lock:
            self._digests[str(path)] = {"fingerprint": fingerprint, "sha256": digest}
            self._dirty = True

    def save(self) -> None:
        """Write what was learnt (atomically); a cache that cannot be written only costs the next scan time."""
        with self._lock:
            if not self._dirty:
                return
            data = json.dumps({"version": PROBE_VERSION, "files": self._entries, "sha256": self._digests})
            self._dirty = False
        try:
            with self._writing:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
                partial.write_text(data)
                partial.replace(self.path)
        except OSError as exc:
            log.warning("could not keep probe results in %s (%s); the next scan probes again", self.path, exc)
