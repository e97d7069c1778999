"""Procedural COCO-like maps for the mask AE: valid slot maps, deterministic, mixed into AE batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldmseg.data.random_maps import random_slot_maps


def segments(slot_map: torch.Tensor) -> dict[int, int]:
    ids, counts = torch.unique(slot_map, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if i}


def test_maps_are_valid_slot_maps_with_coco_like_variety():
    maps = random_slot_maps(64, 64, 32, min_area=10, generator=torch.Generator().manual_seed(0))
    assert maps.shape == (64, 64, 64) and maps.dtype == torch.int64
    assert int(maps.min()) >= 0 and int(maps.max()) < 32
    per_map = [segments(m) for m in maps]
    assert all(1 <= len(s) <= 31 for s in per_map)
    areas = np.array([a for s in per_map for a in s.values()])
    assert areas.min() >= 10  # small segments became void
    counts = np.array([len(s) for s in per_map])
    # many segments per map, of very different sizes: small things next to large stuff regions
    assert counts.max() >= 15 and counts.min() <= 6
    assert (areas < 40).mean() > 0.1 and (areas > 1000).mean() > 0.05


def test_same_generator_seed_same_maps_and_slot_cap_keeps_the_largest():
    a = random_slot_maps(8, 32, 4, min_area=5, generator=torch.Generator().manual_seed(1))
    b = random_slot_maps(8, 32, 4, min_area=5, generator=torch.Generator().manual_seed(1))
    c = random_slot_maps(8, 32, 4, min_area=5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(len(segments(m)) <= 3 for m in a)  # S − 1 = 3 slots
    wide = random_slot_maps(8, 32, 64, min_area=5, generator=torch.Generator().manual_seed(1))
    for capped, full in zip(a, wide):  # same draws: the capped map keeps the 3 largest segments
        kept = sorted(segments(capped).values(), reverse=True)
        assert kept == sorted(segments(full).values(), reverse=True)[: len(kept)]


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="num_slots"):
        random_slot_maps(2, 32, 1)
    with pytest.raises(ValueError, match="max_stuff"):
        random_slot_maps(2, 32, 8, max_stuff=0)
