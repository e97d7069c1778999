"""Random square crops of slot maps, for training the fully convolutional mask autoencoder.

The mask AE has no attention and no global pooling: every latent cell sees a fixed window of the
map. Trained on crops (``mask_ae.train_crop``) it encodes whole maps all the same, and a step on
``c × c`` crops costs about ``(c / H)²`` of a step on whole ``H × H`` maps.
"""

from __future__ import annotations

import torch


def random_crops(slot_map: torch.Tensor, valid: torch.Tensor, size: int, *, multiple: int = 1,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``size × size`` window per map.

    ``slot_map`` (B, H, W) int64 and ``valid`` (B, H, W) bool → the same windows of both,
    (B, size, size) each (copies). Offsets are drawn per map on ``generator`` (its device must be
    the maps'; None uses the global RNG) and are multiples of ``multiple`` (the AE's downsampling
    factor, so a crop's latent cells line up with the whole map's). Slot ids are kept as they are:
    the AE is class-agnostic and a crop just shows fewer segments.
    """
    if slot_map.shape != valid.shape or slot_map.ndim != 3:
        raise ValueError(f"slot_map and valid must both be (B, H, W), got {tuple(slot_map.shape)} and "
                         f"{tuple(valid.shape)}")
    batch, height, width = slot_map.shape
    if size < 1 or size > min(height, width):
        raise ValueError(f"crop size {size} must lie in [1, {min(height, width)}] for maps of {height}×{width} "
                         "(mask_ae.train_crop must not exceed data.resolution)")
    if size == height == width:
        return slot_map.clone(), valid.clone()
    step = max(int(multiple), 1)
    rows = torch.randint(0, (height - size) // step + 1, (batch,), generator=generator, device=slot_map.device) * step
    cols = torch.randint(0, (width - size) // step + 1, (batch,), generator=generator, device=slot_map.device) * step
    offsets = torch.arange(size, device=slot_map.device)
    r = (rows[:, None] + offsets)[:, :, None]  # (B, size, 1)
    c = (cols[:, None] + offsets)[:, None, :]  # (B, 1, size)
    b = torch.arange(batch, device=slot_map.device)[:, None, None]
    return slot_map[b, r, c], valid[b, r, c]
