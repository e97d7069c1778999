"""The network encoding of targets and images (docs/method.md#targets-and-encoding): pure functions.

:func:`ids_to_bits` writes a slot map as log2(S) bit planes in {−1, +1} (void: 0 in every plane),
the mask autoencoder's input; :func:`bits_to_ids` inverts it. :func:`image_to_tensor` and
:func:`tensor_to_image` convert uint8 RGB images to and from the networks' [−1, 1] tensors.

The steps before live in :mod:`ldmseg.data.slots` (cleaning, random id slots) and
:mod:`ldmseg.data.resize` (resize and pad).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import numpy as np


if TYPE_CHECKING:
    import torch


def _is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor. torch is imported only where it is used: preprocessing
    workers never need it (importing it costs ~1.5 s per process), and a tensor implies it is loaded."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


# --------------------------------------------------------------------------------------------
# Bit planes
# --------------------------------------------------------------------------------------------


def ids_to_bits(slot_map: np.ndarray | torch.Tensor, num_bits: int) -> np.ndarray | torch.Tensor:
    """Slot ids → bit planes, LSB first, in {−1, +1}; void (0) pixels are 0 in every plane.

    Args:
        slot_map: (H, W) or (B, H, W) integer slots in [0, 2**num_bits), numpy or torch.
        num_bits: nb = log2(S).

    Returns:
        (nb, H, W) or (B, nb, H, W) float32, of the input's kind (torch: on the same device).
    """
    is_torch = _is_tensor(slot_map)
    if is_torch:
        import torch
    ids = slot_map.long() if is_torch else np.asarray(slot_map)
    if ids.ndim not in (2, 3):
        raise ValueError(f"slot_map must be (H, W) or (B, H, W), got shape {tuple(ids.shape)}")
    if is_torch:
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"slot_map must hold integers, got {slot_map.dtype}")
    elif not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"slot_map must hold integers, got {ids.dtype}")
    if num_bits < 1:
        raise ValueError(f"num_bits must be >= 1, got {num_bits}")
    if ids.numel() if is_torch else ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= 2**num_bits:
            raise ValueError(
                f"slot_map values must lie in [0, {2 ** num_bits}) for {num_bits} bits, got [{lo}, {hi}]; "
                "remap segment ids to slots with remap_ids first"
            )

    if is_torch:
        shifts = torch.arange(num_bits, device=ids.device).view(num_bits, 1, 1)
        planes = (ids.unsqueeze(-3) >> shifts) & 1
        bits = planes.float() * 2 - 1
        return bits * (ids != 0).unsqueeze(-3).float()
    ids = ids.astype(np.int64, copy=False)
    shifts = np.arange(num_bits, dtype=np.int64).reshape(num_bits, 1, 1)
    planes = (np.expand_dims(ids, -3) >> shifts) & 1
    bits = planes.astype(np.float32) * 2 - 1
    return bits * np.expand_dims(ids != 0, -3).astype(np.float32)


def bits_to_ids(bits: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Bit planes → slot ids: the inverse of :func:`ids_to_bits`.

    Args:
        bits: (nb, H, W) or (B, nb, H, W) real values, numpy or torch.

    Returns:
        (H, W) or (B, H, W) int64 of the input's kind. A pixel is void (0) when the mean of
        ``|bits|`` over its planes is < 0.5; otherwise bit k is ``bits[k] > 0``.
    """
    is_torch = _is_tensor(bits)
    if is_torch:
        import torch
    if bits.ndim not in (3, 4):
        raise ValueError(f"bits must be (nb, H, W) or (B, nb, H, W), got shape {tuple(bits.shape)}")
    nb = bits.shape[-3]
    if is_torch:
        x = bits.float()
        weights = (2 ** torch.arange(nb, device=x.device, dtype=torch.int64)).view(nb, 1, 1)
        ids = ((x > 0).long() * weights).sum(dim=-3)
        void = x.abs().mean(dim=-3) < 0.5
        return torch.where(void, torch.zeros_like(ids), ids)
    x = np.asarray(bits, dtype=np.float32)
    weights = (2 ** np.arange(nb, dtype=np.int64)).reshape(nb, 1, 1)
    ids = ((x > 0).astype(np.int64) * weights).sum(axis=-3)
    void = np.abs(x).mean(axis=-3) < 0.5
    return np.where(void, 0, ids).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Image tensors
# --------------------------------------------------------------------------------------------


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) or (B, H, W, 3) uint8 RGB → (3, H, W) or (B, 3, H, W) float32 in [−1, 1]."""
    import torch

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(
            f"image must be (H, W, 3) or (B, H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}"
        )
    t = torch.from_numpy(image.astype(np.float32)) / 127.5 - 1.0
    return t.movedim(-1, -3).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """(3, H, W) or (B, 3, H, W) float in [−1, 1] → (H, W, 3) or (B, H, W, 3) uint8 (clamped, rounded)."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.ndim not in (3, 4) or tensor.shape[-3] != 3:
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) torch tensor, got {getattr(tensor, 'shape', tensor)!r}")
    x = ((tensor.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).movedim(-3, -1).numpy()
