"""Decoding one input image of ``ldmseg segment``: bytes → (H, W, 3) uint8 RGB, or a reason why not.

:func:`decode_image` accepts the formats of :data:`IMAGE_EXTENSIONS` by content (Pillow's detected
format, whatever the file is called) and any pixel mode those formats carry:

- ``1``, ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr`` and the modes with alpha (``LA``, ``PA``,
  ``RGBA``, ``RGBa``) go through Pillow's ``convert("RGB")``: **alpha is dropped, the stored
  colour kept** (a transparent palette entry shows its palette colour), exactly as
  ``ldmseg evaluate`` decodes its images.
- 16/32-bit integer modes (``I;16``, ``I;16B``, ``I``: 16-bit PNG and TIFF) are scaled from
  [0, 65535] to [0, 255] with rounding (``v / 257``), not clipped at 255 as ``convert`` does;
  ``F`` (float TIFF) is scaled from [0, 1]. Values outside that nominal range (negative or 32-bit
  data) are stretched from the image's min..max instead.
- EXIF orientation is applied; a multi-frame TIFF, WebP or MPO gives its first frame.

The pixel cap is checked on the header's size before any pixel is decoded (decompression bombs),
and Pillow's own bomb warning (``PIL.Image.MAX_IMAGE_PIXELS``) is an error too, through a
``warnings.catch_warnings`` block around the decode: the warning filters are restored afterwards,
so call this from one thread per process (as Ray tasks and actors do). A bad file raises
:class:`ImageDecodeError` whose ``reason`` is one of :data:`REASONS`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# File suffixes ``ldmseg segment`` searches for (compared in lower case).
IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# Pillow formats accepted by content: those of IMAGE_EXTENSIONS (MPO is a multi-picture JPEG).
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})

# The reasons a file is quarantined. "unreadable" is for the caller's read step (the bytes could not
# be read at all) and "model_error" for its model step; decode_image raises the others.
REASONS = {
    "empty": "the file has 0 bytes",
    "not_an_image": "no image format recognised in the content",
    "unsupported_format": "an image of a format other than JPEG, PNG, WebP, BMP, TIFF",
    "unsupported_mode": "a pixel mode that has no RGB conversion here (e.g. LAB)",
    "too_many_pixels": "the header declares more pixels than the cap (segment.max_pixels)",
    "truncated": "the file ends before its image data does",
    "corrupt": "damaged header or image data",
    "unreadable": "the file could not be read",
    "model_error": "the model failed on this image (the record holds its message)",
}

# Modes Pillow's convert("RGB") handles correctly (alpha dropped). Not LAB: convert copies its bands.
_CONVERTIBLE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"})

# Leading bytes of the accepted formats, to name the format of a file Pillow cannot open.
_SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP"}


class ImageDecodeError(ValueError):
    """A file that is not a usable image. ``reason``: a key of :data:`REASONS`; the message names the
    file and the problem, and says what to do when there is something to do."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown image decode reason {reason!r}; valid: {sorted(REASONS)}")
        super().__init__(message)
        self.reason = reason


def is_image_name(name: str) -> bool:
    """True when ``name`` (a path or URI) ends with one of :data:`IMAGE_EXTENSIONS`, in any letter case."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Bytes of one image file → (H, W, 3) uint8 RGB, EXIF orientation applied (H, W after it).

    ``name`` (the file's path or URI) only appears in error messages. Raises
    :class:`ImageDecodeError` when the file is empty, not an image, of another format or mode,
    has more than ``max_pixels`` pixels (checked before decoding), is truncated or is corrupt.
    A plain RGB JPEG gives exactly ``np.asarray(Image.open(...).convert("RGB"))``.
    """
    if len(data) == 0:
        raise ImageDecodeError("empty", f"{name}: the file is empty (0 bytes); re-copy it or remove it from the input")
    img = _open_and_load(data, name, max_pixels)
    try:
        return _to_rgb(img)
    finally:
        img.close()


def _open_and_load(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open, check the header (format, pixel count, mode), fully decode, apply EXIF orientation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_header(img, name, max_pixels)
            img.load()  # the whole first frame: a truncated file raises here (LOAD_TRUNCATED_IMAGES stays False)
            ImageOps.exif_transpose(img, in_place=True)
            return img
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        fmt = _sniff_format(data)
        if fmt is None:
            raise ImageDecodeError(
                "not_an_image", f"{name}: not an image file (no image format recognised in its content); "
                "give segment JPEG, PNG, WebP, BMP or TIFF files") from None
        reason = "truncated" if _ends_early(data, fmt) else "corrupt"
        raise ImageDecodeError(reason, f"{name}: starts like a {fmt} file but its header cannot be read "
                               f"({reason}); re-copy or re-export it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(
            "too_many_pixels", f"{name}: {exc} Pillow's own limit PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS} refuses it whatever segment.max_pixels says; downscale the image") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ... on bad data
        fmt = _sniff_format(data) or "image"
        if "truncated" in str(exc).lower() or _ends_early(data, fmt):
            raise ImageDecodeError("truncated", f"{name}: the {fmt} file is truncated ({exc}); "
                                   "re-copy or re-download it") from None
        raise ImageDecodeError("corrupt", f"{name}: the {fmt} data is corrupt ({type(exc).__name__}: {exc}); "
                               "re-copy or re-export it") from None


def _check_header(img: Image.Image, name: str, max_pixels: int) -> None:
    """Refuse by header alone: another format, too many pixels, a mode without RGB conversion."""
    if img.format not in ACCEPTED_FORMATS:
        raise ImageDecodeError("unsupported_format", f"{name}: a {img.format} image; segment reads JPEG, PNG, "
                               "WebP, BMP and TIFF only: convert it to PNG or JPEG")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels", f"{name}: {width}x{height} = {width * height} pixels is over the cap of "
            f"{max_pixels} (a guard against decompression bombs); if the image is genuine, raise the cap "
            "with the config key segment.max_pixels")
    if not (img.mode in _CONVERTIBLE_MODES or img.mode == "F" or img.mode == "I" or img.mode.startswith("I;")):
        raise ImageDecodeError("unsupported_mode", f"{name}: pixel mode {img.mode} of this {img.format} image "
                               "is not supported; convert it to RGB")


def _to_rgb(img: Image.Image) -> np.ndarray:
    """A loaded image of a checked mode → (H, W, 3) uint8 (see the module docstring for each mode)."""
    if img.mode in _CONVERTIBLE_MODES:
        return np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
    values = np.nan_to_num(np.asarray(img, dtype=np.float32))
    full_scale = 1.0 if img.mode == "F" else 65535.0
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > full_scale:  # outside the nominal range: stretch min..max
        full_scale = high - low or 1.0
        values -= low
    gray = np.rint(values * (255.0 / full_scale)).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def _sniff_format(data: bytes) -> str | None:
    """The accepted format ``data`` starts like, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES.items() if data.startswith(magic)), None)


def _ends_early(data: bytes, fmt: str) -> bool:
    """True when a file of ``fmt`` lacks its end: JPEG's EOI marker, PNG's IEND chunk, WebP's RIFF length."""
    if fmt == "JPEG":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" not in data[-32:]
    if fmt == "WEBP":
        return len(data) < 8 + int.from_bytes(data[4:8], "little")
    return False
