"""One COCO panoptic sample: per-image defects are found with clear reasons, legal but unusual data passes,
image modes and the dense preprocessing reader."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers_coco import (
    DEFAULT_CATEGORIES,
    band_id_map,
    entry,
    image_bytes,
    image_for,
    segments_info_from,
    truncated,
    write_coco_folder,
)
from PIL import Image

from ldmseg.data.coco import (
    DataError,
    load_coco_panoptic,
    read_dense_sample,
    read_sample,
    validate_record,
)
from ldmseg.data.ids import encode_panoptic_png


def _only_record(tmp_path, e, **kwargs):
    paths = write_coco_folder(tmp_path / "ds", [e], **kwargs)
    coco = load_coco_panoptic(paths.root)
    assert coco.problems == []
    assert len(coco.records) == 1
    return coco, coco.records[0]


def _problems_of(tmp_path, e, **kwargs) -> list[str]:
    coco, record = _only_record(tmp_path, e, **kwargs)
    problems = validate_record(record, categories=coco.categories)
    with pytest.raises(DataError) as info:
        read_sample(record, categories=coco.categories)
    # read_sample's reason carries every problem validate_record lists.
    assert all(p in info.value.reason for p in problems)
    assert isinstance(info.value, ValueError)
    # the preprocessing reader (ids checked through a label table) gives the same reason
    with pytest.raises(DataError) as dense:
        read_dense_sample(record, categories=coco.categories)
    assert dense.value.reason == info.value.reason
    return problems


# --------------------------------------------------------------------------------------------
# Per-image defects
# --------------------------------------------------------------------------------------------


def test_missing_image_and_png(tmp_path):
    problems = _problems_of(tmp_path, entry(1, write_image=False, write_png=False))
    assert len(problems) == 2
    assert "image file" in problems[0] and "000000000001.jpg not found" in problems[0]
    assert "panoptic PNG" in problems[1] and "000000000001.png not found" in problems[1]


def test_zero_byte_files(tmp_path):
    problems = _problems_of(tmp_path, entry(1, image_data=b"", png_data=b""))
    assert [p.endswith("is empty (0 bytes)") for p in problems] == [True, True]
    assert "000000000001.jpg" in problems[0] and "000000000001.png" in problems[1]


@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_jpeg_is_caught_by_a_full_decode(tmp_path, keep):
    ids = band_id_map(48, 64, [1, 2, 3])
    noisy = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = truncated(image_bytes(noisy), keep)
    (problem,) = _problems_of(tmp_path, entry(1, height=48, width=64, ids=[1, 2, 3], image_data=data))
    assert "000000000001.jpg cannot be decoded" in problem and "truncated" in problem
    assert ids.shape == (48, 64)


def test_truncated_png(tmp_path):
    ids = np.arange(48 * 64, dtype=np.int64).reshape(48, 64) * 977 + 1
    (problem,) = _problems_of(tmp_path, entry(1, height=48, width=64, ids=[1],
                                              png_data=truncated(encode_panoptic_png(ids), 0.5)))
    assert "panoptic PNG" in problem and "000000000001.png cannot be decoded" in problem and "truncated" in problem


def test_files_that_are_not_images(tmp_path):
    problems = _problems_of(tmp_path, entry(1, image_data=b"hello, not a jpeg", png_data=b"<html>404</html>"))
    assert problems == [
        f"image file {tmp_path / 'ds/images/000000000001.jpg'} is not an image PIL can read",
        f"panoptic PNG {tmp_path / 'ds/panoptic/000000000001.png'} is not an image PIL can read",
    ]


def test_image_and_png_size_mismatch(tmp_path):
    wide = np.zeros((12, 20, 3), dtype=np.uint8)
    problems = _problems_of(tmp_path, entry(1, height=12, width=16, image=wide))
    assert problems == [
        "image is 20x12 but the JSON says 16x12 (width x height)",
        "image is 20x12 but its panoptic PNG is 16x12 (width x height)",
    ]


def test_json_size_disagrees_with_both_files(tmp_path):
    problems = _problems_of(tmp_path, entry(1, height=12, width=16, image_json={"height": 13}))
    assert problems == [
        "image is 16x12 but the JSON says 16x13 (width x height)",
        "panoptic PNG is 16x12 but the JSON says 16x13 (width x height)",
    ]


def test_png_ids_missing_from_segments_info(tmp_path):
    ids = band_id_map(12, 16, [0, 5, 70000, 123456])
    info = [s for s in segments_info_from(ids) if s["id"] == 5]
    (problem,) = _problems_of(tmp_path, entry(1, ids=[0, 5, 70000, 123456], segments_info=info))
    assert problem == "panoptic PNG has ids not in segments_info: 70000, 123456"


def test_segments_info_ids_missing_from_png(tmp_path):
    info = segments_info_from(band_id_map(12, 16, [0, 5, 70000]))
    info.append({"id": 999, "category_id": 1, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2]})
    (problem,) = _problems_of(tmp_path, entry(1, segments_info=info))
    assert problem == "segments_info ids absent from the panoptic PNG: 999"


def test_bad_segments_info_entries(tmp_path):
    info = segments_info_from(band_id_map(12, 16, [0, 5, 70000]))
    info += [dict(info[0]), {"category_id": 1}, {"id": 2**24, "category_id": 1}]
    info[1]["category_id"] = 42
    problems = _problems_of(tmp_path, entry(1, segments_info=info))
    assert problems == [
        "segment 70000 has category_id 42, not in 'categories'",
        "segments_info entry without an integer 'id': {'category_id': 1}",
        "segments_info id 16777216 is outside [1, 16777215] (0 is void)",
        "segments_info lists ids more than once: 5",
    ]


def test_many_problems_are_listed_briefly(tmp_path):
    ids = np.arange(1, 12 * 16 + 1, dtype=np.int64)
    (problem,) = _problems_of(tmp_path, entry(1, id_map=ids.reshape(12, 16), segments_info=[]))
    assert problem == "panoptic PNG has ids not in segments_info: 1, 2, 3, 4, 5, 6, 7, 8 and 184 more"


# --------------------------------------------------------------------------------------------
# Legal but unusual data
# --------------------------------------------------------------------------------------------


def test_legal_unusual_data_passes(tmp_path):
    huge_ids = [16777215, 1, 65536, 256]
    many = (np.arange(10 * 20, dtype=np.int64).reshape(10, 20) * 83_000 + 7) % 16777215 + 1  # 200 segments
    one_pixel = np.zeros((9, 9), dtype=np.int64)
    one_pixel[4, 4], one_pixel[0, 8] = 11, 12
    categories = [*DEFAULT_CATEGORIES, {"id": 70000, "name": "odd", "isthing": 0, "note": "extra key"}]
    entries = [
        entry(2**33 + 5, ids=huge_ids),  # image id above 2**31, segment id 2**24 - 1
        entry(7, ids=[0], segments_info=[]),  # no segment at all
        entry(8, id_map=many),
        entry(9, id_map=one_pixel),
        entry(10, file_name="holiday photo.jpeg", segments_file="masks/xyz-10.png",
              image_json={"flickr_url": "http://example.invalid/x", "date_captured": "2013"},
              annotation_json={"extra": [1, 2]}),
        entry(11, segments_info=[{**s, "category_id": 70000, "unknown_key": True}
                                 for s in segments_info_from(band_id_map(12, 16, [0, 5, 70000]))]),
    ]
    paths = write_coco_folder(tmp_path / "ds", entries, categories=categories,
                              json_extra={"info": {"year": 2017}, "licenses": [], "something_else": 1})
    coco = load_coco_panoptic(paths.root)
    assert coco.problems == []
    assert [r.image_id for r in coco.records] == [2**33 + 5, 7, 8, 9, 10, 11]
    for record in coco.records:
        assert validate_record(record, categories=coco.categories) == [], record.image_id
    samples = {r.image_id: read_sample(r) for r in coco.records}
    assert samples[2**33 + 5].id_map.max() == 16777215
    assert samples[7].id_map.max() == 0 and samples[7].segments_info == []
    assert len(np.unique(samples[8].id_map)) == 200
    assert int((samples[9].id_map == 11).sum()) == 1
    assert samples[10].image.shape == (12, 16, 3)


def _assert_dense_matches(record) -> None:
    from ldmseg.data.slots import compact_ids

    sample, dense = read_sample(record), read_dense_sample(record)
    np.testing.assert_array_equal(dense.image, sample.image)
    assert dense.id_map.dtype == np.int64
    np.testing.assert_array_equal(dense.id_map, sample.id_map)
    labels, ids = compact_ids(sample.id_map)
    np.testing.assert_array_equal(dense.labels, labels)
    np.testing.assert_array_equal(dense.segment_ids, ids)
    np.testing.assert_array_equal(dense.counts, np.bincount(labels.ravel(), minlength=len(ids)))
    assert dense.segments_info == sample.segments_info
    np.testing.assert_array_equal(np.asarray(dense.pil_image), sample.image)


def test_dense_sample_equals_read_sample(tmp_path, coco_val_examples):
    many = (np.arange(10 * 30, dtype=np.int64).reshape(10, 30) * 83_000 + 7) % 16777215 + 1  # 300 segments
    one_pixel = np.zeros((9, 9), dtype=np.int64)
    one_pixel[4, 4], one_pixel[0, 8] = 11, 12
    entries = [entry(1, ids=[16777215, 1, 65536, 256]), entry(2, ids=[0], segments_info=[]),
               entry(3, id_map=many), entry(4, id_map=one_pixel),
               entry(5, ids=[0, 5, 9], image_data=image_bytes(image_for(band_id_map(12, 16, [0, 5, 9])), "PNG",
                                                                mode="RGBA"))]
    from ldmseg.data.ids import id_to_rgb

    bands = band_id_map(12, 16, [0, 5, 70000])
    rgba = np.concatenate([id_to_rgb(bands), np.full((12, 16, 1), 200, np.uint8)], axis=-1)
    palette = Image.fromarray((bands != 0).astype(np.uint8) + (bands == 70000), "L").convert("P")
    palette.putpalette([*id_to_rgb(np.array([[0, 5, 70000]]))[0].ravel().tolist()])
    for image_id, png in ((6, Image.fromarray(rgba, "RGBA")), (7, palette)):
        buf = io.BytesIO()
        png.save(buf, format="PNG")
        entries.append(entry(image_id, ids=[0, 5, 70000], png_data=buf.getvalue()))
    coco = load_coco_panoptic(write_coco_folder(tmp_path / "ds", entries).root)
    assert len(coco.records) == 7
    for record in coco.records + load_coco_panoptic(coco_val_examples).records:
        _assert_dense_matches(record)
    # the label table is reset after each image: a later image does not see earlier ids
    again = read_dense_sample(coco.records[3])
    assert again.segment_ids.tolist() == [0, 11, 12] and again.counts.tolist() == [79, 1, 1]


def test_image_modes_become_rgb(tmp_path):
    ids = [1, 2, 3, 4]
    rgb = image_for(band_id_map(16, 16, ids))
    entries = [
        entry(1, height=16, width=16, ids=ids, image_data=image_bytes(rgb, mode="L")),
        entry(2, height=16, width=16, ids=ids, image_data=image_bytes(rgb, mode="CMYK")),
        entry(3, height=16, width=16, ids=ids, file_name="p.png", image_data=image_bytes(rgb, "PNG", mode="P")),
        entry(4, height=16, width=16, ids=ids, file_name="a.png", image_data=image_bytes(rgb, "PNG", mode="RGBA")),
    ]
    coco = load_coco_panoptic(write_coco_folder(tmp_path / "ds", entries).root)
    gray, cmyk, palette, rgba = (read_sample(r).image for r in coco.records)
    for image in (gray, cmyk, palette, rgba):
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert np.abs(cmyk.astype(int) - rgb).mean() < 12  # JPEG-lossy but the same colours
    np.testing.assert_array_equal(palette, rgb)  # 4 colours fit a 16-colour palette exactly
    np.testing.assert_array_equal(rgba, rgb)


def test_exif_orientation_is_not_applied(tmp_path):
    ids = [1, 2]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    data = image_bytes(image_for(band_id_map(12, 16, ids)), exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    coco = load_coco_panoptic(write_coco_folder(tmp_path / "ds", [entry(1, ids=ids, image_data=data)]).root)
    assert read_sample(coco.records[0]).image.shape == (12, 16, 3)
