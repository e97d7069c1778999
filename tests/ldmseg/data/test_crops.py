"""Random crops of slot maps for the mask AE (ldmseg.data.crops): windows of the input, aligned offsets."""

from __future__ import annotations

import pytest
import torch

from ldmseg.data.crops import random_crops


def maps(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps whose value encodes the pixel position, so a crop's offset can be read off its corner."""
    grid = torch.arange(size * size, dtype=torch.int64).reshape(size, size)
    slot_map = grid.expand(batch, size, size).clone() + 10_000 * torch.arange(batch)[:, None, None]
    return slot_map, slot_map % 3 > 0


def test_crops_are_aligned_windows_of_each_map():
    slot_map, valid = maps(64, 32)
    crops, crop_valid = random_crops(slot_map, valid, 16, multiple=4, generator=torch.Generator().manual_seed(0))
    assert crops.shape == crop_valid.shape == (64, 16, 16)
    offsets = set()
    for i in range(64):
        corner = int(crops[i, 0, 0]) - 10_000 * i  # the map's own values: no mixing across the batch
        row, col = divmod(corner, 32)
        assert row % 4 == 0 and col % 4 == 0 and row <= 16 and col <= 16
        assert torch.equal(crops[i], slot_map[i, row:row + 16, col:col + 16])
        assert torch.equal(crop_valid[i], valid[i, row:row + 16, col:col + 16])
        offsets.add((row, col))
    assert len(offsets) > 10  # offsets drawn per map, over the 5 × 5 aligned positions
    again, _ = random_crops(slot_map, valid, 16, multiple=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)


def test_whole_size_crop_is_a_copy_and_bad_sizes_say_what_to_do():
    slot_map, valid = maps(2, 16)
    crops, _ = random_crops(slot_map, valid, 16)
    assert torch.equal(crops, slot_map)
    crops[0, 0, 0] = -1
    assert int(slot_map[0, 0, 0]) == 0  # a copy: the caller's batch is untouched
    with pytest.raises(ValueError, match="must not exceed data.resolution"):
        random_crops(slot_map, valid, 32)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        random_crops(slot_map[0], valid[0], 8)
