"""The A1111 ControlNet extension's preprocessors that need no model weights, computed as it computes them.

Each takes an HxWx3 uint8 RGB array, the processor resolution and the two slider values, and returns an HxWx3
uint8 array. The rules (interpolations, sigmas, thresholds, where the padding comes off) are the extension's,
read from its code; OpenCV is imported when one runs.
"""

from __future__ import annotations

import numpy as np

from .resize import hwc3, resize_with_pad


def none(image, resolution, a, b, weights):
    """The image as sent: the client sent a finished control map."""
    return hwc3(image)


def invert(image, resolution, a, b, weights):
    """White background and black lines turned into the black background and white lines the models want."""
    return 255 - hwc3(image)


def canny(image, resolution, a, b, weights):
    """cv2.Canny at the processor resolution with the low and high thresholds as integers."""
    import cv2

    img, remove_pad = resize_with_pad(image, resolution)
    return remove_pad(cv2.cvtColor(cv2.Canny(img, int(a), int(b)), cv2.COLOR_GRAY2RGB))


def scribble_xdog(image, resolution, a, b, weights):
    """Difference of Gaussians (sigma 0.5 and 5), white where twice the darkest channel's response exceeds the
    XDoG threshold."""
    import cv2

    img, remove_pad = resize_with_pad(image, resolution)
    g1 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(img, dtype=np.uint8)
    result[2 * (255 - dog) > a] = 255
    return remove_pad(result)


def blur_gaussian(image, resolution, a, b, weights):
    """A Gaussian blur with sigma `a` of the image at the processor resolution (for tile models)."""
    import cv2

    img, remove_pad = resize_with_pad(image, resolution)
    return hwc3(cv2.GaussianBlur(remove_pad(img), (0, 0), float(a)))


def tile_resample(image, resolution, a, b, weights):
    """The image shrunk by the down-sampling rate `a` (INTER_AREA, sizes truncated); rates below 1.1 leave it as
    it is. The processor resolution plays no part, as in the extension."""
    import cv2

    img = hwc3(image)
    if a < 1.1:
        return img
    height, width = int(float(img.shape[0]) / float(a)), int(float(img.shape[1]) / float(a))
    return hwc3(cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA))


def threshold(image, resolution, a, b, weights):
    """White where the darkest channel is above the binarisation threshold `a`."""
    img, remove_pad = resize_with_pad(image, resolution)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > a] = 255
    return remove_pad(result)


def lineart_standard(image, resolution, a, b, weights):
    """Lines from a blur difference (sigma 6), scaled by the median of the visible responses."""
    import cv2

    img, remove_pad = resize_with_pad(image, resolution)
    x = img.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    return hwc3(remove_pad(intensity.clip(0, 255).astype(np.uint8)))


def color_grid(image, resolution, a, b, weights):
    """t2ia_color_grid: short side to the resolution (INTER_AREA), down by 64 (INTER_CUBIC), back up (nearest)."""
    import cv2

    img = hwc3(image)
    h, w = img.shape[:2]
    if h < w:
        new_h, new_w = resolution, int(round(w / h * resolution))
    else:
        new_w, new_h = resolution, int(round(h / w * resolution))
    img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    small = cv2.resize(img, (w // 64, h // 64), interpolation=cv2.INTER_CUBIC)
    return hwc3(cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST))


def recolor(image, channel_conversion: str, index: int, gamma: float) -> np.ndarray:
    """One channel of a colour conversion, gamma-corrected, as grey RGB. The extension converts its RGB input
    with OpenCV's BGR conversions; so does this, for the same numbers."""
    import cv2

    result = cv2.cvtColor(hwc3(image), getattr(cv2, channel_conversion))
    result = result[:, :, index].astype(np.float32) / 255.0
    result = (result ** gamma * 255.0).clip(0, 255).astype(np.uint8)
    return cv2.cvtColor(result, cv2.COLOR_GRAY2RGB)


def recolor_luminance(image, resolution, a, b, weights):
    """The L channel of Lab, to the power `a` (gamma)."""
    return recolor(image, "COLOR_BGR2LAB", 0, a)


def recolor_intensity(image, resolution, a, b, weights):
    """The V channel of HSV, to the power `a` (gamma)."""
    return recolor(image, "COLOR_BGR2HSV", 2, a)
