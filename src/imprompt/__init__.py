"""The public API: Engine, Result, GenerateRequest, IPAdapterUnit, ImpromptError.

imprompt is Stable Diffusion image generation in which image prompts (IP-Adapters) are first-class.
`from imprompt import Engine` works as usual; the heavy imports (torch, diffusers) happen on first use, so
`imprompt --help` and `imprompt probe` answer at once.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "imprompt.engine",
    "Result": "imprompt.result",
    "GenerateRequest": "imprompt.request",
    "IPAdapterUnit": "imprompt.request",
    "ImpromptError": "imprompt.errors",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'imprompt' has no attribute {name!r}")
