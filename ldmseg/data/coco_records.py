"""The records of a COCO panoptic dataset: what its JSON lists and what reading an image gives.

:class:`PanopticRecord` (one image as listed), :class:`Problem` (a JSON entry without a usable
record), :class:`CocoPanoptic` (the dataset), :class:`Sample` / :class:`DenseSample` (a decoded
image) and :class:`DataError`. Records and problems are plain dataclasses with ``to_dict`` so they
fit Ray Data rows and a quarantine table. :func:`filesystem` opens a record's local path or URL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec
import numpy as np


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



def filesystem(path: str, storage_options: dict | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem of a local path or URL (``s3://...``; extra arguments in ``storage_options``)."""
    fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs


def is_int(value: Any) -> bool:
    """A JSON integer (``bool`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool)


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

