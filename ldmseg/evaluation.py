"""Segment a COCO panoptic dataset with a trained model and score it (no Ray, no MLflow).

Predictions are written as a COCO panoptic prediction folder (``panoptic/*.png`` +
``panoptic.json``) so that ``ldmseg pq`` and any COCO tool can read them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ldmseg.data import coco
from ldmseg.data.coco_writer import CocoPanopticWriter
from ldmseg.data.segments import segments_info


def prediction_names(records: list[coco.PanopticRecord]) -> dict[int, str]:
    """Image id → PNG name in a prediction folder: the ground truth's mask name, prefixed with the
    image id when two records share that name (inputs in different folders), so no prediction
    overwrites another."""
    names = {r.image_id: Path(r.segments_file).with_suffix(".png").name for r in records}
    counts = Counter(names.values())
    return {i: n if counts[n] == 1 else f"{i:012d}-{n}" for i, n in names.items()}


def progress_logger(part: str, what: str) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback for :func:`predict_dataset` and
    :func:`~ldmseg.inpainting_eval.inpainting_scores` that logs ``{what} done/total images (rate)``
    to the logger ``ldmseg.<part>`` (rate since the callback was made)."""
    from ldmseg.logs import get_logger

    log, t0 = get_logger(part), time.time()

    def progress(done: int, total: int) -> None:
        log.info(f"{what} {done}/{total} images ({done / max(time.time() - t0, 1e-9):.2f} images/s)")

    return progress


def predict_dataset(segmenter, dataset: coco.CocoPanoptic, out_dir: str | Path, *, sampler: str | None = None,
                    steps: int | None = None, seed: int = 0, batch_size: int = 16,
                    progress: Callable[[int, int], None] | None = None, **thresholds: Any) -> dict[str, Any]:
    """Segment every readable image of ``dataset`` into ``out_dir``; returns timing and counts.

    Unreadable images are listed under ``skipped`` with their reason (the PQ evaluator then
    counts them as missing predictions, so they are never silently dropped from the score).
    ``progress(done, total)`` is called after each batch (images segmented so far, of all).
    """
    writer = CocoPanopticWriter(out_dir, [{"id": 1, "name": "object", "isthing": 1, "supercategory": "object"}])
    skipped = []
    t0 = time.time()
    records = dataset.records
    names = prediction_names(records)
    for r in records:
        writer.add_image(r.image_id, r.file_name, r.height, r.width)
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
            writer.add_annotation(rec.image_id, names[rec.image_id], res.id_map, segments_info(res.id_map))
        done += len(chunk)
        if progress is not None:
            progress(done, len(records))
    seconds = time.time() - t0
    writer.close()
    return {"n_images": len(records), "n_predicted": len(writer.annotations), "skipped": skipped,
            "seconds": seconds, "seconds_per_image": seconds / max(len(writer.annotations), 1)}


@dataclass
class GroundTruth:
    """What ``evaluate`` scores against: a COCO panoptic source and, for shards, their split's image ids."""

    root: str | None
    images: str | None = None
    masks: str | None = None
    json_path: str | None = None
    image_ids: list[int] | None = None
    description: str = ""

    def load(self) -> coco.CocoPanoptic:
        """The records to segment (only ``image_ids`` when set)."""
        dataset = coco.load_coco_panoptic(self.root, images=self.images, masks=self.masks, json_path=self.json_path)
        if self.image_ids is not None:
            wanted = set(self.image_ids)
            dataset.records = [r for r in dataset.records if r.image_id in wanted]
        return dataset

    def pq_args(self) -> dict[str, Any]:
        """The ground-truth arguments of :func:`ldmseg.metrics.pq.evaluate_folders`."""
        return {"gt": self.root, "gt_json": self.json_path, "gt_masks": self.masks}

    def local_for_pq(self, cache_root: Path | None = None) -> "GroundTruth":
        """This ground truth with its panoptic JSON and PNG folder on local disk (PQ reads local
        files): remote ones (``s3://...``) are copied once per machine into ``cache_root`` (default:
        the system temp folder), keyed by their URL; local ones are returned as they are."""
        import hashlib
        import tempfile
        from dataclasses import replace

        from ldmseg.data.manifest import open_fs

        json_url = self.json_path or (self.root and f"{self.root.rstrip('/')}/panoptic.json")
        masks_url = self.masks or (self.root and f"{self.root.rstrip('/')}/panoptic")
        if "://" not in f"{json_url}{masks_url}":
            return self
        key = hashlib.sha256(f"{json_url}|{masks_url}".encode()).hexdigest()[:16]
        cache = Path(cache_root or tempfile.gettempdir()) / "ldmseg-gt" / key
        if not cache.is_dir():  # copied into a private folder, then renamed: concurrent trials never see half a copy
            import os
            import shutil

            part = cache.with_name(f"{key}.part{os.getpid()}")
            (part / "panoptic").mkdir(parents=True, exist_ok=True)
            fs, path = open_fs(json_url)
            fs.get_file(path, str(part / "panoptic.json"))
            fs, path = open_fs(masks_url)
            for remote in fs.ls(path, detail=False):
                fs.get_file(remote, str(part / "panoptic" / remote.rstrip("/").split("/")[-1]))
            try:
                part.rename(cache)
            except OSError:  # another process finished first
                shutil.rmtree(part, ignore_errors=True)
        return replace(self, root=str(cache), json_path=str(cache / "panoptic.json"), masks=str(cache / "panoptic"))


