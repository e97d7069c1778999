"""Reading COCO panoptic folders for the PQ evaluator: ``panoptic.json`` and the id PNGs.

A ground-truth folder holds ``images/``, ``panoptic/`` and ``panoptic.json``; a prediction folder
needs only ``panoptic/`` and ``panoptic.json`` (``annotations`` with ``image_id``, ``file_name``
and ``segments_info``; ``categories`` optional). Explicit JSON / mask-folder paths override the
folder layout (COCO's own: ``annotations/panoptic_val2017.json`` + ``annotations/panoptic_val2017``).

Local paths only. Every problem raises :class:`PQInputError` with a message naming the file and
how to fix it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ldmseg.data.ids import read_panoptic_ids


class PQInputError(ValueError):
    """The ground truth or the prediction cannot be evaluated; the message says why and how to fix it."""


@dataclass
class PanopticSet:
    """One side (ground truth or prediction) of a PQ evaluation, as listed in its JSON.

    ``annotations`` maps image id → the JSON annotation (``file_name``, ``segments_info``), in
    JSON order; ``categories`` maps category id → the JSON category (``isthing``, ``name``),
    empty when the JSON has none.
    """

    role: str
    json_path: Path
    masks_dir: Path
    annotations: dict[int, dict[str, Any]]
    categories: dict[int, dict[str, Any]]

    def mask_path(self, image_id: int) -> Path:
        """Path of the id PNG of ``image_id`` (the annotation's ``file_name`` inside ``masks_dir``)."""
        return self.masks_dir / self.annotations[image_id]["file_name"]


def panoptic_paths(folder: Optional[str | Path] = None, *, json_path: Optional[str | Path] = None,
                   masks: Optional[str | Path] = None, role: str = "ground truth") -> tuple[Path, Path]:
    """``(json_file, masks_dir)`` of a COCO panoptic folder (``FOLDER/panoptic.json``,
    ``FOLDER/panoptic/``), both checked to exist; ``json_path`` / ``masks`` replace the folder's
    parts (``folder`` may then be ``None``). ``role`` ("ground truth" or "prediction") only
    appears in messages."""
    flag = "--gt" if role == "ground truth" else "--pred"
    if folder is None and (json_path is None or masks is None):
        raise PQInputError(f"no {role} given: pass a folder ({flag} FOLDER) or both {flag}-json FILE "
                           f"and {flag}-masks FOLDER")
    if folder is not None and not Path(folder).is_dir():
        raise PQInputError(f"{role} folder {folder} does not exist; pass a COCO panoptic folder with "
                           f"panoptic/ and panoptic.json ({flag} FOLDER)")
    json_file = Path(json_path) if json_path is not None else Path(folder) / "panoptic.json"
    masks_dir = Path(masks) if masks is not None else Path(folder) / "panoptic"
    if not json_file.is_file():
        raise PQInputError(f"{role} JSON {json_file} not found; write it or pass its path with {flag}-json FILE")
    if not masks_dir.is_dir():
        raise PQInputError(f"{role} mask folder {masks_dir} not found; it must hold one id PNG per image "
                           f"(or pass its path with {flag}-masks FOLDER)")
    return json_file, masks_dir


def load_panoptic_set(folder: Optional[str | Path] = None, *, json_path: Optional[str | Path] = None,
                      masks: Optional[str | Path] = None, role: str = "ground truth") -> PanopticSet:
    """Read the JSON of a COCO panoptic folder (arguments as :func:`panoptic_paths`)."""
    json_file, masks_dir = panoptic_paths(folder, json_path=json_path, masks=masks, role=role)
    try:
        data = json.loads(json_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PQInputError(f"{role} JSON {json_file} is not readable JSON ({exc}); rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PQInputError(f"{role} JSON {json_file} has no 'annotations' list; it must be a COCO panoptic "
                           "JSON ({'annotations': [{'image_id', 'file_name', 'segments_info'}, ...]})")
    file_names = {img.get("id"): img.get("file_name") for img in data.get("images", []) if isinstance(img, dict)}
    annotations: dict[int, dict[str, Any]] = {}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not isinstance(ann.get("image_id"), int) \
                or not isinstance(ann.get("segments_info"), list):
            raise PQInputError(f"{role} JSON {json_file}: annotation #{k} needs an integer 'image_id' and a "
                               "'segments_info' list; fix that entry")
        image_id = ann["image_id"]
        if image_id in annotations:
            raise PQInputError(f"{role} JSON {json_file} lists image {image_id} twice; keep one annotation per image")
        name = ann.get("file_name")
        if not isinstance(name, str):
            image_name = file_names.get(image_id)
            if not isinstance(image_name, str):
                raise PQInputError(f"{role} JSON {json_file}: the annotation of image {image_id} has no "
                                   "'file_name'; add the name of its PNG")
            name = str(Path(image_name).with_suffix(".png"))
        annotations[image_id] = {**ann, "file_name": name}
    categories: dict[int, dict[str, Any]] = {}
    for cat in data.get("categories", []) or []:
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int):
            raise PQInputError(f"{role} JSON {json_file}: every category needs an integer 'id'; fix {cat!r}")
        categories[cat["id"]] = cat
    return PanopticSet(role=role, json_path=json_file, masks_dir=masks_dir, annotations=annotations,
                       categories=categories)


def read_id_map(path: str | Path) -> np.ndarray:
    """Read a COCO panoptic PNG as (H, W) uint32 segment ids (R + 256·G + 256²·B; 0 = void).

    :func:`ldmseg.data.ids.read_panoptic_ids` (RGB, RGBA, P and L PNGs; alpha is ignored) with its
    errors as :class:`PQInputError` naming the file.
    """
    path = Path(path)
    try:
        return read_panoptic_ids(path, np.uint32)
    except FileNotFoundError:
        raise PQInputError(f"{path} not found; write the PNG or remove its annotation from the JSON") from None
    except ValueError as exc:  # a PNG mode that holds no RGB colours
        raise PQInputError(f"{path}: {exc}") from None
    except (OSError, SyntaxError) as exc:  # UnidentifiedImageError is an OSError
        raise PQInputError(f"{path} is not a readable PNG ({exc}); rewrite it") from None
