"""COCO ``segments_info`` lists measured on an id map: the one builder of those entries.

Every writer of COCO panoptic annotations (synthetic scenes, the shards' ground-truth export,
predictions) and every in-memory PQ computation lists its segments through :func:`segments_info`,
so ``area`` and ``bbox`` always mean the same thing: pixels of the id in the map, and the
smallest ``[x, y, width, height]`` box holding them.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np


def segments_info(id_map: np.ndarray, ids: Iterable[int] | None = None, *,
                  category_id: int | Mapping[int, int] = 1, iscrowd: int | Mapping[int, int] = 0,
                  bbox: bool = True) -> list[dict]:
    """The COCO ``segments_info`` entries of the segments of an id map.

    Args:
        id_map: (H, W) integer segment ids, 0 = void.
        ids: the segment ids to list, in this order; ids absent from the map (e.g. fully
            occluded) are left out, and so is 0. Default: every non-void id of the map, ascending.
        category_id: one category for every segment, or a mapping id → category.
        iscrowd: one flag for every segment, or a mapping id → flag (COCO: 0 or 1).
        bbox: also measure ``bbox`` (``False`` when only areas are needed, e.g. for PQ).

    Returns one dict per listed segment: ``{"id", "category_id", "iscrowd", "area"[, "bbox"]}``,
    all Python ints; ``area`` in pixels, ``bbox`` ``[x, y, width, height]`` of its pixels.
    """
    id_map = np.asarray(id_map)
    if id_map.ndim != 2 or not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"id_map must be an (H, W) integer array, got shape {id_map.shape} dtype {id_map.dtype}")
    present, inverse, areas = np.unique(id_map.ravel(), return_inverse=True, return_counts=True)
    index = {int(v): k for k, v in enumerate(present.tolist())}
    wanted = [int(v) for v in (present.tolist() if ids is None else ids)]
    listed = [(sid, index[sid]) for sid in wanted if sid != 0 and sid in index]
    if bbox and listed:
        x0, y0, x1, y1 = _boxes(inverse.reshape(id_map.shape), len(present))
    info = []
    for sid, k in listed:
        entry = {"id": sid,
                 "category_id": int(category_id[sid] if isinstance(category_id, Mapping) else category_id),
                 "iscrowd": int(iscrowd[sid] if isinstance(iscrowd, Mapping) else iscrowd),
                 "area": int(areas[k])}
        if bbox:
            entry["bbox"] = [int(x0[k]), int(y0[k]), int(x1[k] - x0[k] + 1), int(y1[k] - y0[k] + 1)]
        info.append(entry)
    return info


def _boxes(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """First and last column and row of each label 0..n−1 of an (H, W) label map (one pass):
    (n,) int64 arrays x0, y0, x1, y1 (meaningful for the labels present)."""
    h, w = labels.shape
    in_row = np.zeros((n, h), dtype=bool)
    in_row[labels, np.arange(h)[:, None]] = True
    in_col = np.zeros((n, w), dtype=bool)
    in_col[labels, np.arange(w)[None, :]] = True
    y0, x0 = in_row.argmax(axis=1), in_col.argmax(axis=1)
    y1, x1 = h - 1 - in_row[:, ::-1].argmax(axis=1), w - 1 - in_col[:, ::-1].argmax(axis=1)
    return x0, y0, x1, y1
