"""Image to image: the init image the pipeline starts from, and how much of it is redrawn.

The pipeline is the model's img2img twin, over the same modules; the image's size is the request's default size
(`plan.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..errors import UnsupportedError
from ..models.store import Entry
from ..request import GenerateRequest
from . import Conditioning, Description


def decode(request: GenerateRequest, state):
    """The init image, decoded (and so checked) before anything else happens; None for text to image."""
    if request.init_images and len(request.init_images) > 1:  # A1111 makes a batch of them, one per position
        raise UnsupportedError(f"init_images: {len(request.init_images)} images; imprompt starts a request from one "
                               f"(A1111 makes one batch image from each); send one image per request")  # fmt: skip
    return state.image(request.init_images[0], "init_images.0") if request.init_images else None


def plan(request: GenerateRequest, model: Entry, image) -> InitImage:
    if image is not None and model.spec.architecture != "unet":
        raise UnsupportedError(f"init_images: image-to-image is not supported yet for {model.spec.family} models "
                               f"(model {model.name}); remove it")  # fmt: skip
    return InitImage(image, request.denoising_strength if image is not None else None)


@dataclass
class InitImage(Conditioning):
    kind = "init_image"

    image: Image.Image | None
    strength: float | None

    def apply(self, call) -> None:
        """The img2img pipeline, the image at the request's size, the strength; img2img takes no width/height."""
        if self.image is None:
            return
        call.pipeline = call.loaded.img2img()
        del call.kwargs["width"], call.kwargs["height"]
        call.kwargs.update(image=self.image.resize((call.width, call.height), Image.Resampling.LANCZOS),
                           strength=self.strength)  # fmt: skip

    def batch_part(self) -> tuple | None:
        """Text to image batches; image to image runs alone (not batched yet)."""
        return () if self.image is None else None

    def describe(self, call) -> Description:
        return Description(info={"mode": "img2img" if self.image is not None else "txt2img",
                                 "denoising_strength": self.strength},
                           infotext={"Denoising strength": self.strength})  # fmt: skip
