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

This module reads the JSON (:func:`load_coco_panoptic`); the records and samples are defined in
:mod:`ldmseg.data.coco_records`, reading and checking one image in :mod:`ldmseg.data.coco_sample`;
their public names are importable from here too.
"""

from __future__ import annotations

import json
import os
import posixpath

from ldmseg.data.coco_records import (CocoPanoptic, DataError, DenseSample, PanopticRecord, Problem, Sample,
                                      filesystem, is_int)
from ldmseg.data.coco_sample import read_dense_sample, read_sample, validate_record

__all__ = ["CocoPanoptic", "DataError", "DenseSample", "PanopticRecord", "Problem", "Sample", "load_coco_panoptic",
           "read_dense_sample", "read_sample", "validate_record"]


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

    fs = filesystem(json_file, options)
    uses_root = root is not None and None in (images, masks, json_path)
    if uses_root and not filesystem(root, options).isdir(root):
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
        if not filesystem(folder, options).isdir(folder):
            raise DataError(f"{label} folder {folder} does not exist")

    problems: list[Problem] = []
    categories = _categories(data["categories"], problems)
    records = _records(data["images"], data["annotations"], images_dir, masks_dir, problems)
    return CocoPanoptic(records, categories, problems, images_dir, masks_dir, json_file, options)


def _categories(entries: list, problems: list[Problem]) -> dict[int, dict]:
    categories: dict[int, dict] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not is_int(entry.get("id")):
            problems.append(Problem("malformed_entry", f"category entry without an integer 'id': {entry!r:.200}"))
            continue
        if entry["id"] in categories:
            problems.append(Problem("duplicate_category_id", f"category id {entry['id']} is listed more than once"))
            continue
        categories[entry["id"]] = entry
    return categories


def _records(images: list, annotations: list, images_dir: str, masks_dir: str,
             problems: list[Problem]) -> list[PanopticRecord]:
    # Image entries by id; ids listed more than once are dropped entirely (which one the
    # annotation belongs to cannot be told).
    by_id: dict[int, dict] = {}
    counts: dict[int, list[str]] = {}
    for entry in images:
        if not isinstance(entry, dict) or not is_int(entry.get("id")) or not isinstance(entry.get("file_name"), str):
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
        if (not isinstance(ann, dict) or not is_int(ann.get("image_id"))
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
            height=height if is_int(height) else None,
            width=width if is_int(width) else None,
            segments_info=ann["segments_info"],
        ))
    return records

