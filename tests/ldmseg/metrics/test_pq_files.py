"""hotcoco reading the JSON files itself (``FileEvaluation``) only when they hold the checked values."""

from __future__ import annotations

import json

import numpy as np

from helpers_coco import band_id_map, entry, write_coco_folder
from ldmseg.metrics.pq import evaluate_folders
from ldmseg.metrics.pq_hotcoco import FileEvaluation, hotcoco_stat
from ldmseg.metrics.pq_io import load_panoptic_set


def folders(tmp_path, shift: int):
    """GT of 4 band images and a prediction whose bands are shifted by ``shift`` columns."""
    gts = [band_id_map(12, 16, (0, 5, 7, 9)) for _ in range(4)]
    preds = [np.roll(g, shift * (i + 1), axis=1) for i, g in enumerate(gts)]
    gt = write_coco_folder(tmp_path / "gt", [entry(i, id_map=g) for i, g in enumerate(gts)])
    pred = write_coco_folder(tmp_path / f"pred{shift}", [entry(i, id_map=p) for i, p in enumerate(preds)])
    return gt, pred


def counts(stat) -> tuple[int, int, int]:
    return tuple(sum(getattr(c, k) for c in stat.per_category.values()) for k in ("tp", "fp", "fn"))


def test_files_route_is_used_only_for_files_as_written(tmp_path):
    gt, good = folders(tmp_path, 1)
    _, other = folders(tmp_path, 3)  # scores differently: tells which evaluation a result came from
    gt_set = load_panoptic_set(gt.root)
    ids = list(gt_set.annotations)
    own, theirs = (counts(hotcoco_stat(gt_set, load_panoptic_set(p.root), ids, gt_set.categories, False))
                   for p in (good, other))
    assert own != theirs and own[0] > 0

    def routed(pred) -> tuple[int, int, int]:
        files = FileEvaluation(gt.json_path, gt.masks, other.json_path, other.masks)
        return counts(hotcoco_stat(gt_set, load_panoptic_set(pred.root), ids, gt_set.categories, False, files))

    assert routed(good) == theirs  # as written: hotcoco's reading of the files is the result
    doc = json.loads(good.json_path.read_text())
    for ann in doc["annotations"]:
        for seg in ann["segments_info"]:
            seg["iscrowd"] = bool(seg.get("iscrowd", 0))  # legal, checked as 0/1, but not as written
    good.json_path.write_text(json.dumps(doc))
    assert routed(good) == own
    # and through evaluate_folders, both engines agree on the rewritten JSON
    fast, slow = (evaluate_folders(gt.root, good.root, engine=e, workers=1) for e in ("hotcoco", "numpy"))
    assert (fast["All"]["tp"], fast["All"]["fp"], fast["All"]["fn"]) == own
    assert fast["All"]["pq"] == slow["All"]["pq"]
