"""Reading and checking one image of a COCO panoptic dataset (:func:`read_sample`, :func:`validate_record`).

Per-image problems (missing, empty, truncated or undecodable files, size mismatches, ids present in
the PNG but not in ``segments_info`` or the reverse) are found when a record is read:
:func:`read_sample` raises :class:`~ldmseg.data.coco_records.DataError`, :func:`validate_record`
lists them all.
"""

from __future__ import annotations

import hashlib
import io
import threading

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldmseg.data.coco_records import DataError, DenseSample, PanopticRecord, Sample, filesystem, is_int
from ldmseg.data.ids import MAX_ID, decode_panoptic_png, is_crowd

# Ids listed in a message before it says "and N more".
_MAX_LISTED = 8


def _read_bytes(fs, path: str, label: str, problems: list[str]) -> bytes | None:
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        problems.append(f"{label} {path} not found")
        return None
    except (OSError, IsADirectoryError) as exc:
        problems.append(f"{label} {path} cannot be read: {exc}")
        return None
    if len(data) == 0:
        problems.append(f"{label} {path} is empty (0 bytes)")
        return None
    return data


def _decode_image(data: bytes, path: str, problems: list[str], keep_pil: bool = False):
    """Full decode (``load()``), so a truncated file raises; any mode → RGB, no EXIF rotation.

    Returns the (H, W, 3) uint8 array, or with ``keep_pil`` (array, PIL RGB image); None on failure.
    """
    try:
        img = Image.open(io.BytesIO(data))
        try:
            img.load()
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            if not keep_pil:
                return np.asarray(rgb, dtype=np.uint8).copy()
            return np.asarray(rgb, dtype=np.uint8), rgb
        finally:
            if not keep_pil:
                img.close()
    except UnidentifiedImageError:
        problems.append(f"image file {path} is not an image PIL can read")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        problems.append(f"image file {path} cannot be decoded: {exc}")
    return None


def _decode_png(data: bytes, path: str, problems: list[str]) -> np.ndarray | None:
    """(H, W) int64 ids of a panoptic PNG (:func:`ldmseg.data.ids.decode_panoptic_png`), or None with the problem."""
    try:
        return decode_panoptic_png(data)
    except UnidentifiedImageError:
        problems.append(f"panoptic PNG {path} is not an image PIL can read")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        problems.append(f"panoptic PNG {path} cannot be decoded: {exc}")
    return None


def _unique_ids(id_map: np.ndarray) -> np.ndarray:
    """Distinct ids of a map; pandas' hash table is ~3x faster than sorting with ``np.unique``."""
    try:
        import pandas as pd

        return np.asarray(pd.unique(id_map.ravel()))
    except ImportError:
        return np.unique(id_map)


# Per-thread lookup tables over all 2²⁴ ids (id → dense label), filled for one image's listed
# ids and reset after it: one gather labels a whole map (no hashing, no sort).
_TABLES = threading.local()


def _label_table(dtype) -> np.ndarray:
    tables = _TABLES.__dict__.setdefault("tables", {})
    table = tables.get(np.dtype(dtype).str)
    if table is None:
        table = np.full(MAX_ID + 1, np.iinfo(dtype).max, dtype=dtype)
        table[0] = 0
        tables[np.dtype(dtype).str] = table
    return table


def _dense_labels(id_map: np.ndarray, listed: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """Relabel an id map by its sorted listed ids (1..K; void 0) → (labels, counts, unlisted pixels).

    ``listed``: sorted distinct ids in [1, 2²⁴). Pixels whose id is not listed get the dtype's
    maximum label and are counted in the third value; ``counts[k]`` = pixels of label k (0..K).
    """
    k = len(listed)
    dtype = np.uint8 if k < 255 else np.uint16
    if k >= 65535 or id_map.size == 0 or id_map.ndim != 2:
        raise ValueError("too many segments for a label table")
    table = _label_table(dtype)
    sentinel = int(np.iinfo(dtype).max)
    index = np.asarray(listed, dtype=np.int64)
    table[index] = np.arange(1, k + 1, dtype=dtype)
    try:
        labels = np.take(table, id_map)
    finally:
        table[index] = sentinel
    if dtype == np.uint8:
        h, w = labels.shape
        full = np.asarray(Image.frombuffer("L", (w, h), labels, "raw", "L", 0, 1).histogram(), dtype=np.int64)
    else:
        full = np.bincount(labels.ravel(), minlength=sentinel + 1)
    return labels, full[: k + 1].copy(), int(full[sentinel])


def _listed(ids) -> str:
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:_MAX_LISTED])
    return text + (f" and {len(ids) - _MAX_LISTED} more" if len(ids) > _MAX_LISTED else "")


def _check_segments_info(record: PanopticRecord, categories: dict[int, dict] | None, problems: list[str]) -> set[int]:
    """Problems of ``segments_info`` on its own; returns its set of valid ids."""
    ids: set[int] = set()
    seen_twice: set[int] = set()
    for seg in record.segments_info:
        if not isinstance(seg, dict) or not is_int(seg.get("id")):
            problems.append(f"segments_info entry without an integer 'id': {seg!r:.120}")
            continue
        seg_id = seg["id"]
        if not 1 <= seg_id <= MAX_ID:
            problems.append(f"segments_info id {seg_id} is outside [1, {MAX_ID}] (0 is void)")
            continue
        if seg_id in ids:
            seen_twice.add(seg_id)
        ids.add(seg_id)
        if categories is not None and seg.get("category_id") not in categories:
            problems.append(f"segment {seg_id} has category_id {seg.get('category_id')!r}, not in 'categories'")
        try:
            is_crowd(seg)
        except ValueError as exc:
            problems.append(str(exc))
    if seen_twice:
        problems.append(f"segments_info lists ids more than once: {_listed(seen_twice)}")
    return ids


