"""Shared pieces of the PQ evaluator tests: the result check, COCO panoptic folders written from id
maps, and random ground-truth/prediction pairs that exercise every matching rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ldmseg.data.ids import encode_panoptic_png


def check(result: dict, pq: float, sq: float, rq: float, tp: int, fp: int, fn: int) -> None:
    assert (result["tp"], result["fp"], result["fn"]) == (tp, fp, fn)
    assert result["pq"] == pytest.approx(pq, abs=1e-12)
    assert result["sq"] == pytest.approx(sq, abs=1e-12)
    assert result["rq"] == pytest.approx(rq, abs=1e-12)


def write_folder(root: Path, images: list[tuple[int, np.ndarray, list]], categories=None) -> Path:
    """A COCO panoptic folder (panoptic/*.png + panoptic.json) from (image id, id map, segments_info)."""
    (root / "panoptic").mkdir(parents=True)
    anns = []
    for image_id, ids, info in images:
        name = f"{image_id:012d}.png"
        (root / "panoptic" / name).write_bytes(encode_panoptic_png(ids))
        anns.append({"image_id": image_id, "file_name": name, "segments_info": info})
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": m.shape[0], "width": m.shape[1]}
                       for i, m, _ in images], "annotations": anns}
    if categories is not None:
        data["categories"] = categories
    (root / "panoptic.json").write_text(json.dumps(data))
    return root


def random_scene(rng, h=12, w=16):
    ids = np.zeros((h, w), np.int64)
    used = rng.choice(2**24 - 1, 12, replace=False) + 1
    for sid in used:
        y, x = rng.integers(0, h - 1), rng.integers(0, w - 1)
        ids[y:y + rng.integers(2, h), x:x + rng.integers(2, w)] = sid
    if rng.random() < 0.7:  # a void patch
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        ids[y:y + 3, x:x + 4] = 0
    return ids


def random_pair(rng):
    cats = [1, 2, 3, 4, 5]  # 1-3 things, 4-5 stuff
    gt = random_scene(rng)
    gt_segs = [{"id": int(i), "category_id": int(rng.choice(cats)), "iscrowd": int(rng.random() < 0.25),
                "area": int((gt == i).sum())} for i in np.unique(gt) if i]
    pred = gt.copy()
    new = random_scene(rng)
    take = rng.random(gt.shape) < 0.15  # noise
    pred[take] = new[take]
    y, x = rng.integers(0, 8), rng.integers(0, 12)
    pred[y:y + 4, x:x + 5] = new[y:y + 4, x:x + 5]
    if rng.random() < 0.5:
        pred = np.roll(pred, int(rng.integers(-2, 3)), axis=int(rng.integers(0, 2)))
    gt_cat = {s["id"]: s["category_id"] for s in gt_segs}
    if rng.random() < 0.2 and gt_segs:  # an id of the PNG missing from segments_info: neither void nor segment
        gt_segs.pop(int(rng.integers(len(gt_segs))))
    if rng.random() < 0.2:  # a listed segment absent from the PNG: a FN unless crowd
        gt_segs.append({"id": 2**24 - 1, "category_id": 1, "iscrowd": 0, "area": 5})
    pred_segs = [{"id": int(i), "category_id": gt_cat.get(int(i), int(rng.choice(cats))) if rng.random() < 0.8
                  else int(rng.choice(cats))} for i in np.unique(pred) if i]
    return gt, gt_segs, pred, pred_segs
