"""Procedural panoptic maps with COCO-like outlines, for training the mask autoencoder.

The mask AE is class-agnostic and never sees the image, so any panoptic map is training data.
The synthetic scenes of :mod:`ldmseg.data.synthetic` have few, smooth, convex-ish segments; real
COCO maps have many segments of very different sizes, wiggly outlines, thin parts, and stuff
regions that tile the background. :func:`random_slot_maps` draws maps of that kind directly as
slot maps (no image, no PNG), so the AE stage can mix them into its batches
(``mask_ae.random_map_fraction``) and learn outlines its scenes do not show.

A map is built in torch, for a whole batch at once:

1. a smooth random warp of the pixel grid (low-frequency noise), which bends every outline;
2. stuff: a Voronoi partition of the warped grid into 1..``max_stuff`` regions;
3. things: up to ``max_things`` blobs painted back to front (later ones occlude earlier ones):
   rotated ellipses with log-uniform sizes (a few pixels to a third of the image), aspect ratios
   up to ~7 (thin parts) and their own low-frequency boundary noise; a few are void;
4. per map: segments under ``min_area`` pixels become void, the largest ``num_slots − 1`` keep a
   slot, and slots are drawn at random (:func:`ldmseg.data.slots.clean_remap_labels`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ldmseg.data.slots import clean_remap_labels


def _smooth_noise(shape: tuple[int, ...], grid: int, size: int, generator: torch.Generator | None,
                  device: torch.device) -> torch.Tensor:
    """(B, C, size, size) float32: N(0, 1) on a ``grid``×``grid`` lattice, upsampled bicubically."""
    coarse = torch.randn(*shape, grid, grid, generator=generator, device=device)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def _uniform(shape: tuple[int, ...], lo: float, hi: float, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=generator, device=device)


@torch.no_grad()
def random_slot_maps(
    n: int,
    size: int,
    num_slots: int,
    *,
    min_area: int = 10,
    max_stuff: int = 6,
    max_things: int = 24,
    void_prob: float = 0.05,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` COCO-like panoptic maps as slot maps.

    Args:
        n: maps to draw.
        size: H = W in pixels.
        num_slots: S; slot 0 is void, at most S − 1 segments per map keep a slot (the largest).
        min_area: segments with fewer pixels become void.
        max_stuff: stuff regions per map, drawn uniformly in 1..max_stuff.
        max_things: things per map, drawn uniformly in 0..max_things.
        void_prob: chance that a thing is painted as void (unlabelled pixels).
        generator: torch generator on ``device`` (``None``: the global RNG).

    Returns:
        (n, size, size) int64 slot map in [0, S), on ``device``.
    """
    if n < 0 or size < 1 or num_slots < 2:
        raise ValueError(f"need n >= 0, size >= 1 and num_slots >= 2, got {n}, {size}, {num_slots}")
    if max_stuff < 1 or max_things < 0:
        raise ValueError(f"need max_stuff >= 1 and max_things >= 0, got {max_stuff}, {max_things}")
    device = torch.device(device) if device is not None else (generator.device if generator is not None
                                                              else torch.device("cpu"))
    g = generator
    axis = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")  # (H, W) in (0, 1)

    # 1. warp: ~4-8 bumps across the image, a few pixels of displacement
    warp = _smooth_noise((n, 2), int(torch.randint(3, 8, (1,), generator=g, device=device)), size, g, device)
    amp = _uniform((n, 1, 1, 1), 0.0, 0.06, g, device)
    wy = yy + amp[:, 0] * warp[:, 0]
    wx = xx + amp[:, 0] * warp[:, 1]  # (n, H, W)

    # 2. stuff: Voronoi regions of the warped grid (unused seeds pushed far away)
    seeds = torch.rand(n, max_stuff, 2, generator=g, device=device)
    k = torch.randint(1, max_stuff + 1, (n, 1), generator=g, device=device)
    far = (torch.arange(max_stuff, device=device)[None] >= k).float() * 1e3  # (n, max_stuff)
    dist = ((wy[:, None] - seeds[..., 0, None, None]) ** 2 + (wx[:, None] - seeds[..., 1, None, None]) ** 2
            + far[..., None, None])
    labels = dist.argmin(dim=1) + 1  # (n, H, W) in 1..max_stuff

    # 3. things, back to front
    n_things = torch.randint(0, max_things + 1, (n,), generator=g, device=device)
    min_r, max_r = math.log(1.2 / size), math.log(0.35)
    for i in range(max_things):
        active = (n_things > i)[:, None, None]  # (n, 1, 1)
        cy, cx = torch.rand(n, 1, 1, generator=g, device=device), torch.rand(n, 1, 1, generator=g, device=device)
        r = torch.exp(_uniform((n, 1, 1), min_r, max_r, g, device))
        aspect = torch.exp(_uniform((n, 1, 1), -1.0, 1.0, g, device))
        theta = _uniform((n, 1, 1), 0.0, math.pi, g, device)
        dy, dx = wy - cy, wx - cx
        u = (dy * torch.cos(theta) + dx * torch.sin(theta)) / (r * aspect)
        v = (-dy * torch.sin(theta) + dx * torch.cos(theta)) * aspect / r
        wobble = 0.3 * _smooth_noise((n, 1), 5, size, g, device)[:, 0]
        inside = (u * u + v * v < (1.0 + wobble).clamp(min=0.0) ** 2) & active
        void = torch.rand(n, 1, 1, generator=g, device=device) < void_prob
        labels = torch.where(inside, torch.where(void, torch.zeros_like(labels), max_stuff + 1 + i), labels)

    # 4. per map, as the shards do it: small segments void, the largest S − 1 keep random slots
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=g, device=device)))
    info = [{"id": i} for i in range(1, max_stuff + max_things + 1)]
    out = torch.empty_like(labels)
    for b in range(n):
        counts = torch.bincount(labels[b].flatten(), minlength=len(info) + 1).cpu().numpy()
        lut = clean_remap_labels(counts, info, min_area, num_slots, rng).lut
        out[b] = torch.from_numpy(lut).to(device)[labels[b]]
    return out