def _check(record: PanopticRecord, fs, categories, storage_options,
           dense: bool = False) -> tuple[Sample | None, list[str]]:
    problems: list[str] = []
    image_fs = fs or filesystem(record.image_path, storage_options)
    png_fs = fs or filesystem(record.panoptic_path, storage_options)
    image_bytes = _read_bytes(image_fs, record.image_path, "image file", problems)
    png_bytes = _read_bytes(png_fs, record.panoptic_path, "panoptic PNG", problems)
    decoded = _decode_image(image_bytes, record.image_path, problems, keep_pil=dense) \
        if image_bytes is not None else None
    image, pil_image = (decoded if dense else (decoded, None)) if decoded is not None else (None, None)
    id_map = _decode_png(png_bytes, record.panoptic_path, problems) if png_bytes is not None else None
    info_ids = _check_segments_info(record, categories, problems)

    size = lambda a: f"{a.shape[1]}x{a.shape[0]}"  # noqa: E731  (W x H, as COCO states sizes)
    if record.height is not None and record.width is not None:
        json_size = f"{record.width}x{record.height}"
        for label, array in (("image", image), ("panoptic PNG", id_map)):
            if array is not None and array.shape[:2] != (record.height, record.width):
                problems.append(f"{label} is {size(array)} but the JSON says {json_size} (width x height)")
    if image is not None and id_map is not None and image.shape[:2] != id_map.shape:
        problems.append(f"image is {size(image)} but its panoptic PNG is {size(id_map)} (width x height)")

    labels = counts = listed = None
    if id_map is not None:
        unlisted_pixels = 1
        if dense:
            listed = sorted(info_ids)
            try:
                labels, counts, unlisted_pixels = _dense_labels(id_map, listed)
            except ValueError:
                labels = None
        if labels is not None and not unlisted_pixels:
            # every pixel's id is listed: the ids present are the listed ids with pixels
            absent = {i for i, c in zip(listed, counts[1:].tolist()) if c == 0}
            if absent:
                problems.append(f"segments_info ids absent from the panoptic PNG: {_listed(absent)}")
        else:
            png_ids = set(_unique_ids(id_map).tolist()) - {0}
            unlisted = png_ids - info_ids
            if unlisted:
                problems.append(f"panoptic PNG has ids not in segments_info: {_listed(unlisted)}")
            absent = info_ids - png_ids
            if absent:
                problems.append(f"segments_info ids absent from the panoptic PNG: {_listed(absent)}")
            if dense and not problems:  # a label table could not be used (e.g. > 65534 segments)
                import ldmseg.data.encoding as encoding

                dense_map, ids = encoding.compact_ids(id_map)
                labels, listed = dense_map, ids[1:].tolist()
                counts = np.bincount(dense_map.ravel(), minlength=len(ids))

    if problems:
        return None, problems
    digest = hashlib.sha256(image_bytes)
    digest.update(png_bytes)
    if dense:
        return DenseSample(image=image, id_map=id_map, segments_info=record.segments_info,
                           source_sha256=digest.hexdigest(), labels=labels,
                           segment_ids=np.asarray([0, *listed], dtype=np.int64), counts=counts,
                           pil_image=pil_image), []
    return Sample(image=image, id_map=id_map, segments_info=record.segments_info,
                  source_sha256=digest.hexdigest()), []


def read_sample(record: PanopticRecord, fs=None, *, categories: dict[int, dict] | None = None,
                storage_options: dict | None = None) -> Sample:
    """Decode one record's image and panoptic PNG, checking them against each other and the JSON.

    ``fs``: an fsspec filesystem for both paths (default: from each path's URL and
    ``storage_options``). ``categories`` (optional): also check every ``category_id``.
    Raises :class:`DataError` whose ``reason`` lists every problem found.
    """
    sample, problems = _check(record, fs, categories, storage_options)
    if sample is None:
        raise DataError(f"image {record.image_id} ({record.file_name}): " + "; ".join(problems))
    return sample


def read_dense_sample(record: PanopticRecord, fs=None, *, categories: dict[int, dict] | None = None,
                      storage_options: dict | None = None) -> DenseSample:
    """:func:`read_sample` (same checks, same reasons) that also relabels the ids densely.

    The dense labels come from the same pass that checks the PNG's ids against
    ``segments_info`` (one lookup per pixel in a table over all 2²⁴ ids); preprocessing
    encodes from them without relabelling again. The image array may be read-only.
    """
    sample, problems = _check(record, fs, categories, storage_options, dense=True)
    if sample is None:
        raise DataError(f"image {record.image_id} ({record.file_name}): " + "; ".join(problems))
    return sample  # type: ignore[return-value]


def validate_record(record: PanopticRecord, fs=None, *, categories: dict[int, dict] | None = None,
                    storage_options: dict | None = None) -> list[str]:
    """Every problem :func:`read_sample` would raise for, as a list of reasons ([] if usable)."""
    return _check(record, fs, categories, storage_options)[1]
