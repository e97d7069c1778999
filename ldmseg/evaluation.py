"""Segment a COCO panoptic dataset with a trained model and score it (no Ray, no MLflow).

Predictions are written as a COCO panoptic prediction folder (``panoptic/*.png`` +
``panoptic.json``) so that ``ldmseg pq`` and any COCO tool can read them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ldmseg.data import coco
from ldmseg.segmenter import to_coco_prediction


def predict_dataset(segmenter, dataset: coco.CocoPanoptic, out_dir: str | Path, *, sampler: str | None = None,
                    steps: int | None = None, seed: int = 0, batch_size: int = 16, progress: bool = True,
                    **thresholds: Any) -> dict[str, Any]:
    """Segment every readable image of ``dataset`` into ``out_dir``; returns timing and counts.

    Unreadable images are listed under ``skipped`` with their reason (the PQ evaluator then
    counts them as missing predictions, so they are never silently dropped from the score).
    """
    out = Path(out_dir)
    (out / "panoptic").mkdir(parents=True, exist_ok=True)
    annotations, skipped = [], []
    t0 = time.time()
    records = dataset.records
    done = 0
    for i in range(0, len(records), batch_size):
        chunk, images = [], []
        for rec in records[i:i + batch_size]:
            try:
                images.append(coco.read_sample(rec).image)
                chunk.append(rec)
            except coco.DataError as exc:
                skipped.append({"image_id": rec.image_id, "reason": exc.reason})
        if not chunk:
            continue
        results = segmenter.segment(images, sampler=sampler, steps=steps, seed=seed, **thresholds)
        for rec, res in zip(chunk, results):
            png_name = Path(rec.segments_file).with_suffix(".png").name
            png, ann = to_coco_prediction(res, rec.image_id, png_name)
            (out / "panoptic" / png_name).write_bytes(png)
            annotations.append(ann)
        done += len(chunk)
        if progress:
            rate = done / max(time.time() - t0, 1e-9)
            print(f"[evaluate] segmented {done}/{len(records)} images ({rate:.2f} images/s)",
                  file=sys.stderr, flush=True)
    seconds = time.time() - t0
    categories = [{"id": 1, "name": "object", "isthing": 1, "supercategory": "object"}]
    images = [{"id": r.image_id, "file_name": r.file_name, "height": r.height, "width": r.width}
              for r in records]
    (out / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                   "categories": categories}))
    return {"n_images": len(records), "n_predicted": len(annotations), "skipped": skipped,
            "seconds": seconds, "seconds_per_image": seconds / max(len(annotations), 1)}
