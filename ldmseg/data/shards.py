"""The latent-ready Parquet shard format (schema version 4): row encoding and the column codecs.

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
scaled_height  int32     size of the resized image inside the R×R canvas: the image fills the
scaled_width   int32     top-left scaled_height × scaled_width pixels (all R×R when squashed);
                         the rest is padding (``restore_size`` goes back to the original size)
resize_mode    string    ``pad`` or ``squash``
image          binary    image at R×R: raw RGB bytes (R·R·3 uint8, row-major) or PNG/JPEG
image_format   string    ``raw``, ``png`` or ``jpeg``
slot_map       binary    remapped id map (slot per pixel, 0 = void/padding), raw: R·R uint8
                         (up to 256 slots) or R·R little-endian uint16, row-major; Parquet
                         compresses the column
num_segments   int32     non-void segments after cleaning
segments       string    JSON list: {slot, id, category_id, iscrowd, area, bbox} per segment
n_small        int32     segments < min_segment_area px at the training resolution turned void
n_crowd        int32     crowd segments turned void
n_merged       int32     segments merged into void because there were more than S−1
checksum       string    sha256 of the source image file then the panoptic PNG, as stored
============== ========= =================================================================

Slots are remapped deterministically per image id (``eval_generator``); training re-permutes
them per sample (:mod:`ldmseg.data.parquet_dataset`).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from ldmseg.config import Config
from ldmseg.data.coco_writer import CocoPanopticWriter
from ldmseg.data.manifest import SCHEMA_VERSION
from ldmseg.data.resize import nearest_index, scaled_size
from ldmseg.data.segments import segments_info as measure_segments
from ldmseg.data.slots import clean_remap_labels, eval_generator

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


def encode_slot_map(slot_map: np.ndarray) -> bytes:
    """(R, R) uint8 or uint16 slots → the ``slot_map`` column's raw bytes (row-major, little-endian)."""
    if slot_map.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"slot maps are stored as uint8 or uint16, got {slot_map.dtype}")
    return np.ascontiguousarray(slot_map, dtype=slot_map.dtype.newbyteorder("<")).tobytes()


def decode_slot_map(data: Any, resolution: int) -> np.ndarray:
    """Inverse of :func:`encode_slot_map` → a read-only (R, R) uint8 or uint16 view of ``data``.

    The width of a slot is the stored size over R·R (1 byte up to 256 slots, else 2). Raises
    :class:`ShardFormatError` for any other size (shards of an older schema version).
    """
    flat = np.frombuffer(data, dtype=np.uint8)
    pixels = resolution * resolution
    if flat.size == pixels:
        return flat.reshape(resolution, resolution)
    if flat.size == 2 * pixels:
        return flat.view("<u2").reshape(resolution, resolution)
    raise ShardFormatError(f"a slot map of {flat.size} bytes does not hold {resolution}x{resolution} raw slots")


def valid_mask(resolution: int, scaled_height: int, scaled_width: int) -> np.ndarray:
    """(R, R) bool: True on the image, False on the padding (the image fills the top-left
    ``scaled_height`` × ``scaled_width`` rectangle; all of it in ``squash`` mode)."""
    valid = np.zeros((resolution, resolution), dtype=bool)
    valid[:scaled_height, :scaled_width] = True
    return valid


class ShardFormatError(ValueError):
    """Shards written in another schema version than this code reads."""

    def __init__(self, what: str):
        super().__init__(f"{what}: these shards were written by an older ldmseg (schema version < "
                         f"{SCHEMA_VERSION}); re-run `ldmseg preprocess` (with --overwrite, or into a new --output)")


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


