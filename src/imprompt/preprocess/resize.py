"""Control images sized as the A1111 ControlNet extension sizes them.

Two steps, both the extension's rules (written from reading its code, not copied):
- the detector's input: the short side scaled to the processor resolution (`resize_with_pad`: INTER_CUBIC when
  enlarging, INTER_AREA when shrinking, then edge-padded to a multiple of 64 that `remove_pad` takes off again);
- the control map: fitted to the generation size by `fit` with the unit's resize mode, through the extension's
  "high quality" resize (nearest for maps of few colours, OTSU-binarised and thinned for one-pixel edges).
`pixel_perfect_resolution` is the processor resolution the extension picks when a unit asks for pixel perfect.
OpenCV is imported when a function runs, so `import imprompt` never needs it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import RequestError

RESIZE, CROP, FILL = "Just Resize", "Crop and Resize", "Resize and Fill"
RESIZE_MODES = (RESIZE, CROP, FILL)
ALIASES = {
    "Inner Fit (Scale to Fit)": CROP,
    "Outer Fit (Shrink to Fit)": FILL,
    "Scale to Fit (Inner Fit)": CROP,
    "Envelope (Outer Fit)": FILL,
    "Just Resize (Latent upscale)": RESIZE,
}


def resize_mode(value) -> str:
    """The extension's resize mode from what a client sends: its names, their aliases, or the index (0 Just Resize,
    1 Crop and Resize, 2 Resize and Fill; 3, the old latent-upscale entry, and larger ints mean Just Resize, as the
    extension reads them)."""
    if isinstance(value, bool):
        raise RequestError(f"resize_mode {value!r}: expected one of {list(RESIZE_MODES)} or 0, 1, 2")
    if isinstance(value, int):
        if value < 0:
            raise RequestError(f"resize_mode {value}: expected 0 (Just Resize), 1 (Crop and Resize) or "
                               "2 (Resize and Fill)")
        return RESIZE_MODES[value] if value < 3 else RESIZE
    if isinstance(value, str):
        if value in RESIZE_MODES:
            return value
        if value in ALIASES:
            return ALIASES[value]
        if value.strip().isdigit():
            return resize_mode(int(value.strip()))
    raise RequestError(f"resize_mode {value!r}: expected one of {list(RESIZE_MODES) + list(ALIASES)} "
                       "or 0, 1, 2")


def hwc3(x: np.ndarray) -> np.ndarray:
    """An image array as 3-channel uint8 RGB, as the extension's HWC3 makes it: grey repeated, alpha composited
    over white."""
    if x.dtype != np.uint8:
        raise RequestError(f"image array of dtype {x.dtype}: expected uint8")
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 3:
        return x
    if channels == 1:
        return np.concatenate([x, x, x], axis=2)
    if channels == 4:
        colour = x[:, :, 0:3].astype(np.float32)
        alpha = x[:, :, 3:4].astype(np.float32) / 255.0
        return (colour * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    raise RequestError(f"image with {channels} channels: expected 1, 3 or 4")


def as_array(image: Image.Image) -> np.ndarray:
    """A PIL image as the HxWx3 uint8 RGB array the extension's preprocessors receive."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return hwc3(np.asarray(image.convert("RGBA")))
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return hwc3(np.asarray(image))


def pad64(x: int) -> int:
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_with_pad(img: np.ndarray, resolution: int):
    """The detector's input: short side to `resolution`, padded (edge) to multiples of 64. Returns the padded
    array and the function that crops a result back to the unpadded size."""
    import cv2

    img = hwc3(img)
    raw_h, raw_w, _ = img.shape
    k = float(resolution) / float(min(raw_h, raw_w))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    target_h = int(np.round(float(raw_h) * k))
    target_w = int(np.round(float(raw_w) * k))
    img = cv2.resize(img, (target_w, target_h), interpolation=interpolation)
    padded = np.pad(img, [[0, pad64(target_h)], [0, pad64(target_w)], [0, 0]], mode="edge")

    def remove_pad(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x[:target_h, :target_w]).copy()

    return np.ascontiguousarray(padded).copy(), remove_pad


def unique_colours(pixels: np.ndarray) -> int:
    """How many distinct rows (colours) an N x C array holds."""
    return len(np.unique(pixels, axis=0))


THIN_KERNELS_RAW = (
    np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
    np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32),
)
PRUNE_KERNELS_RAW = (
    np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
    np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32),
)


def rotations(kernels) -> list[np.ndarray]:
    """The kernels turned by 0, 90, 180 and 270 degrees, in that order (each turn applied to every kernel)."""
    return [np.rot90(k, k=turn, axes=(0, 1)) for turn in range(4) for k in kernels]


