"""The segments_info builder and the COCO panoptic writer (whole folder, or parts merged)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ldmseg.data.coco import load_coco_panoptic, read_sample
from ldmseg.data.coco_writer import CocoPanopticWriter, merge_parts
from ldmseg.data.segments import segments_info

CATEGORIES = [{"id": 1, "name": "object", "isthing": 1}]


def test_segments_info_measures_area_and_bbox():
    ids = np.zeros((5, 6), np.int64)
    ids[1:3, 2:5] = 70000  # 2 rows x 3 columns at x=2, y=1
    ids[4, 0] = 7
    ids[0, 5] = 7  # one segment in two corners: its box spans both
    assert segments_info(ids) == [
        {"id": 7, "category_id": 1, "iscrowd": 0, "area": 2, "bbox": [0, 0, 6, 5]},
        {"id": 70000, "category_id": 1, "iscrowd": 0, "area": 6, "bbox": [2, 1, 3, 2]},
    ]
    # listed order kept, absent ids and void left out, per-segment categories and flags
    assert segments_info(ids, [70000, 3, 0, 7], category_id={70000: 5, 7: 9}, iscrowd={70000: 1, 7: 0},
                         bbox=False) == [{"id": 70000, "category_id": 5, "iscrowd": 1, "area": 6},
                                         {"id": 7, "category_id": 9, "iscrowd": 0, "area": 2}]
    assert segments_info(np.zeros((3, 3), np.int64)) == []
    with pytest.raises(ValueError, match="integer"):
        segments_info(np.zeros((3, 3), np.float32))


def _maps(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 4, (6 + k, 8)) * (1000 + k) for k in range(n)]


def test_writer_folder_reads_back(tmp_path):
    maps = _maps(3)
    with CocoPanopticWriter(tmp_path / "ds", CATEGORIES, images=True) as w:
        for k, ids in enumerate(maps):
            image = np.full((*ids.shape, 3), 40 * k, np.uint8)
            w.add_image(k + 1, f"{k + 1}.png", *ids.shape, image=image)
            w.add_annotation(k + 1, f"{k + 1}.png", ids, segments_info(ids))
    data = load_coco_panoptic(str(tmp_path / "ds"))
    assert not data.problems and [r.image_id for r in data.records] == [1, 2, 3]
    for rec, ids in zip(data.records, maps):
        sample = read_sample(rec)
        assert np.array_equal(sample.id_map, ids) and sample.segments_info == segments_info(ids)


def test_parts_merge_into_one_json(tmp_path):
    maps = _maps(4)
    for part in ("b", "a"):  # parts merge in name order, whatever order they were written in
        w = CocoPanopticWriter(tmp_path / "ds", part=part)
        for k in ((0, 1) if part == "a" else (2, 3)):
            w.add_image(k + 1, f"{k + 1}.jpg", *maps[k].shape)
            w.add_annotation(k + 1, f"{k + 1}.png", maps[k], segments_info(maps[k]))
        w.close()
    assert not (tmp_path / "ds" / "panoptic.json").exists()
    merge_parts(tmp_path / "ds", CATEGORIES, info={"description": "test"})
    doc = json.loads((tmp_path / "ds" / "panoptic.json").read_text())
    assert [a["image_id"] for a in doc["annotations"]] == [1, 2, 3, 4]
    assert list(doc) == ["info", "licenses", "images", "annotations", "categories"]
    assert not (tmp_path / "ds" / "panoptic.parts").exists()
    with pytest.raises(FileNotFoundError, match="part=NAME"):
        merge_parts(tmp_path / "ds", CATEGORIES)
