"""Processor shells kept per adapter set, and letting go of them: what the UNet attachment (`attach.py`) and the
SD 3.5 / FLUX one (`dit.py`) share."""

from __future__ import annotations

from collections import OrderedDict


class KeptShells:
    """Subclasses keep `_shells` (adapter keys -> shells) and `attached`, and attach."""

    _shells: OrderedDict
    attached: tuple

    def attach(self, adapters: list, keys: tuple) -> bool:
        raise NotImplementedError

    def forget_shells(self) -> None:
        """Drop the kept shells (they hold references to built adapters; see EngineState.clear_cache)."""
        self._shells.clear()

    def forget(self, keys) -> None:
        """Adapters evicted from the engine's cache: drop every kept shell set that holds one, and take them off
        the model if attached, so that no reference keeps their memory (the next request attaches its own set)."""
        gone = set(keys)
        for kept in [k for k in self._shells if gone & set(k)]:
            del self._shells[kept]
        if gone & set(self.attached):
            self.attach([], ())
