"""Test oracles for the shard format: one row decoded by hand, samples built from arrays.

:func:`decode_row` is the plain per-row reading of a shard row the training readers
(:mod:`ldmseg.data.parquet_dataset`) must reproduce exactly, random slots included.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ldmseg.data.coco import DenseSample
from ldmseg.data.shards import decode_image, decode_slot_map
from ldmseg.data.slots import compact_ids, repermute_slots


def decode_row(row: dict[str, Any], num_slots: int, generator: np.random.Generator | None = None
               ) -> dict[str, np.ndarray]:
    """One shard row → ``image`` (3, R, R) float32 in [-1, 1], ``slot_map`` (R, R) int64 in [0, S),
    ``valid`` (R, R) bool. With ``generator`` the slots are re-permuted (one draw per row)."""
    res = int(row["resolution"])
    image = decode_image(row["image"], row["image_format"], res)
    slot_map = decode_slot_map(row["slot_map"], res)
    valid = np.zeros((res, res), dtype=bool)
    valid[: int(row["scaled_height"]), : int(row["scaled_width"])] = True
    if generator is not None:
        slot_map = repermute_slots(slot_map, num_slots, generator)
    image_f = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return {"image": image_f.numpy(), "slot_map": slot_map.astype(np.int64), "valid": valid}


def dense_sample(image: np.ndarray, id_map: np.ndarray, segments_info: list[dict],
                 source_sha256: str = "") -> DenseSample:
    """A :class:`DenseSample` of in-memory arrays (what ``coco.read_dense_sample`` gives for files)."""
    labels, ids = compact_ids(id_map)
    return DenseSample(image, np.asarray(id_map, dtype=np.int64), segments_info, source_sha256, labels=labels,
                       segment_ids=ids, counts=np.bincount(labels.ravel(), minlength=len(ids)))
