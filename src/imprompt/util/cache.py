"""A least-recently-used cache bounded by bytes, with hit, miss and eviction counters.

Used for loaded image encoders, built adapter modules and image embeddings. It does not log: `put` returns what
it evicted so that the caller, who knows why the room was needed, can say so.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable

import torch


@dataclass
class Evicted:
    key: Hashable
    label: str
    nbytes: int
    value: Any = None  # what was evicted, for a caller that moves it elsewhere (a pipeline to CPU memory)


@dataclass
class _Item:
    value: Any
    nbytes: int
    label: str


class ByteLRU:
    """LRU of values with known sizes. An item larger than the whole budget is still kept (alone): a request that
    needs a big encoder must not fail because the budget is small, it only gets no company in the cache."""

    def __init__(self, name: str, budget_bytes: int):
        self.name = name
        self.budget_bytes = int(budget_bytes)
        self._items: OrderedDict[Hashable, _Item] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return item.value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def put(self, key: Hashable, value: Any, nbytes: int, label: str = "", keep=(), with_values: bool = False) -> list[Evicted]:
        """Insert (or replace) and evict least-recently-used items until the budget holds; never `key` itself nor
        the keys in `keep` (what the same request still needs). `with_values`: the evicted values come back too
        (otherwise not, so that nothing the caller holds keeps their memory)."""
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = _Item(value, int(nbytes), label or str(key))
            evicted = []
            for old_key in list(self._items):
                if self.used_bytes <= self.budget_bytes:
                    break
                if old_key == key or old_key in keep:
                    continue
                old = self._items.pop(old_key)
                self.evictions += 1
                evicted.append(Evicted(old_key, old.label, old.nbytes, old.value if with_values else None))
            return evicted

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def discard_where(self, predicate) -> list[Evicted]:
        """Drop every item whose key matches (e.g. everything built from a file that changed on disk)."""
        with self._lock:
            doomed = [k for k in self._items if predicate(k)]
            return [Evicted(k, self._items[k].label, self._items.pop(k).nbytes) for k in doomed]

    def discard_older_versions(self, key: tuple) -> list[Evicted]:
        """Drop items loaded from the same file (`key[0]`, its path) under another fingerprint: they can never be
        served again (their keys differ) but should not hold the budget. Keys are `Entry.key`s: (path,
        fingerprint, how it was loaded...); the same file loaded another way (other parts, another dtype) stays."""
        return self.discard_where(lambda k: k[0] == key[0] and k[1] != key[1])

    def values(self) -> list:
        """The cached values, least recently used first."""
        with self._lock:
            return [item.value for item in self._items.values()]

    def clear(self) -> int:
        with self._lock:
            count = len(self._items)
            self._items.clear()
            return count

    @property
    def used_bytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def stats(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "budget_bytes": self.budget_bytes,
                "used_bytes": self.used_bytes,
                "entries": [{"label": i.label, "bytes": i.nbytes} for i in self._items.values()],
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def parse_bytes(text: str | int | None, default: int) -> int:
    """'8GiB', '512MB', '1.5G', 1073741824 -> bytes."""
    if text is None or text == "":
        return default
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    s = str(text).strip().lower().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}  # fmt: skip
    for suffix, factor in units.items():
        if s.endswith(suffix):
            number = s[: -len(suffix)]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size; write it like 8GiB, 512MB or 1073741824") from None
    if not 0 <= value < float("inf"):
        raise ValueError(f"size {text!r} must be a finite, non-negative number of bytes")
    return int(value * factor)
