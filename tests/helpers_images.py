"""Legal but awkward image files, and broken ones, for the tests of image decoding and ``ldmseg segment``.

Every awkward image shows the same simple scene at its own size: a background, a rectangle, an
ellipse and (when the image is at least 18 pixels each way) a white marker square at the top left,
as displayed (after EXIF orientation). :func:`awkward_probes` gives pixels whose decoded colour is
known. Everything is deterministic.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Scene labels 0 background, 1 rectangle, 2 ellipse, 3 marker → RGB.
SCENE_RGB = np.array([(70, 130, 180), (200, 60, 40), (240, 220, 60), (255, 255, 255)], dtype=np.uint8)
GRAY_LEVELS = np.asarray(Image.fromarray(SCENE_RGB[None]).convert("L"))[0]  # what Pillow's L conversion gives
LEVELS_16 = np.array([1000, 30000, 50000, 65535], dtype=np.uint16)  # decoded: rint(v / 257) = 4, 117, 195, 255
LEVELS_F = np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32)  # decoded: 0, 64, 128, 255
EXIF_ORIENTATION = 0x0112


def scene_labels(width: int, height: int) -> np.ndarray:
    """(height, width) uint8 labels of the scene (0 background, 1 rectangle, 2 ellipse, 3 marker)."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    draw.rectangle((int(0.15 * width), int(0.35 * height), int(0.55 * width), int(0.9 * height)), fill=1)
    draw.ellipse((int(0.6 * width), int(0.1 * height), int(0.95 * width), int(0.6 * height)), fill=2)
    side = min(width, height) // 6
    if side >= 3:
        draw.rectangle((1, 1, side, side), fill=3)
    return np.asarray(img)


