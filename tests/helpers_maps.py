"""Id maps for the data tests: the real COCO samples read whole, pixel areas, random blocky id maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ldmseg.data.ids import decode_panoptic_png


def load_folder(folder: Path) -> list[dict]:
    """Every sample of a COCO panoptic folder: image id, RGB image, id map, segments_info."""
    meta = json.loads((folder / "panoptic.json").read_text())
    images = {im["id"]: im for im in meta["images"]}
    samples = []
    for ann in meta["annotations"]:
        entry = images[ann["image_id"]]
        ids = decode_panoptic_png((folder / "panoptic" / ann["file_name"]).read_bytes())
        with Image.open(folder / "images" / entry["file_name"]) as img:
            image = np.asarray(img.convert("RGB"))
        assert ids.shape == image.shape[:2] == (entry["height"], entry["width"])
        samples.append({"image_id": ann["image_id"], "image": image, "ids": ids,
                        "segments_info": ann["segments_info"]})
    return samples


def area_map(ids: np.ndarray) -> dict[int, int]:
    u, c = np.unique(ids, return_counts=True)
    return dict(zip(u.tolist(), c.tolist()))


def random_id_map(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """Blocky map of k random large ids (COCO-like values up to 2²⁴) plus some void."""
    ids = rng.choice(np.arange(1, 2**24), size=k, replace=False)
    palette = np.concatenate([[0], ids])
    coarse = rng.integers(0, k + 1, size=(max(1, h // 4), max(1, w // 4)))
    full = np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)
    full = np.pad(full, ((0, h - full.shape[0]), (0, w - full.shape[1])), mode="edge")
    return palette[full].astype(np.int64)
