"""Safe image decoding: untrusted bytes in, an RGB PIL image out, or :class:`BadImage` with the reason."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from cpp.logging import get_logger

_log = get_logger(__name__)

DEFAULT_MAX_PIXELS = 64_000_000
_WHITE = (255, 255, 255)


class BadImage(Exception):
    """The bytes are not a usable image; ``reason`` says why (recorded in the store's skipped list)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode ``data`` into an upright RGB image.

    Handles EXIF orientation, CMYK, 16-bit and float greyscale, palettes and alpha (composited on white);
    animated images give their first frame. Raises :class:`BadImage` for empty, non-image, corrupt,
    truncated and oversized (more than ``max_pixels`` pixels, e.g. decompression bombs) data.

    ``min_size`` is the smallest upright ``(width, height)`` the caller needs (an encoder's resize target,
    :attr:`cpp.encoders.preprocessing.ImageGeometry.min_source_size`): a JPEG is then decoded by libjpeg at
    1/2, 1/4 or 1/8 scale where both sides stay at least that large (Pillow's draft mode), which costs a
    fraction of the full decode; other formats, and JPEGs too small to shrink, decode at full size.
    """
    if min_size is not None and min(min_size) < 1:
        raise ValueError(f"min_size must be positive, got {min_size}")
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"too large: {exc}") from None
    except Exception as exc:  # PIL raises many exception types on malformed headers
        raise BadImage(f"corrupt image header ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImage(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise BadImage(
            f"too large: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}"
        )
    try:
        image.seek(0)
        if min_size is not None and image.format in _DRAFTABLE:
            _draft(image, min_size)
        image.load()
    except Exception as exc:  # truncated data, bad compressed stream, ...
        raise BadImage(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None
    image = _upright(image)
    try:
        return _to_rgb(image)
    except Exception as exc:
        raise BadImage(f"unsupported pixel data (mode {image.mode}: {type(exc).__name__}: {exc})") from None


#: Formats whose decoder can reduce while decoding (libjpeg's DCT scaling; MPO is a JPEG with extra frames).
_DRAFTABLE = frozenset({"JPEG", "MPO"})
#: EXIF orientations that need a transpose (1 is upright; other values are invalid and ignored).
_TRANSPOSING = frozenset(range(2, 9))
#: EXIF orientations that swap width and height (transpose, rotations by 90 and 270 degrees, transverse).
_SWAPS_AXES = frozenset({5, 6, 7, 8})


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation tag, 1 when absent; a malformed EXIF block counts as absent."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:  # malformed EXIF must not cost a readable image
        _log.debug("ignoring malformed EXIF orientation: %s", exc)
        return 1
    return value if isinstance(value, int) else 1


def _draft(image: Image.Image, min_size: tuple[int, int]) -> None:
    """Let libjpeg decode at the largest power-of-two reduction (up to 1/8) that keeps the upright image at
    least ``min_size``; Pillow picks the scale from the stored size, so the request is turned with it."""
    width, height = min_size
    turned = _orientation(image) in _SWAPS_AXES
    image.draft(None, (height, width) if turned else (width, height))


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; an upright image is returned as it is (no copy)."""
    if _orientation(image) not in _TRANSPOSING:
        return image
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # malformed EXIF must not cost a readable image
        _log.debug("ignoring malformed EXIF orientation: %s", exc)
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float greyscale to 8 bits."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode.startswith("I;16"):
        scaled = values / 257.0
    elif image.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0
    elif values.size and values.min() >= 0 and values.max() <= 255:
        scaled = values
    elif values.size and values.min() >= 0 and values.max() <= 65535:
        scaled = values / 257.0
    else:
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        scaled = (values - low) * (255.0 / (high - low if high > low else 1.0))
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
