"""Synthetic scenes: exact COCO panoptic folders, deterministic, with the structure they promise."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from ldmseg.data.coco import load_coco_panoptic, read_sample, validate_record
from ldmseg.data.ids import decode_panoptic_png
from ldmseg.data.synthetic import STUFF_CATEGORIES, make_config, render_scene, write_scenes


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    start = time.perf_counter()
    summary = write_scenes(root, 64, size=64, seed=0)
    return root, summary, time.perf_counter() - start


def test_same_seed_gives_byte_identical_files(tmp_path, synth64):
    root, _, _ = synth64
    write_scenes(tmp_path / "again", 64, size=64, seed=0)
    first, second = _files(root), _files(tmp_path / "again")
    assert len(first) == 64 * 2 + 1
    assert first == second
    write_scenes(tmp_path / "seed1", 64, size=64, seed=1)
    other = _files(tmp_path / "seed1")
    assert sum(other[k] == first[k] for k in first if k.startswith("panoptic/")) == 0


def test_growing_num_images_keeps_earlier_images(tmp_path, synth64):
    root, _, _ = synth64
    write_scenes(tmp_path / "small", 5, size=64, seed=0)
    small, big = _files(tmp_path / "small"), _files(root)
    for name, data in small.items():
        if name != "panoptic.json":
            assert big[name] == data, name
    small_json = json.loads(small["panoptic.json"])
    big_json = json.loads(big["panoptic.json"])
    assert small_json["annotations"] == big_json["annotations"][:5]
    assert small_json["images"] == big_json["images"][:5]


def test_output_validates_and_is_fast(synth64):
    root, summary, seconds = synth64
    assert seconds < 10, f"64 images of 64x64 took {seconds:.1f} s"
    coco = load_coco_panoptic(root)
    assert coco.problems == [] and len(coco.records) == 64
    assert [r.image_id for r in coco.records] == list(range(1, 65))
    for record in coco.records:
        assert validate_record(record, categories=coco.categories) == []
    assert summary.num_images == 64 and summary.num_segments == sum(len(r.segments_info) for r in coco.records)
    assert 0.01 < summary.void_fraction < 0.1


def test_area_and_bbox_match_pycocotools(synth64):
    root, _, _ = synth64
    coco = load_coco_panoptic(root)
    checked = 0
    for record in coco.records[:16]:
        id_map = decode_panoptic_png((root / "panoptic" / record.segments_file).read_bytes())
        for seg in record.segments_info:
            rle = mask_utils.encode(np.asfortranarray((id_map == seg["id"]).astype(np.uint8)))
            assert seg["area"] == int(mask_utils.area(rle))
            assert seg["bbox"] == mask_utils.toBbox(rle).astype(int).tolist()
            checked += 1
    assert checked > 50


def test_scene_structure(synth64):
    root, _, _ = synth64
    coco = load_coco_panoptic(root)
    stuff_ids = {c["id"] for c in STUFF_CATEGORIES}
    assert {c["id"] for c in coco.categories.values() if c["isthing"] == 0} == stuff_ids
    assert {c["name"] for c in coco.categories.values() if c["isthing"] == 1} == {
        "circle", "rectangle", "triangle", "ellipse"}
    all_ids = []
    for record in coco.records:
        info = record.segments_info
        stuff = [s["category_id"] for s in info if s["category_id"] in stuff_ids]
        things = [s for s in info if s["category_id"] not in stuff_ids]
        assert 1 <= len(stuff) <= 3 and len(set(stuff)) == len(stuff)  # one segment per stuff category
        assert len(things) <= 6 + 1  # max_things plus at most one crowd segment
        assert all(s["iscrowd"] == 0 for s in info if s["category_id"] in stuff_ids)
        ids = [s["id"] for s in info]
        assert len(set(ids)) == len(ids) and all(1 <= i < 2**24 for i in ids)
        all_ids += ids
    assert max(all_ids) > 2**16  # ids use the blue channel too, like COCO's
    things_per_image = [sum(s["category_id"] not in stuff_ids for s in r.segments_info) for r in coco.records]
    assert max(things_per_image) >= 5 and min(things_per_image) <= 3


def test_void_and_crowd_knobs():
    no_void = make_config(8, 48, 3, void_fraction=0.0, crowd_prob=1.0)
    for i in range(8):
        scene = render_scene(no_void, i)
        assert (scene.id_map == 0).sum() == 0
        assert sum(s["iscrowd"] for s in scene.segments_info) == 1
    heavy = make_config(8, 48, 3, void_fraction=0.1, crowd_prob=0.0, min_things=4)
    fractions = []
    for i in range(8):
        scene = render_scene(heavy, i)
        assert sum(s["iscrowd"] for s in scene.segments_info) == 0
        fractions.append((scene.id_map == 0).mean())
    assert 0.05 < np.mean(fractions) < 0.2


def test_some_things_share_a_colour():
    def images_with_same_coloured_things(prob: float) -> int:
        cfg = make_config(30, 64, 0, shared_colour_prob=prob, crowd_prob=0.0)
        count = 0
        for i in range(30):
            scene = render_scene(cfg, i)
            medians = [np.median(scene.image[scene.id_map == s["id"]].astype(float), axis=0)
                       for s in scene.segments_info if s["category_id"] < 100 and s["area"] >= 20]
            count += any(np.abs(a - b).max() < 12 for k, a in enumerate(medians) for b in medians[:k])
        return count

    assert images_with_same_coloured_things(0.0) <= 2
    assert images_with_same_coloured_things(1.0) >= 25


def test_non_square_large_scene_with_many_segments(tmp_path):
    summary = write_scenes(tmp_path / "big", 2, size=640, height=480, seed=0, min_things=18, max_things=22)
    coco = load_coco_panoptic(tmp_path / "big")
    record = coco.records[0]
    assert (record.width, record.height) == (640, 480)
    sample = read_sample(record)
    assert sample.image.shape == (480, 640, 3) and sample.id_map.shape == (480, 640)
    assert 15 <= len(record.segments_info) <= 26
    assert summary.width == 640 and summary.height == 480


def test_writes_to_fsspec_urls():
    write_scenes("memory://ldmseg-test-synth", 3, size=32, seed=2)
    coco = load_coco_panoptic("memory://ldmseg-test-synth")
    assert coco.records[2].image_path == "memory://ldmseg-test-synth/images/000000000003.jpg"
    assert [validate_record(r) for r in coco.records] == [[], [], []]


def test_bad_knobs_raise():
    with pytest.raises(TypeError, match="unknown synthetic-scene knob 'things'"):
        write_scenes("unused", 1, things=3)
    with pytest.raises(ValueError, match="min_things <= max_things"):
        make_config(1, min_things=5, max_things=2)
    with pytest.raises(ValueError, match=r"max_stuff must lie in \[1, 5\]"):
        make_config(1, max_stuff=9)