def thin_pass(x: np.ndarray, kernels) -> tuple[np.ndarray, bool]:
    """One hit-or-miss pass: pixels matching any kernel cleared. Returns the image and whether nothing changed."""
    import cv2

    unchanged = True
    for kernel in kernels:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127)
        x[hits] = 0
        if hits[0].shape[0] > 0:
            unchanged = False
    return x, unchanged


def thin(x: np.ndarray, prune: bool) -> np.ndarray:
    """The extension's edge thinning (lvmin_thin): up to 32 passes, then one pruning pass when enlarging."""
    for _ in range(32):
        x, done = thin_pass(x, rotations(THIN_KERNELS_RAW))
        if done:
            break
    if prune:
        x, _ = thin_pass(x, rotations(PRUNE_KERNELS_RAW))
    return x


def line_nms(x: np.ndarray) -> np.ndarray:
    """Keeps the pixels that are maxima along at least one of the four directions (the extension's nake_nms)."""
    import cv2

    lines = (
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    )
    y = np.zeros_like(x)
    for kernel in lines:
        np.putmask(y, cv2.dilate(x, kernel=kernel) == x, x)
    return y


def high_quality_resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The extension's control-map resize to `size` (width, height): maps of 3..199 colours (segmentation) with
    nearest; black-and-white maps averaged and OTSU-thresholded after resizing, one-pixel edges thinned again;
    everything else INTER_AREA when shrinking and INTER_CUBIC otherwise."""
    import cv2

    width, height = size
    if x.shape[0] == height and x.shape[1] == width:
        return x
    smaller = width * height < x.shape[0] * x.shape[1]
    bigger = width * height > x.shape[0] * x.shape[1]
    colours = unique_colours(x.reshape(-1, x.shape[2]))
    binary = one_pixel_edge = False
    if colours == 2:
        binary = bool(np.min(x) < 16 and np.max(x) > 240)
        if binary:
            square = np.ones(shape=(3, 3), dtype=np.uint8)
            opened = cv2.dilate(cv2.erode(x, square, iterations=1), square, iterations=1)
            one_pixel_edge = np.where(opened < x)[0].shape[0] * 2 > np.where(x > 127)[0].shape[0]
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif smaller:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if binary:
        y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if one_pixel_edge:
            y = line_nms(y)
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = thin(y, prune=bigger)
        else:
            _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([y] * 3, axis=2)
    return y


def fit_array(detected: np.ndarray, width: int, height: int, mode) -> np.ndarray:
    """`fit` on arrays (HxWxC uint8 in, height x width x 3 out)."""
    mode = resize_mode(mode)
    detected = hwc3(detected)
    if mode == RESIZE:
        return np.ascontiguousarray(high_quality_resize(detected, (width, height)))
    old_h, old_w = float(detected.shape[0]), float(detected.shape[1])
    k0, k1 = float(height) / old_h, float(width) / old_w
    if mode == FILL:
        k = min(k0, k1)
        borders = np.concatenate([detected[0, :, :], detected[-1, :, :], detected[:, 0, :], detected[:, -1, :]], axis=0)
        border = np.median(borders, axis=0).astype(detected.dtype)
        canvas = np.tile(border[None, None], [height, width, 1])
        resized = high_quality_resize(detected, (int(np.round(old_w * k)), int(np.round(old_h * k))))
        new_h, new_w = resized.shape[:2]
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        canvas[top:top + new_h, left:left + new_w] = resized
        return np.ascontiguousarray(canvas)
    k = max(k0, k1)
    resized = high_quality_resize(detected, (int(np.round(old_w * k)), int(np.round(old_h * k))))
    new_h, new_w = resized.shape[:2]
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def fit(image: Image.Image, width: int, height: int, resize_mode_value) -> Image.Image:
    """A control map fitted to the generation size as the extension fits it: "Just Resize" stretches, "Crop and
    Resize" scales to cover and crops the centre, "Resize and Fill" scales to fit and fills the rest with the
    median colour of the map's border."""
    return Image.fromarray(fit_array(as_array(image), int(width), int(height), resize_mode_value))


def pixel_perfect_resolution(image, width: int, height: int, resize_mode_value) -> int:
    """The processor resolution for "pixel perfect": the image's short side times the scale the resize mode will
    apply (the smaller of the two scales for Resize and Fill, the larger otherwise), rounded."""
    if isinstance(image, Image.Image):
        raw_w, raw_h = image.size
    else:
        raw_h, raw_w = image.shape[:2]
    k0, k1 = float(height) / float(raw_h), float(width) / float(raw_w)
    k = min(k0, k1) if resize_mode(resize_mode_value) == FILL else max(k0, k1)
    return int(np.round(k * float(min(raw_h, raw_w))))
