"""COCO panoptic colour ↔ segment id: id = R + 256·G + 256²·B, 0 = void; the one panoptic PNG codec.

:func:`read_panoptic_ids` is the single decoder of panoptic PNGs (dataset reading, the PQ
evaluator, tests): RGB, RGBA (alpha ignored), palette and grey PNGs. Decoding uses a wide integer
type: ``uint8 * 256`` overflows under NumPy 2.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

try:
    import pyarrow as pa
except ImportError:  # pragma: no cover - pyarrow is a dependency; the copy below works without it
    pa = None

MAX_ID = 256**3 - 1
PANOPTIC_MODES = ("RGB", "RGBA", "P", "L")
_ID_MASK = np.uint32(MAX_ID)  # drops the 4th byte of an RGBX / RGBA pixel read as little-endian uint32


def is_crowd(segment: dict) -> bool:
    """A ``segments_info`` entry's ``iscrowd`` (COCO: 0 or 1; absent = 0) as a bool.

    The one reading of the flag everywhere (cleaning, PQ, validation): anything but 0, 1, true or
    false raises ``ValueError`` (the string ``"0"`` is not silently a crowd).
    """
    value = segment.get("iscrowd", 0)
    if value is None or isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    raise ValueError(f"segment {segment.get('id')!r} has iscrowd {value!r}; COCO allows 0 or 1")


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 → (H, W) int64 segment ids."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) colour array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32, copy=False)  # 24-bit ids fit int32; bit ops there are fastest
    return (rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)).astype(np.int64)


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) integer ids in [0, 2²⁴) → (H, W, 3) uint8 colours."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise ValueError(f"segment ids must lie in [0, {MAX_ID}], got [{ids.min()}, {ids.max()}]")
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def read_panoptic_ids(source: bytes | str | os.PathLike, dtype: type = np.int64) -> np.ndarray:
    """A panoptic PNG (its bytes or its path) → (H, W) segment ids of ``dtype`` (int64 or uint32).

    PIL keeps RGB pixels as 4 bytes: NumPy reads them as one little-endian uint32 per pixel
    (through PIL's Arrow export, without a copy, when available) and one mask drops the 4th byte
    (X, or the alpha of an RGBA PNG). Palette and grey PNGs are converted to RGB first.

    Raises PIL's ``UnidentifiedImageError`` (not an image), ``OSError`` (truncated or unreadable;
    ``FileNotFoundError`` for a missing path) or ``ValueError`` (another PNG mode, e.g. 16-bit
    grey: a panoptic PNG must hold RGB colours).
    """
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source) as img:
        if img.mode not in PANOPTIC_MODES:
            raise ValueError(f"panoptic PNG has mode {img.mode}, expected RGB "
                             "(segment id = R + 256·G + 256²·B); save it as an RGB PNG")
        img.load()
        rgb = img if img.mode in ("RGB", "RGBA") else img.convert("RGB")
        width, height = rgb.size
        pixels = _pixels_as_uint32(rgb)
    ids = np.empty(pixels.size, dtype=dtype)
    np.bitwise_and(pixels, _ID_MASK, out=ids, casting="unsafe")
    return ids.reshape(height, width)


def _pixels_as_uint32(img: Image.Image) -> np.ndarray:
    """(H·W,) little-endian uint32 view of an RGB/RGBA image's 4-byte pixels (4th byte: X or alpha)."""
    if pa is not None and hasattr(img, "__arrow_c_array__"):  # Pillow >= 11.2: no copy
        try:
            return pa.array(img).flatten().to_numpy(zero_copy_only=True).view("<u4")
        except (pa.ArrowException, ValueError, TypeError):
            pass  # e.g. a very large image spread over several memory blocks
    return np.frombuffer(img.tobytes("raw", "RGBX" if img.mode == "RGB" else "RGBA"), dtype="<u4")


def decode_panoptic_png(data: bytes) -> np.ndarray:
    """PNG bytes → (H, W) int64 ids (:func:`read_panoptic_ids`; same errors)."""
    return read_panoptic_ids(data, np.int64)


def encode_panoptic_png(ids: np.ndarray) -> bytes:
    """(H, W) ids → PNG bytes (RGB, COCO panoptic colours)."""
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