def _probe_points(width: int, height: int) -> list[tuple[int, int]]:
    """(y, x) inside flat regions: rectangle centre, ellipse centre, background, marker centre."""
    points = [(int(0.625 * height), int(0.35 * width)), (int(0.35 * height), int(0.775 * width)),
              (int(0.15 * height), int(0.35 * width))]
    side = min(width, height) // 6
    return points + [(1 + side // 2, 1 + side // 2)] if side >= 3 else points


def _encode(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _rgb(labels: np.ndarray) -> Image.Image:
    return Image.fromarray(SCENE_RGB[labels])


def _rgba(labels: np.ndarray) -> Image.Image:
    alpha = np.where(np.arange(labels.shape[1]) < labels.shape[1] // 2, 0, 128).astype(np.uint8)
    return Image.fromarray(np.dstack([SCENE_RGB[labels], np.broadcast_to(alpha, labels.shape)]), "RGBA")


def _palette(labels: np.ndarray) -> bytes:
    img = Image.fromarray(labels, "P")  # index = label; index 0 (background) transparent
    img.putpalette(SCENE_RGB.ravel().tolist())
    return _encode(img, "PNG", transparency=0)


def _exif_rotated(labels: np.ndarray) -> bytes:
    """Stored turned 90° anticlockwise with EXIF orientation 6 (display: turn 90° clockwise)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return _encode(_rgb(labels).transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def _frames(labels: np.ndarray, fmt: str) -> bytes:
    first = _rgb(labels)
    return _encode(first, fmt, save_all=True, append_images=[Image.fromarray(255 - np.asarray(first))])


# name → (width, height as displayed, bytes from the labels, decoded RGB per label, probe tolerance)
_AWKWARD = {
    "gray.png": (96, 64, lambda lb: _encode(Image.fromarray(GRAY_LEVELS[lb]), "PNG"), np.repeat(GRAY_LEVELS[:, None], 3, 1), 0),
    "palette.png": (96, 64, _palette, SCENE_RGB, 0),  # transparent entry: its palette colour
    "rgba.png": (96, 64, lambda lb: _encode(_rgba(lb), "PNG"), SCENE_RGB, 0),
    "la.png": (80, 60, lambda lb: _encode(Image.fromarray(np.dstack([GRAY_LEVELS[lb], 255 - GRAY_LEVELS[lb]]), "LA"), "PNG"),
               np.repeat(GRAY_LEVELS[:, None], 3, 1), 0),
    "bilevel.png": (64, 48, lambda lb: _encode(Image.fromarray(lb > 0), "PNG"), np.array([[0] * 3] + [[255] * 3] * 3), 0),
    "cmyk.jpg": (96, 64, lambda lb: _encode(_rgb(lb).convert("CMYK"), "JPEG", quality=95), SCENE_RGB, 24),
    "gray16.png": (96, 64, lambda lb: _encode(Image.fromarray(LEVELS_16[lb]), "PNG"),
                   np.repeat(np.rint(LEVELS_16 / 257)[:, None], 3, 1), 0),
    "gray16b.tif": (72, 56, lambda lb: _encode(Image.fromarray(LEVELS_16[lb].astype(">u2")), "TIFF"),
                    np.repeat(np.rint(LEVELS_16 / 257)[:, None], 3, 1), 0),
    "float.tif": (72, 56, lambda lb: _encode(Image.fromarray(LEVELS_F[lb]), "TIFF"),
                  np.repeat(np.rint(LEVELS_F * 255)[:, None], 3, 1), 0),
    "exif_rotated.jpg": (48, 80, _exif_rotated, SCENE_RGB, 32),
    "tiny.png": (1, 1, lambda lb: _encode(_rgb(lb), "PNG"), SCENE_RGB, 0),
    "wide.jpg": (4000, 50, lambda lb: _encode(_rgb(lb), "JPEG", quality=95), SCENE_RGB, 24),
    "photo.webp": (120, 80, lambda lb: _encode(_rgb(lb), "WEBP", quality=90), SCENE_RGB, 24),
    "image.bmp": (70, 50, lambda lb: _encode(_rgb(lb), "BMP"), SCENE_RGB, 0),
    "scan.tif": (90, 60, lambda lb: _encode(_rgb(lb), "TIFF", compression="tiff_deflate"), SCENE_RGB, 0),
    "frames.tif": (64, 48, lambda lb: _frames(lb, "TIFF"), SCENE_RGB, 0),
    "stereo.jpg": (64, 48, lambda lb: _frames(lb, "MPO"), SCENE_RGB, 24),
    "UPPER.JPG": (64, 48, lambda lb: _encode(_rgb(lb), "JPEG", quality=95), SCENE_RGB, 24),
    "nested/name with spaces.png": (50, 40, lambda lb: _encode(_rgb(lb), "PNG"), SCENE_RGB, 0),
}


def write_awkward_images(folder) -> dict[str, tuple[int, int]]:
    """Write legal but awkward images under ``folder``: relative name → (height, width) after EXIF
    orientation. Modes L, P with transparency, RGBA, LA, 1, CMYK JPEG, I;16 PNG, I;16B and F TIFF;
    EXIF orientation 6; 1×1; 4000×50; WebP, BMP, TIFF, multi-frame TIFF, MPO; ``.JPG``; spaces."""
    sizes = {}
    for name, (width, height, encode, _, _) in _AWKWARD.items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(scene_labels(width, height)))
        sizes[name] = (height, width)
    return sizes


def awkward_probes(name: str) -> list[tuple[tuple[int, int], tuple[int, int, int], int]]:
    """((y, x), expected decoded RGB, tolerance per channel) of known pixels of an awkward image."""
    width, height, _, colours, tolerance = _AWKWARD[name]
    labels = scene_labels(width, height)
    return [((y, x), tuple(int(c) for c in colours[labels[y, x]]), tolerance) for y, x in _probe_points(width, height)]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int, with_data: bool = True) -> bytes:
    """A grayscale PNG declaring width × height pixels, a few KB whatever its size (zeros compress
    ~1000:1, streamed row by row). ``with_data=False``: header only, so decoding it would fail."""
    compressor = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte + pixels
    rows = b"".join(compressor.compress(row) for _ in range(height if with_data else 0)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def _damaged_png_data(png: bytes) -> bytes:
    """The PNG with bytes of its first IDAT's zlib stream overwritten, CRC recomputed (so only zlib fails)."""
    start = png.index(b"IDAT") - 4
    length = struct.unpack(">I", png[start:start + 4])[0]
    payload = bytearray(png[start + 8:start + 8 + length])
    payload[2:10] = b"\xff" * 8
    return png[:start] + _png_chunk(b"IDAT", bytes(payload)) + png[start + 12 + length:]


def _broken_tiff_strip(tiff: bytes) -> bytes:
    """The (deflate) TIFF with its first strip overwritten by random bytes."""
    with Image.open(io.BytesIO(tiff)) as img:
        offset, count = img.tag_v2[273][0], img.tag_v2[279][0]
    noise = np.random.default_rng(5).bytes(count)
    return tiff[:offset] + noise + tiff[offset + count:]


def _bad_bmp_header(bmp: bytes) -> bytes:
    return bmp[:14] + struct.pack("<I", 99) + bmp[18:]  # DIB header size 99: no such BMP version


def write_broken_images(folder, max_pixels: int) -> dict[str, str]:
    """Write broken or unsupported files under ``folder``: relative name → the reason code
    :func:`ldmseg.data.image_io.decode_image` must give. The bomb declares more than ``max_pixels``."""
    rng = np.random.default_rng(17)
    textured = Image.fromarray(rng.integers(0, 256, (192, 256, 3), dtype=np.uint8))  # big scan data
    jpeg, png = _encode(textured, "JPEG", quality=90), _encode(textured, "PNG")
    webp = _encode(textured, "WEBP", quality=90)
    side = math.isqrt(max_pixels) + 1
    files = {
        "empty.jpg": (b"", "empty"),
        "notes.png": (b"These are notes, not a picture.\n" * 4, "not_an_image"),
        "noise.jpg": (b"\x00" + rng.bytes(4095), "not_an_image"),
        "page.webp": (b"<!DOCTYPE html>\n<html><body><img src='x.webp'></body></html>\n", "not_an_image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "truncated.png": (png[: len(png) // 2], "truncated"),
        "truncated.webp": (webp[: len(webp) // 2], "truncated"),
        "header_only.jpg": (jpeg[: jpeg.index(b"\xff\xda")], "truncated"),
        "cut_header.png": (png[:20], "truncated"),
        "bad_zlib.png": (_damaged_png_data(png), "corrupt"),
        "broken_strip.tif": (_broken_tiff_strip(_encode(textured, "TIFF", compression="tiff_deflate")), "corrupt"),
        "bad_header.bmp": (_bad_bmp_header(_encode(textured, "BMP")), "corrupt"),
        "animation.png": (_frames(scene_labels(32, 24), "GIF"), "unsupported_format"),
        "icon.jpg": (_encode(_rgb(scene_labels(32, 32)), "ICO"), "unsupported_format"),
        "lab.tif": (_encode(_rgb(scene_labels(32, 24)).convert("LAB"), "TIFF"), "unsupported_mode"),
        "bomb.png": (bomb_png(side, side), "too_many_pixels"),
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, (data, _) in files.items():
        (Path(folder) / name).write_bytes(data)
    return {name: reason for name, (_, reason) in files.items()}
