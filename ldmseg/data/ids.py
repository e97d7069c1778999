"""COCO panoptic colour ↔ segment id: id = R + 256·G + 256²·B, 0 = void.

Decoding uses a wide integer type: ``uint8 * 256`` overflows under NumPy 2.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MAX_ID = 256**3 - 1


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


def panoptic_rgb(img: Image.Image) -> Image.Image:
    """A loaded panoptic PNG as an RGB image (RGBA, palette and grey are converted); raises
    ``ValueError`` for any other mode."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "P", "L"):
        return img.convert("RGB")
    raise ValueError(f"panoptic PNG has mode {img.mode}, expected RGB")


def decode_panoptic_png(data: bytes) -> np.ndarray:
    """PNG bytes → (H, W) int64 ids. Raises ``ValueError`` for non-RGB or unreadable data."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return rgb_to_id(np.asarray(panoptic_rgb(img)))


def encode_panoptic_png(ids: np.ndarray) -> bytes:
    """(H, W) ids → PNG bytes (RGB, COCO panoptic colours)."""
    buf = io.BytesIO()
    Image.fromarray(id_to_rgb(ids), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
