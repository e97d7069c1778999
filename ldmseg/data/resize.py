"""Resize and pad to the training resolution, and back (docs/method.md#targets-and-encoding).

:func:`resize_pad` brings an image and its id map to R×R (aspect kept and padded, or squashed);
:func:`restore_size` takes predictions (ids or logits) at R×R back to the original image size.
Pure functions, no I/O.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from ldmseg.data.slots import check_id_map

if TYPE_CHECKING:
    import torch

ResizeMode = Literal["pad", "squash"]


@dataclass
class ResizeInfo:
    """Geometry of :func:`resize_pad`: the original size and where the image sits in R×R.

    In ``pad`` mode the resized image occupies rows [0, scaled_h) and columns [0, scaled_w);
    in ``squash`` mode scaled_h = scaled_w = resolution.
    """

    orig_h: int
    orig_w: int
    scaled_h: int
    scaled_w: int
    resolution: int
    mode: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ResizeInfo":
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"ResizeInfo.from_dict: missing keys {missing}; expected {names}")
        return cls(**{n: (str(d[n]) if n == "mode" else int(d[n])) for n in names})


def nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output pixels for nearest resampling (pixel centres)."""
    i = np.arange(dst, dtype=np.int64)
    return np.minimum(((2 * i + 1) * src) // (2 * dst), src - 1)


def scaled_size(height: int, width: int, resolution: int, mode: ResizeMode = "pad") -> tuple[int, int]:
    """(scaled_h, scaled_w): long side = resolution (``pad``) or both = resolution (``squash``)."""
    if mode == "squash":
        return resolution, resolution
    if mode != "pad":
        raise ValueError(f"mode must be 'pad' or 'squash', got {mode!r}")
    scale = resolution / max(height, width)
    return (max(1, min(resolution, int(np.floor(height * scale + 0.5)))),
            max(1, min(resolution, int(np.floor(width * scale + 0.5)))))


def resize_pad(
    image: np.ndarray | None,
    id_map: np.ndarray | None,
    resolution: int,
    mode: ResizeMode = "pad",
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray, ResizeInfo]:
    """Resize an image and/or its id map to R×R.

    Args:
        image: (H, W, 3) uint8 RGB, or None.
        id_map: (H, W) integer ids, or None (at least one of the two is needed).
        resolution: R.
        mode: ``pad`` resizes so the long side is R (aspect kept) and pads bottom/right with 0
            (image black, ids void); ``squash`` resizes to R×R ignoring the aspect ratio.

    Returns:
        ``image_r`` (R, R, 3) uint8 (bilinear) or None, ``id_r`` (R, R) int64 (nearest: ids are
        never blended) or None, ``valid`` (R, R) bool (False on padding) and a :class:`ResizeInfo`.
    """
    if image is None and id_map is None:
        raise ValueError("resize_pad needs an image, an id_map or both")
    if image is not None:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if id_map is not None:
        id_map = check_id_map(id_map)
    if image is not None and id_map is not None and image.shape[:2] != id_map.shape:
        raise ValueError(f"image {image.shape[:2]} and id_map {id_map.shape} sizes differ")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    h, w = image.shape[:2] if image is not None else id_map.shape
    sh, sw = scaled_size(h, w, resolution, mode)
    info = ResizeInfo(h, w, sh, sw, resolution, mode)

    image_r = id_r = None
    if image is not None:
        small = image if (sh, sw) == (h, w) else np.asarray(
            Image.fromarray(image).resize((sw, sh), Image.Resampling.BILINEAR))
        image_r = np.zeros((resolution, resolution, 3), dtype=np.uint8)
        image_r[:sh, :sw] = small
    if id_map is not None:
        id_r = np.zeros((resolution, resolution), dtype=np.int64)
        id_r[:sh, :sw] = id_map[np.ix_(nearest_index(h, sh), nearest_index(w, sw))]
    valid = np.zeros((resolution, resolution), dtype=bool)
    valid[:sh, :sw] = True
    return image_r, id_r, valid, info


def restore_size(
    array: np.ndarray | torch.Tensor, info: ResizeInfo, kind: Literal["ids", "logits"] = "ids"
) -> np.ndarray | torch.Tensor:
    """Take an R×R prediction back to the original image size: crop the valid region, resize.

    Args:
        array: ``kind="ids"``: (..., R, R) integer ids, resized nearest.
            ``kind="logits"``: (C, R, R) or (B, C, R, R) logits or probabilities, resized bilinear.
            numpy or torch (the output has the same kind, dtype and device).
        info: the :class:`ResizeInfo` returned by :func:`resize_pad`.

    Returns:
        (..., orig_h, orig_w).
    """
    r = info.resolution
    if tuple(array.shape[-2:]) != (r, r):
        raise ValueError(f"expected (..., {r}, {r}) for resolution {r}, got shape {tuple(array.shape)}")
    crop = array[..., : info.scaled_h, : info.scaled_w]
    if kind == "ids":
        rows = nearest_index(info.scaled_h, info.orig_h)
        cols = nearest_index(info.scaled_w, info.orig_w)
        torch = sys.modules.get("torch")  # loaded if crop is a tensor; never imported here
        if torch is not None and isinstance(crop, torch.Tensor):
            rows_t = torch.from_numpy(rows).to(crop.device)
            cols_t = torch.from_numpy(cols).to(crop.device)
            return crop.index_select(-2, rows_t).index_select(-1, cols_t)
        return crop[..., rows[:, None], cols[None, :]]
    if kind != "logits":
        raise ValueError(f"kind must be 'ids' or 'logits', got {kind!r}")
    if crop.ndim not in (3, 4):
        raise ValueError(f"logits must be (C, R, R) or (B, C, R, R), got shape {tuple(array.shape)}")
    import torch
    import torch.nn.functional as F

    is_torch = isinstance(crop, torch.Tensor)
    x = crop if is_torch else torch.from_numpy(np.array(crop))  # a writable copy
    x4 = x.unsqueeze(0) if x.ndim == 3 else x
    out = F.interpolate(x4.float(), size=(info.orig_h, info.orig_w), mode="bilinear", align_corners=False)
    out = (out[0] if x.ndim == 3 else out).to(x.dtype)
    return out if is_torch else out.numpy()
