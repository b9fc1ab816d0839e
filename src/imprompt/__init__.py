"""imprompt: Stable Diffusion image generation in which image prompts (IP-Adapters) are first-class."""

__version__ = "0.1.0"

from .engine import Engine, Result  # noqa: E402
from .errors import ImpromptError  # noqa: E402
from .schema import GenerateRequest, IPAdapterUnit  # noqa: E402

__all__ = ["Engine", "Result", "GenerateRequest", "IPAdapterUnit", "ImpromptError", "__version__"]
