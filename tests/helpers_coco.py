"""Write small COCO panoptic folders, good or with deliberate defects, for tests.

Typical use::

    good = entry(1, ids=[0, 5, 70000])                        # 3 vertical bands, one void
    bad = entry(2, png_bytes=b"")                             # zero-byte panoptic PNG
    paths = write_coco_folder(tmp_path / "ds", [good, bad])
    coco = load_coco_panoptic(**paths.kwargs())

Every field of :class:`Entry` that is left ``None`` is derived from ``id_map`` so that the entry is
valid; set one field to break exactly that part.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ldmseg.data.ids import encode_panoptic_png
from ldmseg.data.segments import segments_info

THING, STUFF = 1, 0

DEFAULT_CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": THING},
    {"id": 7, "name": "box", "supercategory": "shape", "isthing": THING},
    {"id": 300, "name": "wall", "supercategory": "background", "isthing": STUFF},
]


def band_id_map(height: int, width: int, ids: Sequence[int]) -> np.ndarray:
    """(height, width) int64 map of vertical bands, one per id in ``ids`` (0 makes a void band)."""
    columns = np.arange(width) * len(ids) // width
    return np.tile(np.asarray(ids, dtype=np.int64)[columns], (height, 1))


def segments_info_from(id_map: np.ndarray, category_id: int = 1, iscrowd: int = 0) -> list[dict]:
    """COCO ``segments_info`` (id, category_id, iscrowd, area, bbox [x, y, w, h]) of every id > 0."""
    return segments_info(id_map, category_id=category_id, iscrowd=iscrowd)


def image_for(id_map: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture with a flat colour per segment id (void is grey)."""
    ids = id_map.astype(np.int64)
    rgb = np.stack([(ids * 37) % 200, (ids * 91) % 200, (ids * 53) % 200], axis=-1) + 30
    rgb[ids == 0] = 128
    return rgb.astype(np.uint8)