def encode_dense_sample(sample, *, image_id: int, cfg: Config, split: str = "train", file_name: str = "",
                        segments_file: str = "", seed: int = 0, image_out: np.ndarray | None = None
                        ) -> dict[str, Any]:
    """One decoded COCO panoptic sample → one shard row (a dict matching :data:`SCHEMA`).

    ``sample`` is a :class:`ldmseg.data.coco.DenseSample`: the (H, W, 3) uint8 ``image``, its ids
    relabelled densely (``labels``; ``segment_ids[label]`` the COCO id, ``counts`` per label),
    ``segments_info`` and ``source_sha256`` (the row's ``checksum``). Cleans (small and crowd →
    void), remaps ids into slots deterministically per ``image_id``, resizes/pads to
    ``cfg.data.resolution``. Raises :class:`SkipImage` if no non-crowd segment is left.

    Equal to resizing, cleaning and remapping the id map itself (:func:`~ldmseg.data.resize.resize_pad`,
    :func:`~ldmseg.data.slots.clean_segments`, :func:`~ldmseg.data.slots.remap_ids`): segment
    areas are counted at the training resolution (a segment the model sees as 3 pixels is not a
    target, however large it was in the source), and the label → slot table is applied to the
    resized labels.

    ``image_out``: a zeroed (R, R, 3) uint8 array; with ``image_format`` ``raw`` the image is
    written there and the row's ``image`` is None (the caller builds the column from it).
    """
    image = np.asarray(sample.image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    labels, ids, counts = sample.labels, sample.segment_ids, sample.counts
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and id map {labels.shape} sizes differ")
    h, w = labels.shape
    label_of = {int(v): i for i, v in enumerate(ids.tolist())}
    dense_info = [{**s, "id": label_of[int(s["id"])]} for s in sample.segments_info if int(s["id"]) in label_of]
    res, mode = int(cfg.data.resolution), cfg.data.resize_mode
    if res < 1:
        raise ValueError(f"resolution must be >= 1, got {res}")
    sh, sw = scaled_size(h, w, res, mode)
    small_labels = labels
    if (sh, sw) != (h, w):
        small_labels = np.take(np.take(labels, nearest_index(h, sh), axis=0), nearest_index(w, sw), axis=1)
        counts = np.bincount(small_labels.ravel(), minlength=len(counts))
    remap = clean_remap_labels(counts, dense_info, cfg.data.min_segment_area, cfg.data.num_slots,
                               eval_generator(image_id, seed))
    if not remap.has_segments:
        raise SkipImage(f"no non-crowd segment of at least {cfg.data.min_segment_area} px at the "
                        f"training resolution {res} (nothing to train on)")

    # image: bilinear (PIL) into the top-left of a black R×R canvas
    if (sh, sw) == (h, w):
        small = image
    else:
        pil = sample.pil_image if sample.pil_image is not None else Image.fromarray(image)
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
        "slot_map": encode_slot_map(slots_r),
        "num_segments": len(segments), "segments": json.dumps(segments),
        "n_small": int(remap.n_small), "n_crowd": int(remap.n_crowd), "n_merged": int(remap.n_merged),
        "checksum": sample.source_sha256,
    }


def write_coco_from_rows(rows: list[dict[str, Any]], out: str) -> None:
    """Shard rows → a COCO panoptic folder at the training resolution (ground truth for PQ).

    Each image is the valid (unpadded) region of the stored R×R image; its panoptic PNG holds the
    slot ids (slot k → segment id k); ``segments_info`` keeps category, iscrowd (0 after
    cleaning) and the area/bbox measured on the stored map. Categories are taken from the rows;
    unknown category ids become one class-agnostic ``object`` category.
    """
    writer = CocoPanopticWriter(out, images=True)
    cats: set[int] = set()
    for row in rows:
        res = int(row["resolution"])
        h, w = int(row["scaled_height"]), int(row["scaled_width"])
        image = decode_image(row["image"], row["image_format"], res)[:h, :w]
        slots = decode_slot_map(row["slot_map"], res)[:h, :w].astype(np.int64)
        stored = json.loads(row["segments"])
        category = {int(seg["slot"]): int(seg.get("category_id", 1)) or 1 for seg in stored}
        info = measure_segments(slots, [int(seg["slot"]) for seg in stored], category_id=category)
        cats.update(seg["category_id"] for seg in info)
        name = f"{int(row['image_id']):012d}.png"
        writer.add_image(int(row["image_id"]), name, h, w, image=image)
        writer.add_annotation(int(row["image_id"]), name, slots, info)
    writer.close([{"id": c, "name": f"category-{c}", "isthing": 1} for c in sorted(cats)]
                 or [{"id": 1, "name": "object", "isthing": 1}])
