"""COCO panoptic datasets: reading and validation, from local paths or any fsspec URL.

A *COCO panoptic folder* holds ``images/`` (the photos), ``panoptic/`` (one RGB PNG per image,
segment id = R + 256·G + 256²·B, 0 = void) and ``panoptic.json`` (``images``, ``annotations``
with ``segments_info``, ``categories``). COCO's own layout works through explicit paths::

    load_coco_panoptic(images="coco/val2017", masks="coco/annotations/panoptic_val2017",
                       json_path="coco/annotations/panoptic_val2017.json")

Paths may be local or fsspec URLs (``s3://bucket/prefix``); extra fsspec arguments (endpoint,
credentials) go in ``storage_options``.

Two kinds of problems are told apart:

* dataset-level ones (duplicate image ids, an annotation without an image, an image without an
  annotation, a malformed JSON entry) are collected in :attr:`CocoPanoptic.problems`; the entries
  involved get no record;
* per-image ones (missing, empty, truncated or undecodable files, size mismatches, ids present in
  the PNG but not in ``segments_info`` or the reverse) are found when a record is read:
  :func:`read_sample` raises :class:`DataError`, :func:`validate_record` lists them all.

Records and problems are plain dataclasses with ``to_dict`` so they fit Ray Data rows and a
quarantine table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec
import numpy as np
from PIL import Image, UnidentifiedImageError

from ldmseg.data.ids import MAX_ID, decode_panoptic_png, is_crowd, panoptic_rgb

# Ids listed in a message before it says "and N more".
_MAX_LISTED = 8


class DataError(ValueError):
    """A dataset or one of its images is unusable; ``reason`` says why and names the file."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Problem:
    """A dataset-level problem: an entry of ``panoptic.json`` that yields no usable record.

    ``kind`` is one of ``duplicate_image_id``, ``duplicate_annotation``,
    ``annotation_without_image``, ``image_without_annotation``, ``malformed_entry``,
    ``duplicate_category_id``.
    """

    kind: str
    reason: str
    image_id: Optional[int] = None
    file_name: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PanopticRecord:
    """One image of a COCO panoptic dataset, as listed in the JSON (nothing read yet).

    ``image_path`` / ``panoptic_path`` are absolute local paths or full URLs (``s3://...``), so a
    record can be read in another process. ``height`` / ``width`` are the JSON's (``None`` if the
    entry has none). ``segments_info`` is the JSON's list of dicts (``id``, ``category_id``,
    ``iscrowd``, ``area``, ``bbox``, ...).
    """

    image_id: int
    file_name: str
    segments_file: str
    image_path: str
    panoptic_path: str
    height: Optional[int]
    width: Optional[int]
    segments_info: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict) -> "PanopticRecord":
        """Inverse of :meth:`to_dict`; accepts rows that went through Arrow (numpy values)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: _plain(v) for k, v in row.items() if k in names}
        return cls(**values)


@dataclass
class Sample:
    """A decoded image and its panoptic id map.

    ``image``: (H, W, 3) uint8 RGB (EXIF orientation not applied, as in COCO's annotations);
    ``id_map``: (H, W) int64 segment ids, 0 = void; ``segments_info``: the record's list of dicts;
    ``source_sha256``: hex sha256 of the image file's bytes then the panoptic PNG's, as stored
    ("" when the sample was not read from files).
    """

    image: np.ndarray
    id_map: np.ndarray
    segments_info: list[dict]
    source_sha256: str = ""


@dataclass
class DenseSample(Sample):
    """A :class:`Sample` whose ids are also relabelled densely (:func:`read_dense_sample`).

    ``labels`` (H, W) uint8 (uint16 beyond 254 segments): label k ≥ 1 is ``segment_ids[k]``, 0 is
    void; ``segment_ids`` (K+1,) int64, sorted, ``segment_ids[0] == 0`` (as
    :func:`ldmseg.data.encoding.compact_ids` gives); ``counts`` (K+1,) int64 pixels per label.
    ``pil_image`` is the decoded RGB image as PIL holds it (resized without a conversion).
    """

    labels: np.ndarray = None  # type: ignore[assignment]
    segment_ids: np.ndarray = None  # type: ignore[assignment]
    counts: np.ndarray = None  # type: ignore[assignment]
    pil_image: Any = field(default=None, repr=False)


@dataclass
class CocoPanoptic:
    """A COCO panoptic dataset as listed by its JSON (read once by :func:`load_coco_panoptic`)."""

    records: list[PanopticRecord]
    categories: dict[int, dict]
    """Category id → the JSON's category dict (``id``, ``name``, ``isthing``, ...)."""
    problems: list[Problem]
    images_dir: str
    masks_dir: str
    json_path: str
    storage_options: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def _is_url(path: str) -> bool:
    return "://" in path


def _normalise(path: str | os.PathLike) -> str:
    """Local paths become absolute (records are read in other processes); URLs stay as given."""
    path = os.fspath(path)
    if _is_url(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def _join(base: str, name: str) -> str:
    return posixpath.join(base, name) if _is_url(base) else os.path.join(base, name)


def _filesystem(path: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs


def _plain(value: Any) -> Any:
    """numpy arrays / scalars (e.g. from Arrow rows) → lists / Python numbers, recursively."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# Loading the JSON
# --------------------------------------------------------------------------------------------


def load_coco_panoptic(
    root: str | os.PathLike | None = None,
    *,
    images: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> CocoPanoptic:
    """Read ``panoptic.json`` once and list its images as :class:`PanopticRecord` objects.

    ``root`` is a COCO panoptic folder (``images/``, ``panoptic/``, ``panoptic.json``); each of
    ``images``, ``masks`` and ``json_path`` overrides one part, and with all three ``root`` may be
    ``None``. Raises :class:`DataError` naming the file if the JSON or a folder is missing, the JSON
    is not valid JSON, or lacks ``images`` / ``annotations`` / ``categories``. Problems of single
    entries do not raise: they are returned in ``problems``.
    """
    if root is None and None in (images, masks, json_path):
        missing = [n for n, v in (("images", images), ("masks", masks), ("json_path", json_path)) if v is None]
        raise DataError(
            f"no dataset folder given and no {', '.join(missing)}: pass a COCO panoptic folder "
            "(images/, panoptic/, panoptic.json) or all of images=, masks=, json_path="
        )
    if root is not None:
        root = _normalise(root)
    images_dir = _normalise(images if images is not None else _join(root, "images"))
    masks_dir = _normalise(masks if masks is not None else _join(root, "panoptic"))
    json_file = _normalise(json_path if json_path is not None else _join(root, "panoptic.json"))
    options = dict(storage_options or {})

    fs = _filesystem(json_file, options)
    uses_root = root is not None and None in (images, masks, json_path)
    if uses_root and not _filesystem(root, options).isdir(root):
        raise DataError(f"dataset folder {root} does not exist")
    try:
        raw = fs.cat_file(json_file)
    except FileNotFoundError:
        raise DataError(f"annotation file {json_file} does not exist") from None
    except (OSError, IsADirectoryError) as exc:
        raise DataError(f"annotation file {json_file} cannot be read: {exc}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {json_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file {json_file}: expected a JSON object at the top level")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(
                f"annotation file {json_file} has no {key!r} list; a COCO panoptic JSON needs "
                "'images', 'annotations' and 'categories'"
            )
    for label, folder in (("images", images_dir), ("panoptic PNG", masks_dir)):
        if not _filesystem(folder, options).isdir(folder):
            raise DataError(f"{label} folder {folder} does not exist")

    problems: list[Problem] = []
    categories = _categories(data["categories"], problems)
    records = _records(data["images"], data["annotations"], images_dir, masks_dir, problems)
    return CocoPanoptic(records, categories, problems, images_dir, masks_dir, json_file, options)


def _categories(entries: list, problems: list[Problem]) -> dict[int, dict]:
    categories: dict[int, dict] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            problems.append(Problem("malformed_entry", f"category entry without an integer 'id': {entry!r:.200}"))
            continue
        if entry["id"] in categories:
            problems.append(Problem("duplicate_category_id", f"category id {entry['id']} is listed more than once"))
            continue
        categories[entry["id"]] = entry
    return categories


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _records(images: list, annotations: list, images_dir: str, masks_dir: str,
             problems: list[Problem]) -> list[PanopticRecord]:
    # Image entries by id; ids listed more than once are dropped entirely (which one the
    # annotation belongs to cannot be told).
    by_id: dict[int, dict] = {}
    counts: dict[int, list[str]] = {}
    for entry in images:
        if not isinstance(entry, dict) or not _is_int(entry.get("id")) or not isinstance(entry.get("file_name"), str):
            problems.append(Problem("malformed_entry",
                                    f"image entry needs an integer 'id' and a string 'file_name': {entry!r:.200}"))
            continue
        counts.setdefault(entry["id"], []).append(entry["file_name"])
        by_id.setdefault(entry["id"], entry)
    for image_id, names in counts.items():
        if len(names) > 1:
            problems.append(Problem(
                "duplicate_image_id",
                f"image id {image_id} is listed {len(names)} times in 'images' ({', '.join(names)}); "
                "all its entries are skipped",
                image_id, names[0]))
            del by_id[image_id]

    annotation_of: dict[int, dict] = {}
    duplicated: set[int] = set()
    for ann in annotations:
        if (not isinstance(ann, dict) or not _is_int(ann.get("image_id"))
                or not isinstance(ann.get("file_name"), str) or not isinstance(ann.get("segments_info"), list)):
            problems.append(Problem(
                "malformed_entry",
                f"annotation needs an integer 'image_id', a string 'file_name' and a 'segments_info' list: {ann!r:.200}"))
            continue
        image_id = ann["image_id"]
        if image_id not in counts:
            problems.append(Problem("annotation_without_image",
                                    f"annotation {ann['file_name']} refers to image id {image_id}, "
                                    "which is not in 'images'", image_id, ann["file_name"]))
            continue
        if image_id in annotation_of:
            duplicated.add(image_id)
        annotation_of.setdefault(image_id, ann)
    for image_id in sorted(duplicated):
        if image_id in by_id:
            problems.append(Problem("duplicate_annotation",
                                    f"image id {image_id} has more than one annotation; it is skipped",
                                    image_id, by_id[image_id]["file_name"]))
            del by_id[image_id]

    records = []
    for image_id, entry in by_id.items():
        ann = annotation_of.get(image_id)
        if ann is None:
            problems.append(Problem("image_without_annotation",
                                    f"image {entry['file_name']} (id {image_id}) has no annotation",
                                    image_id, entry["file_name"]))
            continue
        height, width = entry.get("height"), entry.get("width")
        records.append(PanopticRecord(
            image_id=image_id,
            file_name=entry["file_name"],
            segments_file=ann["file_name"],
            image_path=_join(images_dir, entry["file_name"]),
            panoptic_path=_join(masks_dir, ann["file_name"]),
            height=height if _is_int(height) else None,
            width=width if _is_int(width) else None,
            segments_info=ann["segments_info"],
        ))
    return records


# --------------------------------------------------------------------------------------------
# Reading and checking one image
# --------------------------------------------------------------------------------------------


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


_ID_MASK = np.uint32(MAX_ID)


def _panoptic_ids(data: bytes) -> np.ndarray:
    """PNG bytes → (H, W) int64 ids, as :func:`ldmseg.data.ids.decode_panoptic_png` (same errors).

    PIL keeps RGB pixels as 4 bytes: read as little-endian uint32 (through PIL's Arrow export,
    without a copy, when available), one mask drops the 4th byte, written straight to int64.
    """
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        img = panoptic_rgb(img)
        width, height = img.size
        pixels = None
        if hasattr(img, "__arrow_c_array__"):  # Pillow >= 11.2
            try:
                import pyarrow as pa

                pixels = pa.array(img).flatten().to_numpy(zero_copy_only=True).view("<u4")
            except Exception:  # e.g. a very large image spread over several memory blocks
                pixels = None
        if pixels is None:
            pixels = np.frombuffer(img.tobytes("raw", "RGBX"), dtype="<u4")
        ids = np.empty(pixels.size, dtype=np.int64)
        np.bitwise_and(pixels, _ID_MASK, out=ids)
        return ids.reshape(height, width)


def _decode_png(data: bytes, path: str, problems: list[str], fast: bool = False) -> np.ndarray | None:
    try:
        return _panoptic_ids(data) if fast else decode_panoptic_png(data)
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
        if not isinstance(seg, dict) or not _is_int(seg.get("id")):
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
    image_fs = fs or _filesystem(record.image_path, storage_options)
    png_fs = fs or _filesystem(record.panoptic_path, storage_options)
    image_bytes = _read_bytes(image_fs, record.image_path, "image file", problems)
    png_bytes = _read_bytes(png_fs, record.panoptic_path, "panoptic PNG", problems)
    decoded = _decode_image(image_bytes, record.image_path, problems, keep_pil=dense) \
        if image_bytes is not None else None
    image, pil_image = (decoded if dense else (decoded, None)) if decoded is not None else (None, None)
    id_map = _decode_png(png_bytes, record.panoptic_path, problems, fast=dense) if png_bytes is not None else None
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
