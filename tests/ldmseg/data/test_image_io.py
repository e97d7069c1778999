"""decode_image on legal but awkward images (every mode, orientation, size, format) and on broken files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers_images import awkward_probes, bomb_png, write_awkward_images, write_broken_images
from ldmseg.data.image_io import REASONS, ImageDecodeError, decode_image, is_image_name

MAX_PIXELS = 400_000


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("awkward")
    return folder, write_awkward_images(folder)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("broken")
    return folder, write_broken_images(folder, MAX_PIXELS)


def test_every_awkward_image_decodes_to_rgb_at_its_displayed_size_with_known_colours(awkward):
    folder, sizes = awkward
    assert len(sizes) == 19
    for name, (height, width) in sizes.items():
        rgb = decode_image((folder / name).read_bytes(), name, MAX_PIXELS)
        assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3), name
        for (y, x), colour, tolerance in awkward_probes(name):
            diff = np.abs(rgb[y, x].astype(int) - np.array(colour)).max()
            assert diff <= tolerance, f"{name} at {(y, x)}: {rgb[y, x].tolist()} vs {colour}"


def test_exif_orientation_is_applied_so_the_marker_is_top_left(awkward):
    folder, sizes = awkward
    rgb = decode_image((folder / "exif_rotated.jpg").read_bytes(), "exif_rotated.jpg", MAX_PIXELS)
    stored = np.asarray(Image.open(folder / "exif_rotated.jpg").convert("RGB"))
    assert stored.shape[:2] == sizes["exif_rotated.jpg"][::-1]  # stored turned: width and height swapped
    assert rgb[3, 3].min() > 200  # the white marker square, as displayed


def test_a_plain_rgb_jpeg_decodes_exactly_as_pillow_convert(awkward):
    folder, _ = awkward
    data = (folder / "UPPER.JPG").read_bytes()
    np.testing.assert_array_equal(decode_image(data, "x", MAX_PIXELS), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_multi_frame_files_give_their_first_frame(awkward):
    folder, _ = awkward
    first = decode_image((folder / "frames.tif").read_bytes(), "frames.tif", MAX_PIXELS)
    with Image.open(folder / "frames.tif") as img:
        assert img.n_frames == 2
        np.testing.assert_array_equal(first, np.asarray(img.convert("RGB")))


def test_every_broken_file_raises_its_reason_with_the_file_named(broken):
    folder, reasons = broken
    assert set(reasons.values()) <= set(REASONS)
    got = {}
    for name in reasons:
        with pytest.raises(ImageDecodeError) as info:
            decode_image((folder / name).read_bytes(), f"in/{name}", MAX_PIXELS)
        assert f"in/{name}" in str(info.value)
        got[name] = info.value.reason
    assert got == reasons


def test_the_pixel_cap_is_checked_on_the_header_before_decoding():
    # a header declaring 5000 x 5000 with no pixel data: refused for its size, not for missing data
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb_png(5000, 5000, with_data=False), "bomb.png", MAX_PIXELS)
    assert info.value.reason == "too_many_pixels" and "segment.max_pixels" in str(info.value)
    # the same size under a cap that admits it: the decode is tried and fails on the data
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb_png(600, 600, with_data=False), "small.png", 10**6)
    assert info.value.reason in {"truncated", "corrupt"}


def test_pillows_own_bomb_limit_is_an_error_not_a_warning(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(bomb_png(12, 12), "b.png", MAX_PIXELS)
    assert info.value.reason == "too_many_pixels"
    assert decode_image(bomb_png(8, 8), "ok.png", MAX_PIXELS).shape == (8, 8, 3)


def test_unknown_reason_codes_are_refused():
    with pytest.raises(ValueError, match="unknown image decode reason"):
        ImageDecodeError("weird", "x")


@pytest.mark.parametrize("name,expected", [("a.JPG", True), ("b/c.TiFf", True), ("s3://b/x.webp", True),
                                           ("d.gif", False), ("e.png.txt", False), ("jpg", False)])
def test_image_names_by_suffix_in_any_letter_case(name, expected):
    assert is_image_name(name) is expected