def image_bytes(image: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", **save_kwargs) -> bytes:
    """Encode an (H, W, 3) uint8 array as ``fmt`` after converting it to PIL ``mode`` (L, CMYK, P...)."""
    img = Image.fromarray(image, mode="RGB")
    if mode == "P":
        img = img.quantize(colors=16)
    elif mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    if fmt == "JPEG":
        save_kwargs.setdefault("quality", 95)
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` fraction of ``data`` (a file cut short by a failed copy)."""
    return data[: int(len(data) * keep)]


@dataclass
class Entry:
    """One image of a test dataset; ``None`` fields are derived from ``id_map`` (valid data)."""

    image_id: int
    id_map: np.ndarray
    segments_info: Optional[list[dict]] = None
    image: Optional[np.ndarray] = None
    """Pixels of the photo (default: :func:`image_for` of ``id_map``), written as JPEG."""
    file_name: Optional[str] = None
    segments_file: Optional[str] = None
    image_data: Optional[bytes] = None
    """Exact bytes of the photo file (overrides ``image``)."""
    png_data: Optional[bytes] = None
    """Exact bytes of the panoptic PNG (overrides ``id_map``'s encoding)."""
    write_image: bool = True
    write_png: bool = True
    in_images: bool = True
    """List the image in the JSON's ``images``."""
    in_annotations: bool = True
    """List an annotation for it in the JSON's ``annotations``."""
    image_json: dict = field(default_factory=dict)
    """Keys added to / overriding the JSON image entry (e.g. ``{"height": 99}``)."""
    annotation_json: dict = field(default_factory=dict)


def entry(image_id: int, height: int = 12, width: int = 16, ids: Sequence[int] = (0, 5, 70000),
          id_map: Optional[np.ndarray] = None, **fields) -> Entry:
    """A valid :class:`Entry`: ``id_map``, or by default vertical bands of ``ids``.

    ``fields`` set other :class:`Entry` fields (to break exactly one thing).
    """
    if id_map is None:
        id_map = band_id_map(height, width, ids)
    return Entry(image_id=image_id, id_map=np.asarray(id_map, dtype=np.int64), **fields)


@dataclass
class CocoPaths:
    """Where :func:`write_coco_folder` put things."""

    root: Path
    images: Path
    masks: Path
    json_path: Path

    def kwargs(self) -> dict:
        """Explicit-path arguments of ``load_coco_panoptic``."""
        return {"images": self.images, "masks": self.masks, "json_path": self.json_path}


def write_coco_folder(root: str | Path, entries: Sequence[Entry], *, categories: list[dict] | None = None,
                      layout: str = "folder", json_extra: dict | None = None) -> CocoPaths:
    """Write ``entries`` as a COCO panoptic dataset under ``root``.

    ``layout="folder"``: ``images/``, ``panoptic/``, ``panoptic.json``; ``layout="coco"``: COCO's own
    ``val2017/``, ``annotations/panoptic_val2017/``, ``annotations/panoptic_val2017.json``.
    ``json_extra`` adds top-level JSON keys (``info``, ``licenses``, anything).
    """
    root = Path(root)
    if layout == "folder":
        paths = CocoPaths(root, root / "images", root / "panoptic", root / "panoptic.json")
    elif layout == "coco":
        paths = CocoPaths(root, root / "val2017", root / "annotations" / "panoptic_val2017",
                          root / "annotations" / "panoptic_val2017.json")
    else:
        raise ValueError(f"layout must be 'folder' or 'coco', got {layout!r}")
    paths.images.mkdir(parents=True, exist_ok=True)
    paths.masks.mkdir(parents=True, exist_ok=True)

    images, annotations = [], []
    for e in entries:
        file_name = e.file_name or f"{e.image_id:012d}.jpg"
        segments_file = e.segments_file or f"{e.image_id:012d}.png"
        height, width = e.id_map.shape
        if e.write_image:
            data = e.image_data
            if data is None:
                data = image_bytes(e.image if e.image is not None else image_for(e.id_map))
            (paths.images / file_name).parent.mkdir(parents=True, exist_ok=True)
            (paths.images / file_name).write_bytes(data)
        if e.write_png:
            data = e.png_data if e.png_data is not None else encode_panoptic_png(e.id_map)
            (paths.masks / segments_file).parent.mkdir(parents=True, exist_ok=True)
            (paths.masks / segments_file).write_bytes(data)
        if e.in_images:
            images.append({"id": e.image_id, "file_name": file_name, "height": height, "width": width,
                           **e.image_json})
        if e.in_annotations:
            info = e.segments_info if e.segments_info is not None else segments_info_from(e.id_map)
            annotations.append({"image_id": e.image_id, "file_name": segments_file, "segments_info": info,
                                **e.annotation_json})
    doc = {**(json_extra or {}), "images": images, "annotations": annotations,
           "categories": categories if categories is not None else DEFAULT_CATEGORIES}
    paths.json_path.write_text(json.dumps(doc))
    return paths


AGNOSTIC = [{"id": 1, "name": "object", "supercategory": "object", "isthing": THING}]


def score_id_maps(root: str | Path, gts: Sequence[np.ndarray], preds: Sequence[np.ndarray]) -> dict:
    """Class-agnostic PQ of predicted id maps against ground-truth id maps (0 = void), the long way
    round: both are written as COCO panoptic folders under ``root`` and scored by
    :func:`ldmseg.metrics.pq.evaluate_folders`. Returns its ``"All"`` group (pq, sq, rq, tp, fp, fn)."""
    from ldmseg.metrics.pq import evaluate_folders

    if len(gts) != len(preds):
        raise ValueError(f"{len(gts)} ground-truth maps but {len(preds)} predictions")
    root = Path(root)
    for name, maps in (("gt", gts), ("pred", preds)):
        write_coco_folder(root / name, [entry(i + 1, id_map=np.asarray(m, dtype=np.int64))
                                        for i, m in enumerate(maps)], categories=AGNOSTIC)
    return evaluate_folders(root / "gt", root / "pred", class_agnostic=True, workers=1)["All"]
