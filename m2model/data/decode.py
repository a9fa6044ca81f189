"""Image bytes -> pixels on the Pillow path: header checks, conversion of every Pillow mode to 8-bit RGB
(the conversions DALI's decoder applies), crop, resize, flip.

Conversions (``to_rgb``), chosen so that Pillow and DALI give the same pixels for every mode Pillow opens:

* ``I;16`` (16-bit grey, e.g. 16-bit PNG and TIFF) and ``I`` (32-bit integer grey): 0-65535 scaled to
  0-255 (``round(v / 257)``, clipped), as DALI does; Pillow's own ``convert("RGB")`` clips instead,
  which turns almost every 16-bit image white;
* ``F`` (32-bit float grey): [0, 1] -> 0-255 (``floor(255 v + 0.5)``, clipped), as DALI's TIFF decoder;
* ``1``, ``L``, ``LA``, ``P``/``PA`` (palette, with or without transparency), ``RGBA``, ``CMYK`` and the
  rest: Pillow's ``convert("RGB")``; alpha and transparency are dropped, not composited (as DALI's RGB
  output), CMYK JPEGs use the same Adobe convention in both.

EXIF orientation is applied (DALI's ``adjust_orientation`` default), so width and height from
:func:`probe_image` are those of the upright image.
"""

from __future__ import annotations

import io

import numpy as np

# Conversions worth counting, so that a dataset's oddities are visible (decoded, not skipped).
CONVERTED_MODES = {"CMYK": "cmyk", "L": "grayscale", "LA": "grayscale", "1": "grayscale",
                   "I;16": "high_bit_depth", "I;16L": "high_bit_depth", "I;16B": "high_bit_depth",
                   "I;16N": "high_bit_depth", "I": "high_bit_depth", "F": "high_bit_depth",
                   "RGBA": "alpha", "P": "palette", "PA": "palette"}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# EXIF orientations 5-8 swap width and height (both decoders apply the tag in these formats).
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
_ORIENTED_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP", "PNG")
# What DALI's decoders read, and the TIFF modes they decode like Pillow (measured: 1, I and LA TIFFs fail
# or differ); other samples are decoded with Pillow on the DALI path too.
DALI_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM")
DALI_TIFF_MODES = ("L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16L", "I;16B", "F")


def dali_decodes(fmt: str, mode: str) -> bool:
    """Whether DALI decodes an image of this format and mode into the pixels Pillow gives."""
    return fmt in DALI_FORMATS and (fmt != "TIFF" or mode in DALI_TIFF_MODES)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is its counter name (missing, truncated, corrupt, ...)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def probe_image(data: bytes, tail: bytes | None = None) -> tuple[str, str, int, int]:
    """Parse only the header: (format, mode, width, height) of the upright image.

    ``data`` holds at least the header (the whole file, or its first bytes), ``tail`` the last bytes
    (default: ``data``). Raises :class:`BadSample` with reason ``truncated`` (empty, or a JPEG/PNG whose
    end marker is missing: catches cut files without decoding them) or ``corrupt`` (no readable header,
    zero size).
    """
    from PIL import Image

    tail = data if tail is None else tail
    if not data:
        raise BadSample("truncated", "no bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            # A PNG's eXIf chunk may follow the pixel data; read it only where it precedes them (no decode).
            oriented = fmt in _ORIENTED_FORMATS and (fmt != "PNG" or "exif" in im.info)
            orientation = im.getexif().get(0x0112, 1) if oriented else 1
    except Exception as e:  # Pillow raises many types for bad headers
        raise BadSample("corrupt", f"no readable image header ({type(e).__name__})") from None
    if fmt in ("JPEG", "MPO") and tail.rfind(b"\xff\xd9", max(0, len(tail) - 4096)) < 0:
        raise BadSample("truncated", "JPEG without its end marker")
    if fmt == "PNG" and tail.rfind(b"IEND", max(0, len(tail) - 64)) < 0:
        raise BadSample("truncated", "PNG without its IEND chunk")
    if w < 1 or h < 1:
        raise BadSample("corrupt", f"image size {w}x{h}")
    if orientation in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    return fmt, mode, w, h


def to_rgb(im):
    """An 8-bit RGB Pillow image from any mode (see the module docstring for the rules)."""
    from PIL import Image

    mode = im.mode
    if mode in _SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.float64)
        grey = np.clip(np.floor(grey / 257.0 + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        grey = np.asarray(im).astype(np.float64)
        grey = np.clip(np.floor(np.nan_to_num(grey) * 255.0 + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


def decode_rgb(data: bytes):
    """Decode to an upright 8-bit RGB Pillow image; raises :class:`BadSample` (``corrupt``) on failure."""
    import warnings

    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            # "Palette images with Transparency expressed in bytes should be converted to RGBA": the
            # transparency is dropped on purpose (as DALI's RGB output does).
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.format in _ORIENTED_FORMATS:
                    im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except BadSample:
        raise
    except Exception as e:  # OSError, SyntaxError, ValueError, struct.error ... on bad data
        raise BadSample("corrupt", f"{type(e).__name__}: {e}") from None


def transform(rgb, image_size: int, crop: tuple[int, int, int, int], flip: bool) -> np.ndarray:
    """Crop ``(x, y, w, h)``, resize to ``image_size`` squared (antialiased bicubic, as the official
    evaluation transform), flip: uint8 [S, S, 3]."""
    from PIL import Image

    x, y, w, h = crop
    # crop, then resize (torchvision's resized crop): the filter clamps at the window's border, as the
    # DALI path's resize of the cropped image does
    if (x, y, w, h) != (0, 0, *rgb.size):
        rgb = rgb.crop((x, y, x + w, y + h))
    rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    if flip:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(rgb, dtype=np.uint8)  # a writable copy (torch.from_numpy wants one)


def decode_transform(data: bytes, image_size: int, crop, flip: bool) -> np.ndarray:
    """The Pillow sample path: decode, convert, crop, resize, flip -> uint8 [S, S, 3]."""
    return transform(decode_rgb(data), image_size, crop, flip)