def _exists(url: str) -> bool:
    from ldmseg.data.manifest import open_fs

    fs, path = open_fs(url)
    return fs.exists(path)


def resolve_ground_truth(data: str, workdir: Path, split: str | None = None) -> GroundTruth:
    """The ground truth for ``--data``: a COCO panoptic folder as given; for Parquet shards, the
    *source* COCO data the manifest records, restricted to the images of ``split`` (default
    ``val``). A training split is scored only when asked for (``split="train"``); when the source
    is not reachable, the shards' cleaned ground truth at the training resolution is exported
    and scored instead, and the description says so.
    """
    from ldmseg.config import ConfigError
    from ldmseg.data.manifest import check_schema_version, open_fs, read_manifest

    fs, root = open_fs(data)
    manifest = read_manifest(fs, root)
    if manifest is None:
        if split is not None:
            raise ConfigError(f"--split {split} applies to Parquet shards; {data} is a COCO panoptic folder "
                              "(drop --split)")
        root_path = data if "://" in data else str(Path(data).resolve())  # Ray workers run elsewhere
        return GroundTruth(root=root_path, description=f"COCO panoptic folder {data}")
    split = split or "val"
    if not manifest.written.get(split):
        have = ", ".join(sorted(manifest.written)) or "none"
        hint = ("pass --split train to score the training images (a figure of fit, not a held-out result), or "
                "--data a COCO panoptic folder the model never saw") if split == "val" else "pass --split val"
        raise ConfigError(f"--data {data}: the shards have no {split!r} split (splits: {have}); {hint}")
    import pyarrow.parquet as pq

    ids: list[int] = []
    for f in manifest.files[split]:
        with fs.open(f"{root}/{f}", "rb") as fh:
            ids.extend(int(i) for i in pq.read_table(fh, columns=["image_id"])["image_id"].to_pylist())
    role = "training images, not a held-out result" if split == "train" else "held out of training"
    src = dict(manifest.source_paths) or {"source": manifest.source}
    source = src.get("source")
    needed = {"annotations": src.get("annotations") or (source and f"{source.rstrip('/')}/panoptic.json"),
              "masks": src.get("masks") or (source and f"{source.rstrip('/')}/panoptic"),
              "images": src.get("images") or (source and f"{source.rstrip('/')}/images")}
    # existence only: the source's JSON (hundreds of MB for COCO train) is read once, by the caller
    missing = [f"{k} {v}" for k, v in needed.items() if not v or not _exists(v)]
    if not missing:
        return GroundTruth(root=source, images=src.get("images"), masks=src.get("masks"),
                           json_path=src.get("annotations"), image_ids=ids,
                           description=f"split {split!r} of {data} ({len(ids)} images, {role}), scored against "
                                       f"its source {source or src.get('annotations')} at full resolution")
    reason = f"missing {', '.join(missing)}"
    check_schema_version(manifest, f"--data {data} (its source is not readable: {reason})")
    from ldmseg.data.shards import write_coco_from_rows

    rows = []
    for f in manifest.files[split]:
        with fs.open(f"{root}/{f}", "rb") as fh:
            rows.extend(pq.read_table(fh).to_pylist())
    out = workdir / f"gt-{split}"
    write_coco_from_rows(rows, str(out))
    return GroundTruth(root=str(out), image_ids=ids,
                       description=f"split {split!r} of {data} ({len(ids)} images, {role}), scored against the "
                                   f"shards' CLEANED ground truth at the training resolution (small and crowd "
                                   f"segments void), because the source is not readable here: {reason}")
