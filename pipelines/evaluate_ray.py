"""``ldmseg evaluate --on-ray``: the images to score go through ``ldmseg segment``'s Ray Data path.

In-process evaluation samples in the driver, on its one device (the CPU on a GPU-less head node),
with images read one after the other. Here the dataset's images are written to a list file and
segmented by :func:`pipelines.segment.segment`: reads and decodes in parallel Ray tasks, one model
per actor, each actor on its own GPU when the cluster has GPUs (``segment.num_gpus=1``), sampling
with the model's ``sampling.autocast``. The predictions' image ids (from file names, see
:mod:`pipelines.segment_plan`) are then mapped back to the ground truth's ids, so PQ scores the same
pairs as in-process evaluation; with the same seed the predictions are the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldmseg.logs import get_logger

log = get_logger("evaluate")


def evaluate_on_ray(model_dir: str, records: list, work: Path, predictions: Path, *, options: dict[str, Any],
                    seed: int, batch_size: int | None, address: str | None, tracking_uri: str | None):
    """Segment ``records`` on Ray with the model's sampling config and ``options`` (SamplingConfig
    fields) applied; → (the predictions' ``panoptic.json`` with ground-truth ids, the
    :class:`~ldmseg.config.SamplingConfig` used, timing and counts like ``predict_dataset``'s
    plus ``devices``: images per model device)."""
    from ldmseg.checkpoint import model_config
    from ldmseg.config import with_sampling
    from pipelines.segment import model_meta

    cfg = model_config(work, model_meta(model_dir, work, tracking_uri))
    batch_size = batch_size or options.pop("batch_size", None) or cfg.sampling.batch_size
    used = with_sampling(cfg, {**options, "seed": seed, "batch_size": batch_size}).sampling
    pred_json, summary = segment_records(model_dir, records, work, predictions, sampling={**options, "batch_size": batch_size},
                                         seed=seed, address=address, tracking_uri=tracking_uri)
    stats = {"seconds_per_image": summary["seconds"] / max(summary["segmented"], 1),
             "skipped": [{"reason": r, "count": n} for r, n in summary["quarantine_reasons"].items()],
             "devices": summary["devices"]}
    return pred_json, used, stats


def segment_records(model: str, records: list, work: Path, predictions: Path, *, sampling: dict[str, Any],
                    seed: int, address: str | None, tracking_uri: str | None) -> tuple[Path, dict[str, Any]]:
    """Segment the images of ``records`` (:class:`~ldmseg.data.coco_records.PanopticRecord`) into
    ``predictions`` with ``ldmseg segment``'s pipeline; → (a ``panoptic.json`` holding the ground
    truth's image ids, written in ``work``; the segment summary)."""
    from pipelines import ray_compat
    from pipelines.segment import segment
    from pipelines.segment_plan import list_images, name_images

    listing = work / "images.txt"
    listing.write_text("".join(f"{r.image_path}\n" for r in records))
    ray_compat.init_ray(address)
    gpus = 1 if ray_compat.cluster_gpus() > 0 else 0
    overrides = [f"segment.num_gpus={gpus}"]
    log.info(f"segmenting {len(records)} images on Ray model actors ({'one GPU each' if gpus else 'CPUs'})")
    summary = segment(model, str(listing), str(predictions), sampling=sampling, seed=seed, overwrite=True,
                      overrides=overrides, address=address, tracking_uri=tracking_uri, log_mlflow=False)
    uris, root = list_images(str(listing))
    _, refs = name_images(uris, root)
    gt_id = {_bare(r.image_path): r.image_id for r in records}
    to_gt = {ref.image_id: gt_id[_bare(ref.uri)] for ref in refs}
    doc = json.loads((predictions / "panoptic.json").read_text())
    for image in doc["images"]:
        image["id"] = to_gt[image["id"]]
    for ann in doc["annotations"]:
        ann["image_id"] = to_gt[ann["image_id"]]
    pred_json = work / "predictions_gt_ids.json"
    pred_json.write_text(json.dumps(doc))
    return pred_json, summary


def _bare(uri: str) -> str:
    """A path or URI without its scheme, normalised: how one image is recognised in both lists."""
    import posixpath

    return posixpath.normpath(str(uri).split("://", 1)[-1])
