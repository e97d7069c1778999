"""COCO panoptic folders: reading a valid folder, serialising records, dataset-level problems and fatal
errors, COCO's own layout, the real COCO samples, fsspec URLs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers_coco import (
    DEFAULT_CATEGORIES,
    band_id_map,
    entry,
    image_bytes,
    image_for,
    write_coco_folder,
)

from ldmseg.data.coco import (
    DataError,
    PanopticRecord,
    Problem,
    load_coco_panoptic,
    read_sample,
    validate_record,
)


# --------------------------------------------------------------------------------------------
# A valid folder
# --------------------------------------------------------------------------------------------


def test_valid_folder_reads_exact_pixels_and_ids(tmp_path):
    ids = band_id_map(12, 16, [0, 5, 70000, 16777215])
    image = image_for(ids)
    paths = write_coco_folder(tmp_path / "ds", [entry(3, ids=[0, 5, 70000, 16777215], image_data=image_bytes(image, "PNG"))])
    coco = load_coco_panoptic(paths.root)
    (record,) = coco.records
    assert (record.image_id, record.height, record.width) == (3, 12, 16)
    assert record.file_name == "000000000003.jpg" and record.segments_file == "000000000003.png"
    assert record.image_path.endswith("images/000000000003.jpg")
    assert coco.categories[300]["isthing"] == 0 and coco.categories[7]["isthing"] == 1
    sample = read_sample(record)
    assert sample.image.dtype == np.uint8 and sample.image.shape == (12, 16, 3)
    np.testing.assert_array_equal(sample.image, image)  # PNG-coded photo: lossless
    assert sample.id_map.dtype == np.int64
    np.testing.assert_array_equal(sample.id_map, ids)
    assert [s["id"] for s in sample.segments_info] == [5, 70000, 16777215]
    assert validate_record(record) == []


def test_records_and_problems_serialise_to_plain_dicts(tmp_path):
    paths = write_coco_folder(tmp_path / "ds", [entry(1), entry(2, in_annotations=False)])
    coco = load_coco_panoptic(paths.root)
    row = coco.records[0].to_dict()
    assert json.loads(json.dumps(row)) == row
    # Rows that went through Arrow come back with numpy values.
    arrow_like = {**row, "image_id": np.int64(1), "segments_info": [
        {**s, "id": np.int64(s["id"]), "bbox": np.asarray(s["bbox"])} for s in row["segments_info"]]}
    back = PanopticRecord.from_dict(arrow_like)
    assert back == coco.records[0]
    assert type(back.segments_info[0]["bbox"]) is list and type(back.image_id) is int
    (problem,) = coco.problems
    assert problem.to_dict() == {"kind": "image_without_annotation", "image_id": 2,
                                 "file_name": "000000000002.jpg", "reason": problem.reason}
    assert isinstance(problem, Problem)


# --------------------------------------------------------------------------------------------
# Dataset-level problems and fatal errors
# --------------------------------------------------------------------------------------------


def test_dataset_level_problems(tmp_path):
    entries = [
        entry(1),
        entry(2, file_name="a.jpg", segments_file="a.png"),
        entry(2, file_name="b.jpg", segments_file="b.png", in_annotations=False),  # duplicate id
        entry(3, in_images=False),  # annotation without an image
        entry(4, in_annotations=False),  # image without annotation
        entry(5),
        entry(5, file_name="other.jpg", in_images=False),  # second annotation for image 5
    ]
    paths = write_coco_folder(tmp_path / "ds", entries, categories=[*DEFAULT_CATEGORIES, DEFAULT_CATEGORIES[1]])
    doc = json.loads(paths.json_path.read_text())
    doc["images"].append({"file_name": "no-id.jpg"})
    paths.json_path.write_text(json.dumps(doc))

    coco = load_coco_panoptic(paths.root)
    assert [r.image_id for r in coco.records] == [1]
    kinds = {(p.kind, p.image_id): p for p in coco.problems}
    assert sorted(kinds, key=str) == [("annotation_without_image", 3), ("duplicate_annotation", 5),
                                      ("duplicate_category_id", None), ("duplicate_image_id", 2),
                                      ("image_without_annotation", 4), ("malformed_entry", None)]
    assert kinds[("duplicate_category_id", None)].reason == "category id 7 is listed more than once"
    assert len(coco.categories) == 3
    assert kinds[("duplicate_image_id", 2)].reason == (
        "image id 2 is listed 2 times in 'images' (a.jpg, b.jpg); all its entries are skipped")
    assert kinds[("annotation_without_image", 3)].reason == (
        "annotation 000000000003.png refers to image id 3, which is not in 'images'")
    assert kinds[("annotation_without_image", 3)].file_name == "000000000003.png"
    assert kinds[("image_without_annotation", 4)].reason == "image 000000000004.jpg (id 4) has no annotation"
    assert "no-id.jpg" in kinds[("malformed_entry", None)].reason


def test_missing_folder_json_and_invalid_json_raise(tmp_path):
    with pytest.raises(DataError, match="dataset folder .*nowhere does not exist"):
        load_coco_panoptic(tmp_path / "nowhere")
    paths = write_coco_folder(tmp_path / "ds", [entry(1)])
    paths.json_path.unlink()
    with pytest.raises(DataError, match=r"annotation file .*panoptic.json does not exist"):
        load_coco_panoptic(paths.root)
    paths.json_path.write_text('{"images": [')
    with pytest.raises(DataError, match=r"annotation file .*panoptic.json is not valid JSON"):
        load_coco_panoptic(paths.root)
    paths.json_path.write_text('{"images": [], "categories": []}')
    with pytest.raises(DataError, match=r"panoptic.json has no 'annotations' list"):
        load_coco_panoptic(paths.root)
    paths.json_path.write_text('{"images": [], "annotations": [], "categories": []}')
    (paths.root / "images").rename(paths.root / "photos")
    with pytest.raises(DataError, match=r"images folder .*ds/images does not exist"):
        load_coco_panoptic(paths.root)
    with pytest.raises(DataError, match="no dataset folder given and no masks, json_path"):
        load_coco_panoptic(images=paths.root / "photos")


# --------------------------------------------------------------------------------------------
# Layouts and the real COCO samples
# --------------------------------------------------------------------------------------------


def test_coco_own_layout_with_explicit_paths(tmp_path):
    paths = write_coco_folder(tmp_path / "coco", [entry(1), entry(2)], layout="coco")
    assert paths.json_path.name == "panoptic_val2017.json" and paths.images.name == "val2017"
    coco = load_coco_panoptic(**paths.kwargs())
    assert [r.image_id for r in coco.records] == [1, 2] and coco.problems == []
    assert coco.records[1].panoptic_path == str(tmp_path / "coco/annotations/panoptic_val2017/000000000002.png")
    assert read_sample(coco.records[1]).id_map.shape == (12, 16)
    # A root plus one override: the other two parts keep the folder's names.
    paths2 = write_coco_folder(tmp_path / "ds", [entry(1)])
    (paths2.root / "panoptic.json").rename(tmp_path / "elsewhere.json")
    coco2 = load_coco_panoptic(paths2.root, json_path=tmp_path / "elsewhere.json")
    assert validate_record(coco2.records[0]) == []


def test_real_coco_panoptic_sample_validates_clean(coco_sample):
    coco = load_coco_panoptic(coco_sample)
    assert coco.problems == []
    assert len(coco.categories) == 133
    assert sum(c["isthing"] for c in coco.categories.values()) == 80
    by_id = {r.image_id: r for r in coco.records}
    assert sorted(by_id) == [142238, 439180]
    for record in coco.records:
        assert validate_record(record, categories=coco.categories) == []
    s1, s2 = read_sample(by_id[142238]), read_sample(by_id[439180])
    assert s1.image.shape == (427, 640, 3) and s1.id_map.shape == (427, 640)
    assert s2.image.shape == (360, 640, 3)
    assert len(np.unique(s1.id_map[s1.id_map > 0])) == 18 and len(np.unique(s2.id_map[s2.id_map > 0])) == 32
    crowd = sum(s["iscrowd"] for r in coco.records for s in r.segments_info)
    assert crowd == 3


def test_real_coco_val_examples_validate_clean(coco_val_examples):
    coco = load_coco_panoptic(coco_val_examples)
    assert coco.problems == [] and len(coco.records) == 12
    assert [c["name"] for c in coco.categories.values()] == ["object"]
    for record in coco.records:
        assert validate_record(record, categories=coco.categories) == [], record.file_name
        sample = read_sample(record)
        assert min(sample.image.shape[:2]) >= 227 and max(sample.image.shape[:2]) <= 640
        assert 3 <= len(sample.segments_info) <= 29


# --------------------------------------------------------------------------------------------
# fsspec URLs (a local S3 stand-in on the loopback interface)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto import server as moto_server  # a dev dependency: missing is an error, not a skip

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_read_from_s3_url(tmp_path, s3_endpoint):
    import fsspec

    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = fsspec.filesystem("s3", **options)
    fs.mkdir("coco-test-bucket")
    paths = write_coco_folder(tmp_path / "ds", [entry(1), entry(2, write_png=False)])
    fs.put(str(paths.root), "coco-test-bucket/ds", recursive=True)

    coco = load_coco_panoptic("s3://coco-test-bucket/ds", storage_options=options)
    assert coco.problems == [] and [r.image_id for r in coco.records] == [1, 2]
    assert coco.records[0].image_path == "s3://coco-test-bucket/ds/images/000000000001.jpg"
    sample = read_sample(coco.records[0], storage_options=options)
    np.testing.assert_array_equal(sample.id_map, band_id_map(12, 16, [0, 5, 70000]))
    assert validate_record(coco.records[1], fs=fs) == [
        "panoptic PNG s3://coco-test-bucket/ds/panoptic/000000000002.png not found"]
    with pytest.raises(DataError, match="annotation file s3://coco-test-bucket/ds/nope.json does not exist"):
        load_coco_panoptic(images="s3://coco-test-bucket/ds/images", masks="s3://coco-test-bucket/ds/panoptic",
                           json_path="s3://coco-test-bucket/ds/nope.json", storage_options=options)
