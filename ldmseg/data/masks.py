"""Known-masks for zero-shot mask inpainting (docs/method.md#inpainting).

A known-mask is an (h, w) bool array on the latent grid: True where the panoptic map is given
(the sampler keeps those latent cells at the noised known latent), False where the model fills in.

- ``sparse``: the grid is cut into ``block``×``block`` cells, each known with probability p.
- ``global``: BEiT-style blockwise masking: random rectangles with random aspect ratios are added
  until at least the target fraction of the grid is covered.

All generators are seeded (an int seed or a ``numpy.random.Generator``).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

MaskKind = Literal["sparse", "global"]


def _check(h: int, w: int, fraction: float, name: str) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"mask size must be at least 1×1, got {h}×{w}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {fraction}")


def _as_generator(seed_or_generator: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed_or_generator, np.random.Generator):
        return seed_or_generator
    if isinstance(seed_or_generator, (int, np.integer)) and not isinstance(seed_or_generator, bool):
        return np.random.default_rng(int(seed_or_generator))
    raise TypeError(
        f"expected an int seed or a numpy.random.Generator, got {type(seed_or_generator).__name__}"
    )


def sparse_mask(h: int, w: int, p: float, block: int = 1,
                generator: np.random.Generator | int = 0) -> np.ndarray:
    """(h, w) bool: each ``block``×``block`` block of latent cells is known with probability ``p``.

    Blocks are laid from the top-left corner; partial blocks at the bottom/right edges are cropped.
    ``p = 0`` gives all False and ``p = 1`` all True.
    """
    _check(h, w, p, "p")
    if block < 1:
        raise ValueError(f"block must be >= 1 latent cell, got {block}")
    rng = _as_generator(generator)
    bh, bw = math.ceil(h / block), math.ceil(w / block)
    blocks = rng.random((bh, bw)) < p  # random() is in [0, 1): p = 0 → none, p = 1 → all
    return upsample_mask(blocks, block)[:h, :w]


def global_mask(h: int, w: int, known_fraction: float, generator: np.random.Generator | int = 0,
                min_block_fraction: float = 0.04, aspect_range: tuple[float, float] = (0.3, 1 / 0.3),
                max_attempts: int = 10_000) -> np.ndarray:
    """(h, w) bool: union of random rectangles covering ``ceil(known_fraction · h · w)`` cells.

    Each rectangle draws an area uniformly between ``min_block_fraction · h · w`` cells and the
    cells still missing, and an aspect ratio (height / width) log-uniformly in ``aspect_range``;
    it is placed uniformly at random and accepted if it adds no more cells than are missing, so
    the covered fraction is the target rounded up to whole cells. Should rectangles keep failing
    (``max_attempts``), the remaining cells are drawn one by one at random.
    """
    _check(h, w, known_fraction, "known_fraction")
    rng = _as_generator(generator)
    total = h * w
    target = min(total, math.ceil(known_fraction * total - 1e-9))
    mask = np.zeros((h, w), dtype=bool)
    if target == total:
        mask[:] = True
        return mask
    min_cells = max(1, round(min_block_fraction * total))
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    covered, attempts = 0, 0
    while covered < target and attempts < max_attempts:
        attempts += 1
        missing = target - covered
        area = rng.uniform(min(min_cells, missing), missing)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        rh = min(h, max(1, round(math.sqrt(area * aspect))))
        rw = min(w, max(1, round(math.sqrt(area / aspect))))
        top = int(rng.integers(0, h - rh + 1))
        left = int(rng.integers(0, w - rw + 1))
        window = mask[top:top + rh, left:left + rw]
        new = window.size - int(window.sum())
        if 0 < new <= missing:
            window[:] = True
            covered += new
    if covered < target:  # rare: fill the last cells one at a time
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=target - covered, replace=False)] = True
    return mask


def make_known_mask(kind: MaskKind, h: int, w: int, fraction: float,
                    seed_or_generator: int | np.random.Generator = 0, block: int = 1) -> np.ndarray:
    """(h, w) bool known-mask of ``kind`` with (expected, for ``sparse``) known ``fraction``.

    ``block`` is the block size of ``sparse`` masks (ignored by ``global``).
    """
    rng = _as_generator(seed_or_generator)
    if kind == "sparse":
        return sparse_mask(h, w, fraction, block=block, generator=rng)
    if kind == "global":
        return global_mask(h, w, fraction, generator=rng)
    raise ValueError(f"mask kind must be 'sparse' or 'global', got {kind!r}")


def upsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """(..., h, w) → (..., h·factor, w·factor) by nearest (each cell becomes a factor×factor block)."""
    mask = np.asarray(mask)
    if mask.ndim < 2:
        raise ValueError(f"mask must have at least 2 dimensions (h, w), got shape {mask.shape}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    return np.repeat(np.repeat(mask, factor, axis=-2), factor, axis=-1)
