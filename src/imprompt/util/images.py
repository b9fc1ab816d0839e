"""Reference images in (PIL, paths, bytes, base64) -> RGB PIL, size-checked before decoding.

The pixel count is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError, ImageTooLargeError, shown

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 32 * 2**20
ORIENTATION = 0x0112  # the EXIF tag


def load_image(
    ref,
    what: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allow_paths: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
):
    """Decode one image reference; `what` names it in errors ("ip_adapters.0.images.1")."""
    if isinstance(ref, Image.Image):
        _check_pixels(ref, what, max_pixels)
        ref = upright(ref)
        return ref if ref.mode == "RGB" else ref.convert("RGB")  # never modified later, so no copy is needed
    if isinstance(ref, (bytes, bytearray)):
        _check_bytes(len(ref), what, max_bytes)
        return _decode(bytes(ref), what, max_pixels)
    if isinstance(ref, Path):
        return _read_file(ref, what, max_pixels, allow_paths, max_bytes)
    if isinstance(ref, str):
        text = ref.strip()
        if text.startswith("data:"):
            text = text.partition(",")[2]
        elif allow_paths and len(text) < 4096 and Path(text).expanduser().is_file():
            return _read_file(Path(text), what, max_pixels, allow_paths, max_bytes)
        text = "".join(text.split())  # line-wrapped base64 (MIME, `base64` without -w0), as A1111 accepts it
        _check_bytes(len(text) * 3 // 4, what, max_bytes)  # before decoding the base64
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(  # 240 characters: a mistyped path in full; base64 cut short
                f"{what}: {shown(text, 240)} is neither an existing image file nor base64 image data"
            ) from None
        return _decode(data, what, max_pixels)
    raise ImageError(f"{what}: expected a PIL image, a path or base64 data, got {type(ref).__name__}")


def _read_file(path: Path, what: str, max_pixels: int, allow_paths: bool, max_bytes: int):
    if not allow_paths:
        raise ImageError(f"{what}: file paths are not accepted here; send the image as base64")
    path = path.expanduser()
    if not path.is_file():
        raise ImageError(f"{what}: no image file at {path}")
    _check_bytes(path.stat().st_size, what, max_bytes)
    return _decode(path.read_bytes(), what, max_pixels)


def _check_bytes(size: int, what: str, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageTooLargeError(f"{what}: {size} bytes is more than the {max_bytes} accepted; send a smaller image")


def _decode(data: bytes, what: str, max_pixels: int):
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own check, for sizes far past ours, in open()
        raise ImageTooLargeError(
            f"{what}: {exc.args[0].split(' exceeds')[0].removeprefix('Image size (').rstrip(')')} is more than the "
            f"{max_pixels} pixels accepted; resize it (refused from the header, before decoding)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{what}: {len(data)} bytes that are not an image PIL can read (PNG, JPEG, WebP, ...)") from None
    _check_pixels(image, what, max_pixels)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{what}: image data is truncated or corrupt ({exc})") from None
    return upright(image).convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The picture as it is meant to be seen: phone photos store their pixels sideways plus an EXIF orientation
    tag, which viewers (and A1111, SD.Next, ComfyUI) apply before using the image."""
    if image.getexif().get(ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _check_pixels(image, what: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{what}: {width}x{height} pixels is more than the {max_pixels} accepted; resize it (checked before "
            f"decoding, so oversized and decompression-bomb images cost nothing)"
        )
    if width == 0 or height == 0:
        raise ImageError(
            f"{what}: {width}x{height} pixels is outside the accepted range (1 to {max_pixels} pixels); resize it"
        )


def image_digest(image: Image.Image) -> str:
    """Content hash of the decoded pixels: the same picture gives the same embedding key whatever its file."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()[:32]


def noise_image(size: int = 224) -> Image.Image:
    """The negative image a unit gets with `negative_images: ["noise"]`: uniform noise from a fixed seed, the same
    in every request (output depends on the request alone)."""
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def image_to_base64(image: Image.Image) -> str:
    """A small picture for a result's info (the face crop a FaceID unit used): base64 PNG."""
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
