"""The latent-ready Parquet shard format (schema version 1): row encoding and decoding.

One row per image, written by ``ldmseg preprocess`` and read by training, without Ray:

============== ========= =================================================================
column         type      meaning
============== ========= =================================================================
image_id       int64     COCO image id
split          string    ``train``, ``val``, ... (one folder per split)
file_name      string    source image file name
segments_file  string    source panoptic PNG file name
height, width  int32     original image size in pixels
resolution     int32     training resolution R (rows hold R×R arrays)
scaled_height  int32     size of the resized image inside the R×R canvas (pad mode);
scaled_width   int32     ``restore_size`` uses it to go back to the original size
resize_mode    string    ``pad`` or ``squash``
image          binary    image at R×R: raw RGB bytes (R·R·3 uint8, row-major) or PNG/JPEG
image_format   string    ``raw``, ``png`` or ``jpeg``
slot_map       binary    remapped id map (slot per pixel, 0 = void/padding) as 8/16-bit PNG
valid          binary    valid-pixel mask (1 = inside the image) as 1-bit PNG
num_segments   int32     non-void segments after cleaning
segments       string    JSON list: {slot, id, category_id, iscrowd, area, bbox} per segment
n_small        int32     segments < min_segment_area px at the training resolution turned void
n_crowd        int32     crowd segments turned void
n_merged       int32     segments merged into void because there were more than S−1
checksum       string    sha256 of the source image file then the panoptic PNG, as stored
============== ========= =================================================================

Slots are remapped deterministically per image id (``eval_generator``); training re-permutes
them per sample (:func:`decode_row` with a generator).
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from ldmseg.config import Config
from ldmseg.data import encoding

# 2: ``checksum`` hashes the source files as stored (1: the decoded image and id map)
# 3: ``min_segment_area`` counts pixels at the training resolution (2: at the source's)
SCHEMA_VERSION = 3

SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("split", pa.string()),
    ("file_name", pa.string()),
    ("segments_file", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("resolution", pa.int32()),
    ("scaled_height", pa.int32()),
    ("scaled_width", pa.int32()),
    ("resize_mode", pa.string()),
    ("image", pa.binary()),
    ("image_format", pa.string()),
    ("slot_map", pa.binary()),
    ("valid", pa.binary()),
    ("num_segments", pa.int32()),
    ("segments", pa.string()),
    ("n_small", pa.int32()),
    ("n_crowd", pa.int32()),
    ("n_merged", pa.int32()),
    ("checksum", pa.string()),
])

ERROR_SCHEMA = pa.schema([
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("segments_file", pa.string()),
    ("split", pa.string()),
    ("reason", pa.string()),
])


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_gray8(array: np.ndarray) -> bytes:
    """(H, W) uint8 → an 8-bit grayscale PNG: no row filter, zlib level 1 (~4x faster than PIL's
    encoder, whose adaptive filtering costs more than the compression). Any PNG reader opens it."""
    h, w = array.shape
    raw = np.empty((h, w + 1), dtype=np.uint8)
    raw[:, 0] = 0  # filter type None on every row
    raw[:, 1:] = array
    return b"".join((_PNG_MAGIC, _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)),
                     _png_chunk(b"IDAT", zlib.compress(raw, 1)), _png_chunk(b"IEND", b"")))


def _unpng_gray8(data) -> np.ndarray | None:
    """Fast path of :func:`_unpng` for 8-bit grayscale PNGs without row filters (as
    :func:`_png_gray8` writes): one inflate, no PIL. None for any other PNG.

    The result is a (H, W) view into the inflated rows, whose filter bytes (all 0) precede each
    row: ``result.base`` holds them, (H·(W + 1),) uint8."""
    view = memoryview(data)
    if len(view) < 45 or view[:8] != _PNG_MAGIC or view[12:16] != b"IHDR":
        return None
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", view[16:29])
    if depth != 8 or colour != 0 or interlace != 0 or not w or not h:
        return None
    pos, idat = 33, []
    while pos + 8 <= len(view):
        n = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        if kind == b"IDAT":
            idat.append(view[pos + 8:pos + 8 + n])
        elif kind == b"IEND":
            break
        pos += 12 + n
    try:
        raw = zlib.decompress(idat[0] if len(idat) == 1 else b"".join(idat))
    except (zlib.error, IndexError):
        return None
    if len(raw) != h * (w + 1):
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, w + 1)
    if rows[:, 0].any():  # some row uses a filter: let PIL undo it
        return None
    return rows[:, 1:]


def _unpng(data: bytes) -> np.ndarray:
    fast = _unpng_gray8(data)
    if fast is not None:
        return fast
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


@functools.lru_cache(maxsize=4096)
def _valid_png(resolution: int, scaled_h: int, scaled_w: int) -> bytes:
    """The valid-pixel mask PNG of a top-left ``scaled_h`` x ``scaled_w`` region (same for many rows)."""
    valid = np.zeros((resolution, resolution), dtype=bool)
    valid[:scaled_h, :scaled_w] = True
    return _png(valid)


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """(R, R, 3) uint8 → bytes in ``fmt`` (``raw``, ``png`` or ``jpeg``)."""
    if fmt == "raw":
        return np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()


def decode_image(data: bytes, fmt: str, resolution: int) -> np.ndarray:
    """Inverse of :func:`encode_image` → (R, R, 3) uint8."""
    if fmt == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(resolution, resolution, 3)
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


class SkipImage(ValueError):
    """The image is valid but unusable for training (e.g. no non-crowd segment)."""


def encode_sample(image: np.ndarray, id_map: np.ndarray, segments_info: list[dict], *, image_id: int,
                  cfg: Config, split: str = "train", file_name: str = "", segments_file: str = "",
                  seed: int = 0, source_sha256: str = "") -> dict[str, Any]:
    """One decoded COCO panoptic sample → one shard row (a dict matching :data:`SCHEMA`).

    ``image`` is (H, W, 3) uint8, ``id_map`` (H, W) int64 COCO segment ids; ``source_sha256``
    becomes the row's ``checksum`` (:attr:`ldmseg.data.coco.Sample.source_sha256`). Cleans (small and
    crowd → void), remaps ids into slots deterministically per ``image_id``, resizes/pads to
    ``cfg.data.resolution``. Raises :class:`SkipImage` if no non-crowd segment is left.
    """
    image = _check_image(image, id_map)
    dense, ids = encoding.compact_ids(id_map)  # one hash pass; the rest works on dense labels
    counts = np.bincount(dense.ravel(), minlength=len(ids))
    return _encode(image, None, dense, ids, counts, segments_info, image_id=image_id, cfg=cfg, split=split,
                   file_name=file_name, segments_file=segments_file, seed=seed, source_sha256=source_sha256)


def encode_dense_sample(sample, *, image_id: int, cfg: Config, split: str = "train", file_name: str = "",
                        segments_file: str = "", seed: int = 0, image_out: np.ndarray | None = None
                        ) -> dict[str, Any]:
    """:func:`encode_sample` of a :class:`ldmseg.data.coco.DenseSample` (same row), without
    relabelling the ids again.

    ``image_out``: a zeroed (R, R, 3) uint8 array; with ``image_format`` ``raw`` the image is
    written there and the row's ``image`` is None (the caller builds the column from it).
    """
    image = _check_image(sample.image, sample.id_map)
    return _encode(image, sample.pil_image, sample.labels, sample.segment_ids, sample.counts,
                   sample.segments_info, image_id=image_id, cfg=cfg, split=split, file_name=file_name,
                   segments_file=segments_file, seed=seed, source_sha256=sample.source_sha256,
                   image_out=image_out)


def _check_image(image: np.ndarray, id_map: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] != np.shape(id_map):
        raise ValueError(f"image {image.shape[:2]} and id_map {np.shape(id_map)} sizes differ")
    return image


def _encode(image: np.ndarray, pil_image, labels: np.ndarray, ids: np.ndarray, counts: np.ndarray,
            segments_info: list[dict], *, image_id: int, cfg: Config, split: str, file_name: str,
            segments_file: str, seed: int, source_sha256: str, image_out: np.ndarray | None = None
            ) -> dict[str, Any]:
    """The row of a sample given as dense labels (``ids[label]`` = COCO id, ``counts`` per label).

    Equal to resizing, cleaning and remapping the id map itself (:func:`encoding.resize_pad`,
    :func:`encoding.clean_segments`, :func:`encoding.remap_ids`): segment areas are counted at
    the training resolution (a segment the model sees as 3 pixels is not a target, however large
    it was in the source), and the label → slot table is applied to the resized labels.
    """
    h, w = labels.shape
    label_of = {int(v): i for i, v in enumerate(ids.tolist())}
    dense_info = [{**s, "id": label_of[int(s["id"])]} for s in segments_info if int(s["id"]) in label_of]
    res, mode = int(cfg.data.resolution), cfg.data.resize_mode
    if res < 1:
        raise ValueError(f"resolution must be >= 1, got {res}")
    sh, sw = encoding.scaled_size(h, w, res, mode)
    small_labels = labels
    if (sh, sw) != (h, w):
        small_labels = np.take(np.take(labels, encoding._nearest_index(h, sh), axis=0),
                               encoding._nearest_index(w, sw), axis=1)
        counts = np.bincount(small_labels.ravel(), minlength=len(counts))
    remap = encoding.clean_remap_labels(counts, dense_info, cfg.data.min_segment_area, cfg.data.num_slots,
                                        encoding.eval_generator(image_id, seed))
    if not remap.has_segments:
        raise SkipImage(f"no non-crowd segment of at least {cfg.data.min_segment_area} px at the "
                        f"training resolution {res} (nothing to train on)")

    # image: bilinear (PIL) into the top-left of a black R×R canvas
    if (sh, sw) == (h, w):
        small = image
    else:
        pil = pil_image if pil_image is not None else Image.fromarray(image)
        small = np.asarray(pil.resize((sw, sh), Image.Resampling.BILINEAR))
    fmt = cfg.preprocess.image_format
    direct = image_out is not None and fmt == "raw"
    canvas = image_out if direct else np.zeros((res, res, 3), dtype=np.uint8)
    canvas[:sh, :sw] = small

    # slots: nearest-resize the labels, then the label → slot table
    slot_dtype = np.uint8 if cfg.data.num_slots <= 256 else np.uint16
    slots_r = np.zeros((res, res), dtype=slot_dtype)
    slots_r[:sh, :sw] = np.take(remap.lut.astype(slot_dtype), small_labels)

    by_label = {int(s["id"]): s for s in remap.segments_info}
    segments = []
    for slot, label in sorted(remap.slots.items()):
        s = by_label.get(int(label), {})
        segments.append({"slot": int(slot), "id": int(ids[label]), "category_id": int(s.get("category_id", 0)),
                         "iscrowd": int(s.get("iscrowd", 0)), "area": int(s.get("area", 0)),
                         "bbox": [int(v) for v in s.get("bbox", [0, 0, 0, 0])]})
    return {
        "image_id": int(image_id), "split": split, "file_name": file_name, "segments_file": segments_file,
        "height": int(h), "width": int(w), "resolution": res,
        "scaled_height": int(sh), "scaled_width": int(sw),
        "resize_mode": mode,
        "image": None if direct else encode_image(canvas, fmt),
        "image_format": fmt,
        "slot_map": _png_gray8(slots_r) if slot_dtype == np.uint8 else _png(slots_r),
        "valid": _valid_png(res, int(sh), int(sw)),
        "num_segments": len(segments), "segments": json.dumps(segments),
        "n_small": int(remap.n_small), "n_crowd": int(remap.n_crowd), "n_merged": int(remap.n_merged),
        "checksum": source_sha256,
    }


def decode_row(row: dict[str, Any], num_slots: int, generator: np.random.Generator | None = None
               ) -> dict[str, np.ndarray]:
    """One shard row → training arrays.

    Returns ``image`` (3, R, R) float32 in [-1, 1], ``slot_map`` (R, R) int64 in [0, S),
    ``valid`` (R, R) bool. With ``generator``, the slots are re-permuted at random (training:
    id values must carry no meaning); without, the stored deterministic slots are returned.
    """
    import torch

    res = int(row["resolution"])
    image = decode_image(row["image"], row["image_format"], res)
    slot_map = _unpng(row["slot_map"])
    if row.get("resize_mode", "pad") == "pad" and row.get("scaled_height"):
        valid = np.zeros((res, res), dtype=bool)  # the valid region is the top-left rectangle
        valid[: int(row["scaled_height"]), : int(row["scaled_width"])] = True
    else:
        valid = _unpng(row["valid"]).astype(bool)
    if generator is not None:
        slot_map = encoding.repermute_slots(slot_map, num_slots, generator)
    image_f = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    return {"image": image_f.numpy(), "slot_map": slot_map.astype(np.int64), "valid": valid}


def write_coco_from_rows(rows: list[dict[str, Any]], out: str) -> None:
    """Shard rows → a COCO panoptic folder at the training resolution (ground truth for PQ).

    Each image is the valid (unpadded) region of the stored R×R image; its panoptic PNG holds the
    slot ids (slot k → segment id k); ``segments_info`` keeps category, iscrowd (0 after
    cleaning) and the area/bbox measured on the stored map. Categories are taken from the rows;
    unknown category ids become one class-agnostic ``object`` category.
    """
    from pathlib import Path

    from ldmseg.data.ids import encode_panoptic_png

    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "panoptic").mkdir(parents=True, exist_ok=True)
    images, annotations, cats = [], [], set()
    for row in rows:
        res = int(row["resolution"])
        h, w = int(row["scaled_height"]), int(row["scaled_width"])
        image = decode_image(row["image"], row["image_format"], res)[:h, :w]
        slots = _unpng(row["slot_map"]).astype(np.int64)[:h, :w]
        image_id = int(row["image_id"])
        name = f"{image_id:012d}"
        Image.fromarray(np.ascontiguousarray(image)).save(root / "images" / f"{name}.png")
        (root / "panoptic" / f"{name}.png").write_bytes(encode_panoptic_png(slots))
        info = []
        for seg in json.loads(row["segments"]):
            mask = slots == seg["slot"]
            area = int(mask.sum())
            if area == 0:
                continue
            ys, xs = np.nonzero(mask)
            cat = int(seg.get("category_id", 1)) or 1
            cats.add(cat)
            info.append({"id": int(seg["slot"]), "category_id": cat, "iscrowd": 0, "area": area,
                         "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                                  int(ys.max() - ys.min() + 1)]})
        images.append({"id": image_id, "file_name": f"{name}.png", "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": info})
    categories = [{"id": c, "name": f"category-{c}", "isthing": 1} for c in sorted(cats)] or \
        [{"id": 1, "name": "object", "isthing": 1}]
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                    "categories": categories}))
